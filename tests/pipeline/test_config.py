from pathlib import Path

import pytest

from fusionrec.pipeline.config import Config, load_config, parse_override
from fusionrec.pipeline.errors import ConfigError


def test_defaults_need_no_file() -> None:
    cfg = load_config()
    assert cfg == Config()
    assert cfg.embed.text.model == "default" and cfg.fusion.method == "weighted"


def test_file_then_overrides(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text('[embed.text]\nbatch_size = 16\n[fusion]\nmethod = "attention"\nweights = {text = 0.7, image = 0.3}\n')
    cfg = load_config(path, ["embed.text.batch_size=8", "index.target_recall=0.9", "embed.image.model=resnet18"])
    assert cfg.embed.text.batch_size == 8
    assert cfg.fusion.method == "attention" and cfg.fusion.weights == {"text": 0.7, "image": 0.3}
    assert cfg.index.target_recall == 0.9 and cfg.embed.image.model == "resnet18"


def test_an_inline_table_override_replaces_the_files_table(tmp_path: Path) -> None:
    # Before, an inline table was merged into the file's: `fusion.weights={}` (search the weights
    # on validation) left the file's fixed weights in place, silently.
    path = tmp_path / "c.toml"
    path.write_text("[fusion]\nweights = {text = 0.7, image = 0.3}\n")
    assert load_config(path, ["fusion.weights={}"]).fusion.weights == {}
    assert load_config(path, ["fusion.weights={audio = 1}"]).fusion.weights == {"audio": 1.0}
    # a dotted key still adds to the table, and later overrides build on earlier ones
    assert load_config(path, ["fusion.weights.audio=0.2"]).fusion.weights == {"text": 0.7, "image": 0.3, "audio": 0.2}
    assert load_config(path, ["fusion.weights={}", "fusion.weights.audio=1"]).fusion.weights == {"audio": 1.0}
    assert load_config(path, ["fusion.method=concat"]).fusion.weights == {"text": 0.7, "image": 0.3}


@pytest.mark.parametrize(("override", "message"), [
    ("embed.text.bogus=1", "unknown config key 'embed.text.bogus'"),
    ("embed.text.batch_size=abc", "'embed.text.batch_size' must be an integer, got 'abc'"),
    ("embed.text.enabled=1", "'embed.text.enabled' must be true or false"),
    ("fusion.weights=3", "'fusion.weights' must be a table"),
    ("nosection", "must look like section.key=value"),
    ("embed.batch_rows=0", "'embed.batch_rows': Input should be greater than or equal to 1, got 0"),
    ("embed.shard_size=-4", "'embed.shard_size': Input should be greater than or equal to 0, got -4"),
    ("fusion.method=bogus", "'fusion.method': Input should be 'weighted', 'attention' or 'concat', got 'bogus'"),
    ("ranker.objective=foo", "'ranker.objective': Input should be 'lambdarank', 'regression' or 'binary'"),
    ("ranker.labels=later", "'ranker.labels': Input should be 'auto', 'per_user' or 'window'"),
    ("engine=spark", "'engine': Input should be 'local' or 'ray', got 'spark'"),
    ("index.factory=garbage", "'index.factory': FAISS cannot build index factory 'garbage'"),
    ("ranker.learning_rate=-1", "'ranker.learning_rate': Input should be greater than 0, got -1.0"),
    ("ranker.label_fraction=1", "'ranker.label_fraction': Input should be less than 1"),
    ("embed.text.batch_size=0", "'embed.text.batch_size': Input should be greater than or equal to 1, got 0"),
    ("embed.audio.batch_size=0", "'embed.audio.batch_size': Input should be greater than or equal to 1"),
    ("fusion.validation_fraction=2", "'fusion.validation_fraction': Input should be less than 1, got 2.0"),
    ("fusion.validation_fraction=0", "'fusion.validation_fraction': Input should be greater than 0"),
    ("fusion.behaviour_dim=-3", "'fusion.behaviour_dim': Input should be greater than or equal to 0, got -3"),
    ("fusion.weights={text=-1}", "'fusion.weights.text': Input should be greater than or equal to 0"),
    ("fusion.event_weights={view=-0.5}", "'fusion.event_weights.view': Input should be greater than or equal to 0"),
    ("export.k=0", "'export.k': Input should be greater than or equal to 1, got 0"),
    ("index.n_candidates=0", "'index.n_candidates': Input should be greater than or equal to 1"),
    ("embed.max_failed_share=1.5", "'embed.max_failed_share': Input should be less than or equal to 1"),
    ("embed.device=gpu", "'embed.device': String should match pattern"),
    ("sources.names=['x']", "'sources.names': has unknown sources ['x']"),
    ("sources.recent_items=0", "'sources.recent_items': Input should be greater than or equal to 1"),
    ("ray.num_actors=0", "'ray.num_actors': Input should be greater than or equal to 1"),
    # inf and nan pass every "greater than" bound or none: refused by name (before: nan fusion weights)
    ("ranker.learning_rate=inf", "'ranker.learning_rate' must be a finite number, got inf"),
    ("fusion.attention_beta=nan", "'fusion.attention_beta' must be a finite number, got nan"),
    ("fusion.weights.text=inf", "'fusion.weights.text' must be a finite number, got inf"),
    ("fusion.event_weights={view=nan}", "'fusion.event_weights.view' must be a finite number, got nan"),
    # a seed numpy or LightGBM refuses is refused here, before the embedding (before: a crash in the index stage)
    ("ranker.seed=-3", "'ranker.seed': Input should be greater than or equal to 0, got -3"),
    ("ranker.seed=2147483648", "'ranker.seed': Input should be less than or equal to 2147483647"),
])
def test_bad_overrides_name_the_key(override: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(overrides=[override])
    assert message in str(info.value)


def test_bad_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[embed\n")
    with pytest.raises(ConfigError, match=str(bad)):
        load_config(bad)


def test_override_values_are_read_as_toml() -> None:
    assert parse_override("a.b=3") == {"a": {"b": 3}}
    assert parse_override("a.b=word") == {"a": {"b": "word"}}
    assert parse_override("a=true") == {"a": True}


def test_faiss_factory_strings_are_accepted() -> None:
    for factory in ("auto", "Flat", "IVF64,Flat", "HNSW32", "IVF256,PQ16", "OPQ16_64,IVF256,PQ16"):
        assert load_config(overrides=[f"index.factory='{factory}'"]).index.factory == factory


def test_a_directory_or_non_utf8_config_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="is a directory"):
        load_config(tmp_path)
    bad = tmp_path / "latin1.toml"
    bad.write_bytes(b'[embed.text]\nmodel = "caf\xe9"\n')
    with pytest.raises(ConfigError, match=r"line 2: not valid UTF-8 \(byte 0xe9\)"):
        load_config(bad)


def test_every_existing_key_keeps_its_default() -> None:
    d = Config().to_dict()
    assert d["engine"] == "local" and d["export"] == {"k": 10, "pseudonymise": True,
                                                       "key_env": "FUSIONREC_EXPORT_KEY", "key_file": ""}
    assert d["sources"] == {"names": ["auto"], "fused": True, "relevance": 0.0, "recent_items": 30,
                            "recent_half_life": 6.6, "ease_max_items": 20000, "validation_users": 3000,
                            "als_screen_seeds": 2,
                            "tag_min_items": 5}
    assert d["ranker"]["labels"] == "auto" and d["ranker"]["label_fraction"] == 0.2
    assert d["ranker"]["label_window_days"] == 14.0 and d["ranker"]["guard"] is True
    assert d["fusion"]["event_weights"] == {"purchase": 4.0, "cart": 3.0, "click": 2.0, "view": 1.0}
    assert d["ray"] == {"address": "", "num_actors": 2, "num_gpus_per_actor": 0.0, "batch_size": 64,
                        "scoring_batch_users": 1000}
    assert d["tracking"] == {"mlflow_uri": "", "experiment": "fusionrec"}


def test_event_weights_named_in_part_keep_the_other_defaults(tmp_path: Path) -> None:
    # Setting one event's weight left the others to profiles' built-ins (cart 2.5, click 1, view 0.5),
    # not the documented defaults, and the manifest's config did not show them.
    expected = {"purchase": 5.0, "cart": 3.0, "click": 2.0, "view": 1.0}
    assert load_config(overrides=["fusion.event_weights.purchase=5"]).fusion.event_weights == expected
    toml = tmp_path / "c.toml"
    toml.write_text("[fusion.event_weights]\npurchase = 5\nlike = 2.5\n")
    assert load_config(toml).to_dict()["fusion"]["event_weights"] == {**expected, "like": 2.5}
    assert load_config(overrides=["fusion.event_weights={view=0}"]).fusion.event_weights["view"] == 0.0


def test_config_is_frozen_and_replace_revalidates() -> None:
    import dataclasses

    from pydantic import ValidationError

    cfg = Config()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.ranker.seed = 3  # type: ignore[misc]
    assert dataclasses.replace(cfg.ranker, seed=3).seed == 3
    with pytest.raises(ValidationError):
        dataclasses.replace(cfg.export, k=0)


def test_every_source_name_is_known() -> None:
    names = ["ease", "recent_ease", "itemknn", "recent_itemknn", "sequence", "gru", "als", "popular",
             "segment_popular"]
    assert load_config(overrides=[f"sources.names={names!r}"]).sources.names == names


def test_naming_ease_for_a_catalog_above_its_bound_is_a_config_error() -> None:
    """`auto` leaves EASE out above sources.ease_max_items; naming it there must not bypass the
    bound silently (items x items matrices), and raising the bound is the way to allow it."""
    from fusionrec.pipeline.retrieval.stage import source_names

    named = load_config(overrides=["sources.names=['als','recent_ease']", "sources.ease_max_items=1000"])
    with pytest.raises(ConfigError, match=r"names recent_ease, which holds items x items matrices: 5,000 items "
                                          r"is above sources.ease_max_items = 1,000"):
        source_names(named, 5_000)
    assert source_names(named, 1_000)[:2] == ["als", "recent_ease"]
    auto = load_config(overrides=["sources.ease_max_items=1000"])
    assert "ease" not in source_names(auto, 5_000) and "ease" in source_names(auto, 1_000)
    allowed = load_config(overrides=["sources.names=['als','recent_ease']", "sources.ease_max_items=5000"])
    assert source_names(allowed, 5_000)[:2] == ["als", "recent_ease"]


def test_a_fusion_weight_no_modality_has_is_said(caplog: pytest.LogCaptureFixture) -> None:
    """A typo ("txt") is a warning naming it beside the modalities; weights on it alone are an error."""
    from fusionrec.pipeline.retrieval.params import RetrieverParams
    from fusionrec.pipeline.retrieval.weight_search import fixed_weights

    modalities = ("text", "image", "behaviour")
    with caplog.at_level("WARNING", logger="fusionrec"):
        weights = fixed_weights(RetrieverParams(weights={"txt": 1.0, "image": 0.5}), modalities)
    assert weights == {"text": 0.0, "image": 1.0, "behaviour": 0.0}
    assert "'fusion.weights' names txt" in caplog.text and "modalities: text, image, behaviour" in caplog.text
    with pytest.raises(ConfigError, match=r"'fusion.weights': .* not a modality here: txt"):
        fixed_weights(RetrieverParams(weights={"txt": 1.0}), modalities)


def test_a_config_saved_with_a_byte_order_mark_reads(tmp_path: Path) -> None:
    """Windows editors write UTF-8 with a BOM; CSVs with one are read, so configs are too."""
    path = tmp_path / "fusionrec.toml"
    path.write_bytes(b"\xef\xbb\xbf[export]\nk = 7\n")
    assert load_config(path, []).export.k == 7
