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


@pytest.mark.parametrize(("override", "message"), [
    ("embed.text.bogus=1", "unknown config key 'embed.text.bogus'"),
    ("embed.text.batch_size=abc", "'embed.text.batch_size' must be an integer, got 'abc'"),
    ("embed.text.enabled=1", "'embed.text.enabled' must be true or false"),
    ("fusion.weights=3", "'fusion.weights' must be a table"),
    ("nosection", "must look like section.key=value"),
    ("embed.batch_rows=0", "'embed.batch_rows' must be at least 1, got 0"),
    ("embed.shard_size=-4", "'embed.shard_size' must be at least 1, got -4"),
])
def test_bad_overrides_name_the_key(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_config(overrides=[override])


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
