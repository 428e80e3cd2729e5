"""The Ray engine gives the local engine's outputs: embedding tables, failures, top-k exports.

Runs on a local Ray runtime (2 CPUs, started once for the module). Tests that need Ray
are skipped when it (the optional `ray` extra) is not installed; the pieces around it
(one scoring batch, the streamed export, the engine dispatch) are tested either way.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import logging
import os
import shutil
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from polars.testing import assert_frame_equal

from fusionrec.pipeline.config import AudioConfig, Config, EmbedConfig, ImageConfig, RayConfig, TextConfig
from fusionrec.pipeline.embedding.job import read_artifact_table, run_embed
from fusionrec.pipeline.errors import FusionrecError
from tests.tiny_models import tiny_text_model

PROJECT = Path(__file__).resolve().parents[1]
SAMPLE = PROJECT / "data"


@pytest.fixture(scope="module")
def ray_local():
    ray = pytest.importorskip("ray", reason="Ray is an optional extra (pip install 'fusionrec[ray]')")
    with pytest.MonkeyPatch.context() as mp:  # workers inherit these; restored after the module
        for key, value in {"RAY_DISABLE_USAGE_STATS": "1", "RAY_USAGE_STATS_ENABLED": "0",
                           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}.items():
            mp.setenv(key, os.environ.get(key, value))
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, ignore_reinit_error=True)
        yield ray
        ray.shutdown()


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_text_model(tmp_path_factory.mktemp("tiny") / "bert")


def embed_config(engine: str, tiny: Path) -> Config:
    # One encoder actor: with 2 CPUs a second one would hold the CPU the next dataset's
    # set-up waits for; several batches of 4 rows still go through the actor path.
    return Config(engine=engine, ray=RayConfig(num_actors=1, batch_size=4),
                  embed=EmbedConfig(device="cpu", shard_size=5, decode_workers=2,
                                    text=TextConfig(model=str(tiny), batch_size=4),
                                    image=ImageConfig(model="test_efficientnet", weights="none", batch_size=4),
                                    audio=AudioConfig(enabled=False)))


def tiny_catalog(root: Path) -> Path:
    """12 sample items with text and images (one corrupt, one missing)."""
    if not (SAMPLE / "items.csv").is_file():
        pytest.skip("data/ sample not generated (run: make sample)")
    data = root / "data"
    (data / "images").mkdir(parents=True)
    items = pl.read_csv(SAMPLE / "items.csv", infer_schema=False).drop_nulls("image").head(12).drop("audio")
    for rel in items["image"].to_list():
        shutil.copy(SAMPLE / rel, data / rel)
    (data / "images" / "i0003.jpg").write_bytes(b"not a jpeg at all")
    (data / "images" / "i0008.jpg").unlink()
    items.write_csv(data / "items.csv")
    pl.DataFrame({"user_id": ["u1", "u2"], "item_id": ["i0001", "i0002"], "timestamp": ["1", "2"]}) \
        .write_csv(data / "interactions.csv")
    return data


def tables(art: Path) -> dict[str, tuple]:
    return {p.stem: read_artifact_table(p) for p in sorted((art / "embeddings").glob("*_*.parquet"))
            if p.name != "failures.parquet"}


def assert_same_tables(local: Path, other: Path) -> None:
    a, b = tables(local), tables(other)
    assert sorted(a) == sorted(b)
    for name in a:
        ids_a, hashes_a, models_a, vec_a = a[name]
        ids_b, hashes_b, models_b, vec_b = b[name]
        assert ids_a == ids_b, name
        assert hashes_a == hashes_b, name
        assert models_a == models_b, name
        np.testing.assert_allclose(vec_a, vec_b, atol=1e-5, err_msg=name)
    fail_a = pl.read_parquet(local / "embeddings" / "failures.parquet")
    fail_b = pl.read_parquet(other / "embeddings" / "failures.parquet")
    assert_frame_equal(fail_a, fail_b)


def test_ray_engine_writes_the_local_engines_tables_and_failures(tmp_path: Path, ray_local, tiny_model: Path) -> None:
    data = tiny_catalog(tmp_path)
    local = run_embed(data, tmp_path / "local", embed_config("local", tiny_model), show_progress=False)
    on_ray = run_embed(data, tmp_path / "ray", embed_config("ray", tiny_model), show_progress=False)

    assert_same_tables(tmp_path / "local", tmp_path / "ray")
    assert sorted(on_ray.counts) == ["item_image", "item_text"]
    for name, c in on_ray.counts.items():
        ref = local.counts[name]
        assert (c.rows, c.encoded, c.reused, c.failed, c.model) == (ref.rows, ref.encoded, ref.reused, ref.failed,
                                                                    ref.model)
    assert on_ray.counts["item_text"].encoded == 12
    assert on_ray.counts["item_image"].encoded == 10
    failures = pl.read_parquet(tmp_path / "ray" / "embeddings" / "failures.parquet").sort("id")
    assert failures["id"].to_list() == ["i0003", "i0008"]
    errors = dict(zip(failures["id"], failures["error"]))
    assert "not a recognised image format" in errors["i0003"] and "not found" in errors["i0008"]
    assert not (tmp_path / "ray" / "embeddings" / ".shards").exists()  # shards cleared as locally

    # A rerun on Ray after one image changes encodes that one row; the rest is reused.
    from PIL import Image

    with Image.open(data / "images" / "i0005.jpg") as img:
        img.transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(data / "images" / "i0005.jpg")
    again = run_embed(data, tmp_path / "ray", embed_config("ray", tiny_model), show_progress=False)
    assert (again.counts["item_image"].encoded, again.counts["item_image"].reused) == (1, 9)
    assert (again.counts["item_text"].encoded, again.counts["item_text"].reused) == (0, 12)
    run_embed(data, tmp_path / "local", embed_config("local", tiny_model), show_progress=False)
    assert_same_tables(tmp_path / "local", tmp_path / "ray")


def test_an_encoder_error_on_an_actor_fails_the_job_with_its_cause(tmp_path: Path, ray_local,
                                                                   tiny_model: Path) -> None:
    from fusionrec.pipeline.embedding.job import ModalityEncoder

    def broken(inputs: list) -> np.ndarray:  # a closure: shipped to the actors by value
        raise RuntimeError("boom on the actor")

    data = tiny_catalog(tmp_path)
    with pytest.raises(FusionrecError, match="Ray encoding of item text failed: .*boom on the actor"):
        run_embed(data, tmp_path / "art", embed_config("ray", tiny_model), show_progress=False,
                  encoders={"text": ModalityEncoder("broken-v1", 4, broken)})
    assert not (tmp_path / "art" / "embeddings" / "item_text.parquet").exists()


def test_an_actor_decodes_and_encodes_a_batch_like_the_local_engine(tmp_path: Path, tiny_model: Path) -> None:
    """The actor's work, run in-process: vectors for good files, the local error text for bad ones."""
    from fusionrec.pipeline.embedding.job import build_encoders, prepare_one
    from fusionrec.pipeline.embedding.ray_engine import EncodeActor

    data = tiny_catalog(tmp_path)
    cfg = embed_config("ray", tiny_model).embed
    local = build_encoders(cfg, {"image"})["image"]
    paths = [data / "images" / name for name in ("i0001.jpg", "i0003.jpg", "i0002.jpg", "i0008.jpg")]
    actor = EncodeActor((cfg, "image"), local.model_id, local.dim, decode_workers=2)
    out = actor({"row": np.array([7, 3, 9, 1]), "id": np.array(["a", "b", "c", "d"], dtype=object),
                 "content_hash": np.array(["h7", "h3", "h9", "h1"], dtype=object),
                 "input": np.array([str(p) for p in paths], dtype=object)})

    assert out["row"].tolist() == [7, 3, 9, 1]
    assert out["id"].tolist() == ["a", "b", "c", "d"] and out["content_hash"].tolist() == ["h7", "h3", "h9", "h1"]
    assert out["error"].tolist() == ["", prepare_one(local, paths[1])[1], "", prepare_one(local, paths[3])[1]]
    assert "not a recognised image format" in out["error"][1] and "not found" in out["error"][3]
    good = local.encode([prepare_one(local, paths[0])[0], prepare_one(local, paths[2])[0]])
    np.testing.assert_allclose(out["vector"][[0, 2]], good, atol=1e-5)
    assert not out["vector"][[1, 3]].any()

    with pytest.raises(FusionrecError, match="install the same model packages"):
        EncodeActor((cfg, "image"), "timm:some-other-model", local.dim)


def test_unknown_engine_is_a_config_error(tmp_path: Path, tiny_model: Path) -> None:
    from fusionrec.pipeline.config import load_config
    from fusionrec.pipeline.errors import ConfigError

    # The typed config refuses it before any stage runs, naming the key and the choices.
    with pytest.raises(ConfigError, match=r"engine.*local.*ray|engine.*ray.*local"):
        load_config(None, ["engine=spark"])
    with pytest.raises(ValueError, match="engine"):
        embed_config("spark", tiny_model)
    assert not (tmp_path / "art").exists()


def test_engine_ray_without_ray_installed_says_how_to_install_it(tmp_path: Path, tiny_model: Path,
                                                                 monkeypatch) -> None:
    import sys

    data = tiny_catalog(tmp_path)
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` now fails as if it were not installed
    with pytest.raises(FusionrecError, match=r"engine 'ray' needs Ray: pip install 'fusionrec\[ray\]'"):
        run_embed(data, tmp_path / "art", embed_config("ray", tiny_model), show_progress=False)
    assert not (tmp_path / "art" / "embeddings").exists()  # refused before any work


# ------------------------------------------------------------------------ batch scoring


@pytest.fixture(scope="module")
def fitted(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path) -> Path:
    """Artifacts of the shipped sample (text only, tiny encoder): embed, index, train."""
    if not (SAMPLE / "items.csv").is_file():
        pytest.skip("data/ sample not generated (run: make sample)")
    from fusionrec.pipeline.retrieval.stage import run_index
    from fusionrec.ranker.training import run_train

    root = tmp_path_factory.mktemp("fitted")
    art, data = root / "art", root / "data"
    shutil.copytree(SAMPLE, data)
    # One user with neither history nor text: served the popular items, by every engine.
    users = pl.read_csv(data / "users.csv", infer_schema=False)
    active = set(pl.read_csv(data / "interactions.csv", infer_schema=False)["user_id"].to_list())
    idle = next(u for u in users["user_id"].to_list() if u not in active)
    users.with_columns(pl.when(pl.col("user_id") == idle).then(None).otherwise(pl.col("text")).alias("text")
                       ).write_csv(data / "users.csv")
    cfg = embed_config("local", tiny_model)
    cfg = dataclasses.replace(cfg, embed=dataclasses.replace(cfg.embed, image=ImageConfig(enabled=False)))
    run_embed(data, art, cfg, show_progress=False)
    run_index(data, art, cfg)
    run_train(art, cfg)
    return art


def test_batch_scoring_serves_every_user_recommend_serves(fitted: Path) -> None:
    """The Ray driver's user list is recommend(None)'s, read without loading the model; before,
    it was the index's users, which leaves out a user with neither history nor content."""
    from fusionrec.ranker.serving.ray_scoring import known_users
    from fusionrec.ranker.serving.recommender import Recommender

    served = Recommender(fitted).recommend(None, 5)
    assert known_users(fitted) == sorted(served["user_id"].unique().to_list())
    assert "popular" in served["source"].to_list()


def test_ray_batch_scoring_equals_recommend_for_all_users(fitted: Path, ray_local) -> None:
    from fusionrec.ranker.serving.ray_scoring import recommend_all
    from fusionrec.ranker.serving.recommender import Recommender

    local = Recommender(fitted).recommend(None, 10)
    rc = RayConfig(num_actors=2, scoring_batch_users=16)  # 120 users: 8 batches over 2 actors
    on_ray = recommend_all(fitted, 10, rc)
    assert local.height > 0 and local["user_id"].n_unique() > 16
    assert_frame_equal(local, on_ray, check_exact=False, rel_tol=1e-6, abs_tol=1e-9)


@pytest.mark.parametrize("address", ["auto", "ray://head:10001"])
def test_a_ray_address_that_cannot_be_joined_is_one_clear_error_not_a_damaged_artifact(
        fitted: Path, tmp_path: Path, monkeypatch, address: str) -> None:
    """Before, `recommend --engine ray` with ray.address = "auto" and no cluster said the artifacts
    were damaged ("rerun `fusionrec run` to rebuild them") and `embed` reported an unexpected
    ConnectionError (a crash log); now both say that Ray could not be joined, naming ray.address."""
    ray = pytest.importorskip("ray", reason="Ray is an optional extra (pip install 'fusionrec[ray]')")
    from fusionrec.jobs import run_recommend

    def refuse(*args, **kwargs):  # what ray.init raises when nothing runs at the address
        raise ConnectionError("Could not find any running Ray instance. Please specify the one to connect to")

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", refuse)
    cfg = Config(engine="ray", ray=RayConfig(address=address))
    export = tmp_path / "recs.csv"
    with pytest.raises(FusionrecError) as caught:
        run_recommend(fitted, export, cfg)
    message = str(caught.value)
    assert type(caught.value) is FusionrecError and caught.value.exit_code == 1
    assert f"ray.address = {address!r}" in message and "ConnectionError: Could not find any running Ray" in message
    assert "damaged" not in message and "rebuild" not in message
    assert not export.exists()


def closed_port() -> int:
    """A local port where nothing listens (bound by the system, then let go)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def listening_address() -> Iterator[str]:
    """host:port of a local socket that accepts connections (a head that is up, to the probe)."""
    with socket.socket() as head:
        head.bind(("127.0.0.1", 0))
        head.listen()
        yield f"127.0.0.1:{head.getsockname()[1]}"


@pytest.fixture
def ray_joins(monkeypatch) -> list[str | None]:
    """The addresses ray.init is asked to join, with Ray itself never started (and no
    RAY_ADDRESS from the environment the tests run in)."""
    ray = pytest.importorskip("ray", reason="Ray is an optional extra (pip install 'fusionrec[ray]')")
    joined: list[str | None] = []
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda address=None, **kwargs: joined.append(address))
    monkeypatch.setattr(ray, "shutdown", lambda: None)
    return joined


def test_a_ray_address_where_nothing_listens_fails_at_once_naming_ray_address(ray_joins) -> None:
    """Before, ray.address = "127.0.0.1:<a closed port>" had ray.init retry the head for 82 s
    (Ray 2.60) and the job looked hung; now a connect probe fails first, in the error of 1b25c12."""
    from fusionrec.pipeline.embedding.ray_engine import ray_runtime

    joined = ray_joins
    address = f"127.0.0.1:{closed_port()}"
    started = time.monotonic()
    with pytest.raises(FusionrecError) as caught, ray_runtime(RayConfig(address=address)):
        pass
    assert time.monotonic() - started < 5
    assert joined == []  # Ray was never asked to join it
    assert type(caught.value) is FusionrecError and caught.value.exit_code == 1
    assert str(caught.value) == (
        f"engine 'ray': cannot join the Ray cluster at ray.address = {address!r}: ConnectionError: nothing "
        f"listens at {address} (connection refused); check ray.address (\"\" starts a local runtime, \"auto\" "
        "joins a running one), or run with --engine local")

    # Where a head listens, the probe lets ray.init join it as before.
    with listening_address() as address, ray_runtime(RayConfig(address=address)):
        pass
    assert joined == [address]


def test_a_dead_ray_address_in_the_environment_fails_at_once_naming_ray_address_env(ray_joins, monkeypatch) -> None:
    """ray.init joins RAY_ADDRESS where ray.address is "" or "auto"; one where nothing listens
    hung as long as a dead ray.address did. It is probed as well, and the error names it."""
    from fusionrec.pipeline.embedding.ray_engine import ray_runtime

    joined = ray_joins
    dead = f"127.0.0.1:{closed_port()}"
    monkeypatch.setenv("RAY_ADDRESS", dead)
    for setting in ("", "auto"):
        started = time.monotonic()
        with pytest.raises(FusionrecError) as caught, ray_runtime(RayConfig(address=setting)):
            pass
        assert time.monotonic() - started < 5
        assert str(caught.value) == (
            f"engine 'ray': cannot join the Ray cluster at RAY_ADDRESS = {dead!r} (the environment; ray.address = "
            f"{setting!r}): ConnectionError: nothing listens at {dead} (connection refused); check ray.address "
            "(\"\" starts a local runtime, \"auto\" joins a running one) and RAY_ADDRESS, or run with --engine local")
    assert joined == []
    # An explicit ray.address wins over the environment (as in ray.init): only it is probed.
    with listening_address() as address:
        with ray_runtime(RayConfig(address=address)):
            pass
        monkeypatch.setenv("RAY_ADDRESS", address)  # a live one in the environment: joined as before
        with ray_runtime(RayConfig(address="")):
            pass
    assert joined == [address, None]


def test_the_probe_checks_host_port_addresses_only_and_says_why_it_cannot_connect(monkeypatch) -> None:
    from fusionrec.pipeline.embedding import ray_engine
    from fusionrec.pipeline.embedding.ray_engine import head_address, probe_address

    assert [head_address(a) for a in ("", "auto", "local", "ray://head:10001", "head", "head:port")] == [None] * 6
    assert head_address(" 10.0.0.5:6379 ") == ("10.0.0.5", 6379)
    assert head_address("[::1]:6379") == ("::1", 6379)
    probe_address("auto")  # Ray's own to resolve: nothing is tried here

    def dropped(target, timeout):  # a firewall that drops the packets
        raise TimeoutError("timed out")

    monkeypatch.setattr(ray_engine.socket, "create_connection", dropped)
    with pytest.raises(ConnectionError, match=r"^no answer from 10\.0\.0\.5:6379 within 5 s$"):
        probe_address("10.0.0.5:6379")

    def unknown(target, timeout):
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(ray_engine.socket, "create_connection", unknown)
    with pytest.raises(ConnectionError, match=r"^cannot resolve the host 'no-such-head' \(Name or service not known\)$"):
        probe_address("no-such-head:6379")


# The pieces around Ray, checked without it: what one batch computes, and the streamed export.


def test_a_recommender_on_a_memory_mapped_index_recommends_the_same(fitted: Path) -> None:
    """What each Ray scoring actor loads (the index memory-mapped) serves what a local load does."""
    from fusionrec.ranker.serving.recommender import Recommender

    local = Recommender(fitted).recommend(None, 10)
    mapped = Recommender(fitted, mmap_index=True)
    assert mapped.retriever_.index_.ntotal == Recommender(fitted).retriever_.index_.ntotal > 0
    got = mapped.recommend(None, 10)
    assert got["user_id"].to_list() == local["user_id"].to_list()
    assert got["item_id"].to_list() == local["item_id"].to_list()
    np.testing.assert_allclose(got["score"].to_numpy(), local["score"].to_numpy(), rtol=0, atol=1e-6)


def test_one_batch_scores_like_recommend(fitted: Path) -> None:
    from fusionrec.ranker.serving.ray_scoring import score_users
    from fusionrec.ranker.serving.recommender import Recommender

    rec = Recommender(fitted)
    everyone = rec.recommend(None, 5)
    batch = sorted(everyone["user_id"].unique().to_list())[3:9]
    # Without fallback, a batch gives exactly those users' rows of recommend(None).
    assert_frame_equal(score_users(rec, batch, 5, fallback=False),
                       everyone.filter(pl.col("user_id").is_in(batch)))
    # With fallback (a user list was given), unknown users get the popular list, as recommend(users) does.
    some = batch[:2] + ["nobody"]
    got = score_users(rec, some, 5, fallback=True)
    assert_frame_equal(got, rec.recommend(some, 5))
    # A user nobody knows gets the most popular items (popularity is the only thing to go on).
    share = rec.sources_.sources_["popular"].share_
    top = set(share.argsort(kind="stable")[::-1][:5])
    nobody = got.filter(pl.col("user_id") == "nobody")["item_id"].to_list()
    assert len(nobody) == 5 and {int(i) for i in np.flatnonzero(np.isin(rec.sources_.item_ids_, nobody))} <= \
        set(np.flatnonzero(share >= share[list(top)].min()))
    assert_frame_equal(score_users(rec, some, 5, fallback=False), got.filter(pl.col("user_id") != "nobody"))


def test_streamed_export_is_the_sorted_pseudonymised_topk(fitted: Path, tmp_path: Path, monkeypatch) -> None:
    from fusionrec.ranker.serving import ray_scoring
    from fusionrec.ranker.serving.export import read_topk, write_topk
    from fusionrec.ranker.serving.privacy import pseudonymise
    from fusionrec.ranker.serving.recommender import Recommender

    local = Recommender(fitted).recommend(None, 10)
    users = sorted(local["user_id"].unique().to_list())

    def batches(art_dir, k, ray_config=None, **options):  # what the actors return, batch by batch
        for s in range(0, len(users), 16):
            yield local.filter(pl.col("user_id").is_in(users[s:s + 16]))

    monkeypatch.setattr(ray_scoring, "iter_recommendations", batches)
    key = b"k" * 32
    stats = ray_scoring.write_all(fitted, tmp_path / "topk.parquet", 10, key=key)
    assert stats == {"rows": local.height, "users": len(users)}
    expected = read_topk(write_topk(pseudonymise(local, key), tmp_path / "expected.parquet"))
    assert_frame_equal(read_topk(tmp_path / "topk.parquet"), expected)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]
    with pytest.raises(FusionrecError, match="Parquet"):
        ray_scoring.write_all(fitted, tmp_path / "topk.csv", 10)


@pytest.mark.parametrize(("root_level", "console_level"), [(logging.WARNING, logging.ERROR),
                                                           (logging.INFO, logging.INFO)])
def test_ray_datas_console_follows_fusionrecs_verbosity(ray_local, root_level: int, console_level: int) -> None:
    """Ray Data's plan and timing lines (INFO) reach stderr only with -v (the root logger at INFO)."""
    from fusionrec.pipeline.embedding.ray_engine import ray_runtime

    root, ray_data = logging.getLogger(), logging.getLogger("ray.data")
    before = root.level
    foreign = logging.StreamHandler(io.StringIO())  # a host application's (or pytest's) handler
    root.setLevel(root_level)
    ray_data.addHandler(foreign)
    try:
        with ray_runtime(RayConfig()):
            handlers = list(ray_data.handlers)
    finally:
        root.setLevel(before)
        ray_data.removeHandler(foreign)
    consoles = [h for h in handlers if type(h).__module__.startswith("ray.") and isinstance(h, logging.StreamHandler)]
    assert consoles and {h.level for h in consoles} == {console_level}
    assert foreign.level == logging.NOTSET  # not Ray's: left alone


def test_rays_default_token_auth_note_goes_to_debug_and_a_disabled_warning_stays(caplog) -> None:
    """Ray announces its default (token authentication on, for a local runtime) with a WARNING
    in its own format on every run; fusionrec keeps that at debug. The warning that
    authentication is disabled is a security note and still reaches the console."""
    from fusionrec.pipeline.embedding.ray_engine import quiet_ray_auth_note

    logger = logging.getLogger("ray._private.authentication.authentication_token_setup")
    quiet_ray_auth_note()
    quiet_ray_auth_note()  # once per process, however many runtimes start
    assert sum(type(f).__name__ == "_DefaultTokenAuthNote" for f in logger.filters) == 1
    # At debug on fusionrec's own logger too: a CLI test earlier in the session leaves
    # `fusionrec` at the level its --log-level chose, which would drop the debug line.
    with caplog.at_level(logging.DEBUG), caplog.at_level(logging.DEBUG, logger="fusionrec.ray"):
        logger.warning("Token authentication is enabled for this Ray cluster. Set RAY_AUTH_MODE=disabled ...")
        logger.warning("Token authentication is disabled for this Ray cluster. Anyone with network access ...")
    kept = [(r.name, r.levelno, r.getMessage()[:40]) for r in caplog.records]
    assert kept == [("fusionrec.ray", logging.DEBUG, "ray: Token authentication is enabled for"),
                    (logger.name, logging.WARNING, "Token authentication is disabled for thi")]
