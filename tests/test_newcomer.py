"""A newcomer's first hour: the README's quickstart run as written, its config block against the
defaults, and the messages and exit codes of `split`, `evaluate`, `doctor`, bad config values
and the conventional flags (--version, -v, --log-format json, --explain/--no-explain)."""

from __future__ import annotations

import errno
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import polars as pl
import pytest
from typer.testing import CliRunner

from fusionrec.cli import app
from fusionrec.evaluation import holdout
from fusionrec.pipeline.config import Config, load_config

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
FUSIONREC = Path(sys.executable).parent / "fusionrec"
FAST = ["--set", "embed.image.enabled=false", "--set", "embed.audio.enabled=false"]


def invoke(*args: str):
    return CliRunner().invoke(app, list(args))


def readme_section(title: str) -> str:
    text = README.read_text(encoding="utf-8")
    start = text.index(f"## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start:end if end > 0 else None]


def code_blocks(section: str, lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", section, flags=re.S)


def flatten(d: dict, prefix: str = "") -> dict[str, object]:
    out: dict[str, object] = {}
    for key, value in d.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and value and not all(isinstance(v, (int, float)) for v in value.values()):
            out.update(flatten(value, dotted + "."))
        else:
            out[dotted] = value
    return out


def fusionrec(*args: str, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([str(FUSIONREC), *args], cwd=cwd, capture_output=True, text=True, timeout=900,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "200", **(env or {})})


# ----------------------------------------------------------------------------- README

def test_readme_config_block_is_the_defaults(tmp_path: Path) -> None:
    blocks = code_blocks(readme_section("Configuration"), "toml")
    assert len(blocks) == 1, "the Configuration section has one TOML block, the complete list of keys"
    parsed = tomllib.loads(blocks[0])
    documented, defaults = flatten(parsed), flatten(Config().to_dict())
    assert sorted(set(defaults) - set(documented)) == [], "keys missing from the README"
    assert sorted(set(documented) - set(defaults)) == [], "README keys the code does not have"
    for key, value in defaults.items():
        assert documented[key] == value, f"README {key} = {documented[key]!r}, code default {value!r}"
    assert load_config(tmp_path / "readme.toml" if (tmp_path / "readme.toml").write_text(blocks[0]) else None) \
        == Config()


def quickstart_commands() -> list[list[str]]:
    blocks = code_blocks(readme_section("Quickstart"), "bash")
    fusionrec_blocks = [b for b in blocks if b.lstrip().startswith(".venv/bin/fusionrec")]
    assert len(fusionrec_blocks) == 1, "the Quickstart has one block of fusionrec commands"
    return [shlex.split(line.split("#")[0]) for line in fusionrec_blocks[0].splitlines() if line.strip()]


def test_quickstart_splits_before_it_evaluates() -> None:
    names = [cmd[1] for cmd in quickstart_commands()]
    assert names.index("split") < names.index("run") < names.index("evaluate")


@pytest.fixture(scope="module")
def quickstart(tmp_path_factory: pytest.TempPathFactory, sample_data: Path) -> dict:
    """The README's quickstart commands, run as written in a fresh folder with `data/` beside them."""
    cwd = tmp_path_factory.mktemp("quickstart")
    (cwd / "data").symlink_to(sample_data, target_is_directory=True)
    results = {}
    for cmd in quickstart_commands():
        assert cmd[0] == ".venv/bin/fusionrec"
        done = fusionrec(*cmd[1:], cwd=cwd)
        results[cmd[1]] = done
        assert done.returncode == 0, f"{shlex.join(cmd)} exited {done.returncode}:\n{done.stdout}\n{done.stderr}"
    return {"cwd": cwd, "results": results}


@pytest.mark.integration
def test_quickstart_runs_as_written(quickstart: dict) -> None:
    cwd, results = quickstart["cwd"], quickstart["results"]
    for name in ("split", "run", "evaluate", "recommend"):
        assert "Traceback" not in results[name].stderr
    assert (cwd / "split" / "train" / "items.csv").is_file() and (cwd / "split" / "held_out.csv").is_file()
    assert (cwd / "artifacts" / "exports" / "topk.parquet").is_file()
    assert (cwd / "report.html").is_file() and (cwd / "recs.csv").is_file()
    evaluate = results["evaluate"].stdout
    assert "fusionrec" in evaluate and "item-kNN" in evaluate and "NaN" not in evaluate and "nan" not in evaluate
    # Data tables on stdout; progress and logs on stderr; no third-party INFO lines without -v.
    run_out = results["run"].stdout
    assert "nightly job" in run_out and not re.search(r"\d+/[\d?]+\s+\d+:\d\d:\d\d", run_out)  # no progress bars
    assert re.search(r"│\s*total\s*│\s*[\d.]+\s*│", run_out), run_out
    assert re.search(r"^exported \d+ rows for \d+ users to artifacts/exports/topk.parquet$", run_out, re.M)
    for name in ("run", "evaluate", "recommend"):
        assert "Loading faiss" not in results[name].stderr + results[name].stdout


@pytest.mark.integration
def test_the_report_is_one_to_trust(quickstart: dict) -> None:
    page = (quickstart["cwd"] / "report.html").read_text(encoding="utf-8")
    text = re.sub(r'src="data:[^"]+"', 'src=""', page)
    for plot in ("metric_curves", "slices", "popularity_lorenz"):
        assert f'data-plot="{plot}"' in text
    assert "<h2>Headline</h2>" in text and "95% interval" in text
    assert re.search(r"<td>ndcg@10</td><td>0\.\d{4}</td><td>\[0\.\d{4}, 0\.\d{4}\]</td>", text)
    assert "Bands: 95% bootstrap intervals" in text and "k = 1, 2, 3, 5, 10, 15, 20" in text
    assert "<h2>Run metadata</h2>" in text and "training data hash" in text and "torch" in text
    assert "held-out hash" in text and "<summary>config</summary>" in text
    # One Gini: the summary's gini@10 is the Lorenz table's Gini of fusionrec.
    summary_gini = re.search(r"<td>gini</td><td>(0\.\d{4})</td>", text)
    lorenz_gini = re.search(r"<td>fusionrec</td><td>(0\.\d{4})</td><td>\d+</td><td>\d+</td>", text)
    assert summary_gini and lorenz_gini and summary_gini.group(1) == lorenz_gini.group(1)
    if "Feature importance" in text:
        assert "Importance type: gain" in text


@pytest.mark.integration
def test_evaluate_refuses_what_it_cannot_score(quickstart: dict, tmp_path: Path) -> None:
    cwd = quickstart["cwd"]
    art = str(cwd / "artifacts")
    in_training = tmp_path / "in_training.csv"
    pl.read_csv(cwd / "split" / "train" / "interactions.csv").tail(100).write_csv(in_training)
    report = tmp_path / "r.html"
    result = invoke("evaluate", "--out", art, "--test", str(in_training), "--report", str(report), "-q")
    message = " ".join(result.output.split())
    assert result.exit_code == 2, result.output
    assert "no scorable user" in message and "already in the training log" in message
    assert "fusionrec split --data DATA --out SPLIT" in message and not report.exists()

    unrated = tmp_path / "unrated.csv"
    pl.read_csv(cwd / "split" / "held_out.csv").drop("value").write_csv(unrated)
    result = invoke("evaluate", "--out", art, "--test", str(unrated), "--relevance", "4", "-q")
    assert result.exit_code == 2 and "--relevance 4.0 needs ratings" in " ".join(result.output.split())

    rated = tmp_path / "rated.csv"
    held = pl.read_csv(cwd / "split" / "held_out.csv")
    held.with_columns(value=pl.lit(2.0)).write_csv(rated)
    result = invoke("evaluate", "--out", art, "--test", str(rated), "--relevance", "4", "-q")
    assert result.exit_code == 2 and "at or above --relevance 4;" in " ".join(result.output.split())
    held.with_columns(value=pl.when(pl.int_range(pl.len()) % 2 == 0).then(5.0).otherwise(1.0)).write_csv(rated)
    result = invoke("evaluate", "--out", art, "--test", str(rated), "--relevance", "4", "-q", "--no-baselines")
    assert result.exit_code == 0, result.output


@pytest.mark.integration
def test_recommend_writes_under_out_and_logs_as_json(quickstart: dict, tmp_path: Path) -> None:
    art = tmp_path / "art"
    import shutil

    shutil.copytree(quickstart["cwd"] / "artifacts", art)
    (art / "exports" / "topk.parquet").unlink()
    done = fusionrec("--log-format", "json", "recommend", "--out", str(art), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert (art / "exports" / "topk.parquet").is_file() and not (tmp_path / "artifacts").exists()
    lines = [json.loads(line) for line in done.stderr.splitlines() if line.strip()]
    assert lines and all({"time", "level", "logger", "message"} <= set(entry) for entry in lines)
    assert any("wrote" in entry["message"] for entry in lines)

    # Under JSON logs every stderr line is a JSON object: no progress bars, and the error is one too.
    data = quickstart["cwd"] / "data"
    rerun = fusionrec("--log-format", "json", "embed", "--data", str(data), "--out", str(art), cwd=tmp_path)
    assert rerun.returncode == 0, rerun.stderr
    assert all(isinstance(json.loads(line), dict) for line in rerun.stderr.splitlines() if line.strip()), rerun.stderr
    checked = fusionrec("--log-format", "json", "doctor", "--data", str(data), "--out", str(art), cwd=tmp_path)
    plan = [json.loads(line) for line in checked.stderr.splitlines() if line.strip()]
    assert checked.returncode == 0 and any(e["message"].startswith("a run would: embed:") for e in plan), checked.stderr
    failed = fusionrec("--log-format", "json", "recommend", "--out", str(tmp_path / "none"), cwd=tmp_path)
    entries = [json.loads(line) for line in failed.stderr.splitlines() if line.strip()]
    assert failed.returncode == 1 and entries[-1]["level"] == "ERROR", failed.stderr
    assert "fusionrec run" in entries[-1]["message"] and not (tmp_path / "none").exists()


# ----------------------------------------------------------------------------- config at the CLI

@pytest.mark.parametrize(("override", "key"), [
    ("fusion.method=bogus", "fusion.method"), ("ranker.objective=foo", "ranker.objective"),
    ("index.factory=garbage", "index.factory"), ("ranker.learning_rate=-1", "ranker.learning_rate"),
    ("embed.text.batch_size=0", "embed.text.batch_size"), ("fusion.validation_fraction=2", "fusion.validation_fraction"),
    ("fusion.behaviour_dim=-3", "fusion.behaviour_dim"), ("fusion.weights={text=-1}", "fusion.weights.text"),
    ("export.k=0", "export.k"), ("index.n_candidates=0", "index.n_candidates"),
])
def test_bad_config_values_exit_2_naming_the_key_before_any_stage(override: str, key: str, tmp_path: Path,
                                                                  sample_data: Path) -> None:
    out = tmp_path / "art"
    result = invoke("run", "--data", str(sample_data), "--out", str(out), "-q", "--set", override)
    assert result.exit_code == 2, result.output
    assert f"config key '{key}'" in " ".join(result.output.split())
    assert "Traceback" not in result.output and not out.exists()


def test_a_config_that_is_a_directory_or_not_utf8_exits_2(tmp_path: Path, sample_data: Path) -> None:
    result = invoke("run", "--data", str(sample_data), "--out", str(tmp_path / "a"), "--config", str(tmp_path))
    assert result.exit_code == 2 and "is a directory" in result.output
    bad = tmp_path / "bad.toml"
    bad.write_bytes(b"[export]\nkey_file = \"caf\xe9\"\n")
    result = invoke("run", "--data", str(sample_data), "--out", str(tmp_path / "a"), "--config", str(bad))
    assert result.exit_code == 2 and "not valid UTF-8" in result.output


def test_engine_is_a_choice() -> None:
    result = invoke("run", "--engine", "spark")
    assert result.exit_code == 2 and "spark" in result.output


# ----------------------------------------------------------------------------- split

def test_split_writes_a_train_directory_and_a_held_out_file(tmp_path: Path, sample_data: Path) -> None:
    out = tmp_path / "split"
    result = invoke("split", "--data", str(sample_data), "--out", str(out))
    assert result.exit_code == 0, result.output
    train = pl.read_csv(out / "train" / "interactions.csv")
    held = pl.read_csv(out / "held_out.csv")
    full = pl.read_csv(sample_data / "interactions.csv")
    assert train.height + held.height == full.height and held.height > 0
    assert train.join(held, on=["user_id", "item_id", "timestamp"], how="semi").height == 0
    # Each user's held-out rows are that user's latest.
    last_train = train.group_by("user_id").agg(pl.col("timestamp").max().alias("t"))
    first_held = held.group_by("user_id").agg(pl.col("timestamp").min().alias("h"))
    assert (last_train.join(first_held, on="user_id")["t"] <= last_train.join(first_held, on="user_id")["h"]).all()
    media = [p for p in (out / "train").rglob("*") if p.is_file() and p.parent.name in ("images", "audio")]
    assert media and not any(p.is_symlink() for p in (out / "train").rglob("*"))
    assert all(p.stat().st_nlink >= 2 for p in media)  # hard links: files of the new directory
    assert (out / "train" / "items.csv").read_bytes() == (sample_data / "items.csv").read_bytes()


@pytest.mark.parametrize("protocol", ["global", "leave-last"])
def test_split_protocols(protocol: str, tmp_path: Path, sample_data: Path) -> None:
    out = tmp_path / protocol
    result = invoke("split", "--data", str(sample_data), "--out", str(out), "--protocol", protocol,
                    "--media", "copy")
    assert result.exit_code == 0, result.output
    held = pl.read_csv(out / "held_out.csv")
    train = pl.read_csv(out / "train" / "interactions.csv")
    if protocol == "global":
        assert held["timestamp"].min() >= train["timestamp"].max()
        tied = held["timestamp"].min() == train["timestamp"].max()
        assert ("share the cut-off timestamp" in result.output) == tied
    else:
        assert held.group_by("user_id").len()["len"].max() == 1
    assert all(p.stat().st_nlink == 1 for p in (out / "train" / "images").iterdir())


def test_a_global_split_through_tied_timestamps_says_so(tmp_path: Path, sample_data: Path) -> None:
    data = tmp_path / "data"
    shutil.copytree(sample_data, data)
    log = pl.read_csv(data / "interactions.csv")
    log.with_columns(pl.lit(1_700_000_000).alias("timestamp")).write_csv(data / "interactions.csv")
    result = invoke("split", "--data", str(data), "--out", str(tmp_path / "s"), "--protocol", "global")
    text = " ".join(result.output.split())
    assert result.exit_code == 0, text
    assert f"{log.height} interactions share the cut-off timestamp" in text


def test_split_refuses_bad_requests(tmp_path: Path, sample_data: Path) -> None:
    result = invoke("split", "--data", str(sample_data), "--out", str(tmp_path / "s"), "--test-fraction", "1.5")
    assert result.exit_code == 2 and "--test-fraction must be in (0, 1)" in result.output
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "x").write_text("x")
    result = invoke("split", "--data", str(sample_data), "--out", str(tmp_path / "busy"))
    assert result.exit_code == 2 and "not empty" in result.output
    result = invoke("split", "--data", str(sample_data), "--out", str(tmp_path / "s"), "--protocol", "random")
    assert result.exit_code == 2
    result = invoke("split", "--data", str(tmp_path / "nowhere"), "--out", str(tmp_path / "s"))
    assert result.exit_code == 2 and "does not exist" in result.output
    result = invoke("split", "--data", str(tmp_path / "busy" / "x"), "--out", str(tmp_path / "s"))
    assert result.exit_code == 2 and "is a file, not a data directory" in result.output
    # The same rule as every job's (`storage.check_separate_dirs`): data and the split apart.
    for out, message in ((sample_data, "is the data directory"), (sample_data / "s", "is inside the data directory"),
                         (sample_data.parent, "is inside the artifacts directory")):
        result = invoke("split", "--data", str(sample_data), "--out", str(out))
        assert result.exit_code == 2 and message in " ".join(result.output.split()), result.output
    assert not (sample_data / "s").exists()


def test_split_carries_no_file_from_outside_the_data_directory(tmp_path: Path, sample_data: Path) -> None:
    """A symlink out of the data directory (which the embedding job refuses) is not turned into a
    file of the train folder, and a FIFO does not stop the split: both are skipped and counted."""
    data = tmp_path / "data"
    shutil.copytree(sample_data, data)
    secret = tmp_path / "outside.jpg"
    secret.write_bytes((data / "images").iterdir().__next__().read_bytes())
    (data / "images" / "out.jpg").symlink_to(secret)
    (data / "images" / "in.jpg").symlink_to(next(p for p in (data / "images").iterdir() if p.suffix == ".jpg"
                                                 and not p.is_symlink()))
    os.mkfifo(data / "images" / "pipe")
    for media in ("copy", "link"):
        out = tmp_path / f"split-{media}"
        result = invoke("split", "--data", str(data), "--out", str(out), "--media", media)
        assert result.exit_code == 0, result.output
        images = out / "train" / "images"
        assert not (images / "out.jpg").exists() and not (images / "pipe").exists()
        assert (images / "in.jpg").is_file() and not (images / "in.jpg").is_symlink()  # inside: carried over
        assert re.search(r"files skipped\s*│\s*2\s*│", result.output), result.output


def test_split_out_that_is_a_file_exits_2_and_a_failed_split_leaves_nothing(
        tmp_path: Path, sample_data: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    afile = tmp_path / "afile"
    afile.write_text("x")
    for out in (afile, afile / "sub"):
        result = invoke("split", "--data", str(sample_data), "--out", str(out))
        assert result.exit_code == 2 and "is a file" in result.output and "unexpected" not in result.output
    assert afile.read_text() == "x"
    # A split that fails while writing (here: the disk fills on the third media file) exits 1 with
    # one line and leaves no --out behind, so the rerun is not refused as "not empty".
    calls = []

    def place(src: Path, dst: Path, media: str) -> str:
        calls.append(src)
        if len(calls) == 3:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(dst))
        return real_place(src, dst, media)

    real_place = holdout._place
    monkeypatch.setattr(holdout, "_place", place)
    out = tmp_path / "split"
    result = invoke("split", "--data", str(sample_data), "--out", str(out))
    text = " ".join(result.output.split())
    assert result.exit_code == 1 and "No space left on device" in text and "nothing was written" in text
    assert not out.exists() and [p.name for p in tmp_path.iterdir()] == ["afile"]
    monkeypatch.setattr(holdout, "_place", real_place)
    assert invoke("split", "--data", str(sample_data), "--out", str(out)).exit_code == 0


# ----------------------------------------------------------------------------- conventions

def test_version_names_the_libraries_without_importing_torch() -> None:
    code = ("import sys; from typer.testing import CliRunner; from fusionrec.cli import app; "
            "r = CliRunner().invoke(app, ['--version']); print(r.output); print('torch' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    lines = done.stdout.strip().splitlines()
    assert lines[-1] == "False", done.stdout + done.stderr
    assert re.match(r"fusionrec \S+ \(torch \S+, faiss \S+, lightgbm \S+, python \S+\)", lines[0])


def test_flags_read_as_flags_and_completion_is_on() -> None:
    result = invoke("recommend", "--help")
    assert "--no-explain" in result.output and "<bool>" not in result.output
    assert "--verbose" in result.output and "-v" in result.output
    root = invoke("--help")
    assert "--install-completion" in root.output and "--log-format" in root.output and "--version" in root.output


def test_doctor_checks_the_install_and_the_data(tmp_path: Path, sample_data: Path) -> None:
    result = invoke("doctor", "--data", str(sample_data), "--out", str(tmp_path / "art"))
    out = " ".join(result.output.split())
    assert result.exit_code == 0, result.output
    for name in ("import torch", "import torchvision", "import timm", "import faiss", "import lightgbm",
                 "text weights", "image weights", "audio weights", "cuda", "interactions", "disk"):
        assert name in out, name
    assert "released file" in out and "a run would" in out and "recommend: top 10 per user" in out
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "items.csv").write_text("item_id,title\na,x\na,y\n")
    result = invoke("doctor", "--data", str(bad), "--out", str(tmp_path / "art"))
    assert result.exit_code == 1 and "duplicate id 'a'" in " ".join(result.output.split())
    assert "a run would" not in result.output


def test_doctor_fails_where_run_would_refuse(tmp_path: Path, sample_data: Path) -> None:
    """An --out inside --data or that is a file, and a precomputed table `run` cannot read, fail
    the doctor too (before: all ok, exit 0)."""
    data = tmp_path / "data"
    shutil.copytree(sample_data, data)
    afile = tmp_path / "afile"
    afile.write_text("x")
    for out, message in ((data / "art", "is inside the data directory"), (afile, "is a file"),
                         (afile / "sub", "cannot be created")):
        result = invoke("doctor", "--data", str(data), "--out", str(out))
        text = " ".join(result.output.split())
        assert result.exit_code == 1 and message in text and "out" in text.split("check(s) failed:")[1], text
    (data / "embeddings").mkdir()
    (data / "embeddings" / "item_text.parquet").write_bytes(b"not parquet")
    result = invoke("doctor", "--data", str(data), "--out", str(tmp_path / "art"))
    text = " ".join(result.output.split())
    assert result.exit_code == 1 and "item text (precomputed)" in text and "item_text.parquet" in text, text
    # Users' and items' precomputed vectors of one modality with other dimensions: `run` refuses them.
    items = pl.read_csv(data / "items.csv", infer_schema=False)["item_id"]
    users = pl.read_csv(data / "users.csv", infer_schema=False)["user_id"]
    pl.DataFrame({"item_id": items, "vector": [[1.0] * 6] * len(items)}).write_parquet(
        data / "embeddings" / "item_text.parquet")
    pl.DataFrame({"user_id": users, "vector": [[1.0] * 3] * len(users)}).write_parquet(
        data / "embeddings" / "user_text.parquet")
    result = invoke("doctor", "--data", str(data), "--out", str(tmp_path / "art"))
    text = " ".join(result.output.split())
    assert result.exit_code == 1 and "precomputed dimensions" in text.split("check(s) failed:")[1], text
    assert "the users' text vectors" in text and "have 3 numbers, the items'" in text, text
    # Users' vectors precomputed, items' text encoded: the encoder's dimension is checked too.
    (data / "embeddings" / "item_text.parquet").unlink()
    result = invoke("doctor", "--data", str(data), "--out", str(tmp_path / "art"))
    text = " ".join(result.output.split())
    assert result.exit_code == 1 and "text dimensions" in text.split("check(s) failed:")[1], text
    detail = text.split("text dimensions")[1]
    assert "have 3 numbers, the items' (the text encoder" in detail and "all-MiniLM-L6-v2" in detail, text
    assert ") 384: a user's and an item's" in detail.replace("│", " ").replace("  ", " "), text


@pytest.mark.integration
@pytest.mark.parametrize("items", ["ids only", "empty title column"])
def test_a_catalog_without_content_runs_on_behaviour_and_doctor_warns(items: str, tmp_path: Path,
                                                                     sample_data: Path) -> None:
    """Every content column is optional. Before, such a night failed at the index with exit 1
    and "no item embeddings: run `fusionrec embed` first" (which `run` had just done), while
    doctor said ok for a column of empty cells."""
    data = tmp_path / "data"
    data.mkdir()
    ids = pl.read_csv(sample_data / "items.csv").select("item_id")
    (ids if items == "ids only" else ids.with_columns(title=pl.lit(None, pl.String))).write_csv(data / "items.csv")
    shutil.copy(sample_data / "interactions.csv", data / "interactions.csv")
    result = invoke("doctor", "--data", str(data), "--out", str(tmp_path / "art"))
    text = " ".join(result.output.split())
    assert result.exit_code == 0 and "no item has text, image or audio content" in text, text
    result = invoke("run", "--data", str(data), "--out", str(tmp_path / "art"))
    text = " ".join(result.output.split())
    assert result.exit_code == 0, text
    assert "the lists come from behaviour and popularity alone" in text
    top = pl.read_parquet(tmp_path / "art" / "exports" / "topk.parquet")
    users = pl.read_csv(sample_data / "interactions.csv")["user_id"].n_unique()
    assert top["user_id"].n_unique() == users and top.group_by("user_id").len()["len"].min() == 10


def test_doctor_says_which_modalities_are_encoded_and_which_are_taken_as_given(tmp_path: Path) -> None:
    """Last.fm's layout: titles and tags in items, text and audio vectors in DIR/embeddings/."""
    from fusionrec.doctor import checks, plan
    from fusionrec.pipeline.config import Config

    data = tmp_path / "data"
    (data / "embeddings").mkdir(parents=True)
    pl.DataFrame({"item_id": ["a", "b"], "title": ["x", "y"], "tags": ["t", "u"]}).write_csv(data / "items.csv")
    pl.DataFrame({"user_id": ["u", "u"], "item_id": ["a", "b"], "timestamp": [0, 1]}).write_csv(
        data / "interactions.csv")
    for name in ("item_text", "item_audio"):
        pl.DataFrame({"item_id": ["a", "b"], "vector": [[1.0, 0.0], [0.0, 1.0]]}).write_parquet(
            data / "embeddings" / f"{name}.parquet")
    lines = plan(Config(), tmp_path / "art", data)
    assert lines[0].startswith(f"embed: encode nothing from the items of {data}")
    assert lines[0].endswith("take the precomputed audio, text vectors as they are")
    found = {c.name: c for c in checks(Config(), tmp_path / "art", data)}
    assert found["item modalities"].detail == "audio (precomputed), text (precomputed)"
    (data / "embeddings" / "item_text.parquet").unlink()
    assert plan(Config(), tmp_path / "art", data)[0].startswith(f"embed: encode text from the items of {data}")
    found = {c.name: c for c in checks(Config(), tmp_path / "art", data)}
    assert found["item modalities"].detail == "text (encoded), audio (precomputed)"
    # A modality the config switches off is not reported as encoded (before: "text (encoded)" regardless)
    no_text = load_config(overrides=["embed.text.enabled=false"])
    found = {c.name: c for c in checks(no_text, tmp_path / "art", data)}
    assert found["item modalities"].detail == "audio (precomputed), text (disabled in the config)"
    (data / "embeddings" / "item_audio.parquet").unlink()
    found = {c.name: c for c in checks(no_text, tmp_path / "art", data)}
    assert found["item modalities"].status == "warn"
    assert "behaviour and popularity alone" in found["item modalities"].detail
    assert found["item modalities"].detail.endswith("(text (disabled in the config))")


# ----------------------------------------------------------------------------- MLflow tracking

def _mlflow_client(uri: str):
    mlflow = pytest.importorskip("mlflow")
    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    return mlflow.tracking.MlflowClient(uri)


def test_tracking_logs_params_metrics_and_artifacts_to_a_file_store(tmp_path: Path) -> None:
    from fusionrec.pipeline.io.tracking import log_nightly

    art = tmp_path / "art"
    (art / "ranker").mkdir(parents=True)
    (art / "manifest.json").write_text('{"runs": []}')
    (art / "ranker" / "features.json").write_text("{}")
    uri = (tmp_path / "mlruns").as_uri()
    client = _mlflow_client(uri)
    cfg = load_config(overrides=[f"tracking.mlflow_uri='{uri}'", "ranker.learning_rate=0.1"])
    run_id = log_nightly(cfg, art, tmp_path / "data", {"seconds": {"embed": 1.5, "total": 3.0}, "rows": 10,
                                                         "train": {"valid_ndcg@10": {"ranker": 0.3}, "note": "x"}})
    assert run_id
    run = client.get_run(run_id)
    assert run.data.params["ranker.learning_rate"] == "0.1" and run.data.params["export.k"] == "10"
    assert run.data.metrics["seconds.total"] == 3.0 and run.data.metrics["train.valid_ndcg_at_10.ranker"] == 0.3
    logged = {a.path for a in client.list_artifacts(run_id)} | {a.path for a in client.list_artifacts(run_id, "ranker")}
    assert {"manifest.json", "ranker/features.json"} <= logged


def test_tracking_without_mlflow_is_a_config_error(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    from fusionrec.pipeline.errors import ConfigError
    from fusionrec.pipeline.io import tracking

    real = importlib.util.find_spec
    monkeypatch.setattr(tracking.importlib.util, "find_spec", lambda name, *a: None if name == "mlflow" else real(name, *a))
    cfg = load_config(overrides=["tracking.mlflow_uri='file:///tmp/x'"])
    with pytest.raises(ConfigError, match="pip install mlflow-skinny"):
        tracking.check_tracking(cfg)
    assert tracking.check_tracking(Config()) is False


@pytest.mark.integration
def test_a_nightly_run_is_tracked_in_mlflow(tmp_path: Path, sample_data: Path) -> None:
    uri = (tmp_path / "mlruns").as_uri()
    client = _mlflow_client(uri)
    art = tmp_path / "art"
    result = invoke("run", "--data", str(sample_data), "--out", str(art), "-q", *FAST,
                    "--set", f"tracking.mlflow_uri='{uri}'")
    assert result.exit_code == 0, result.output
    assert (art / "manifest.json").is_file()  # the manifest stays
    experiment = client.get_experiment_by_name("fusionrec")
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1
    data = runs[0].data
    assert data.params["embed.image.enabled"] == "False" and data.metrics["rows"] > 0
    assert {"seconds.embed", "seconds.index", "seconds.train", "seconds.recommend", "seconds.total"} <= set(data.metrics)
    assert "manifest.json" in {a.path for a in client.list_artifacts(runs[0].info.run_id)}


@pytest.mark.integration
def test_api_page_examples_run(quickstart: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    """docs/api.md's serving, history and evaluation examples, run where the quickstart left its artifacts."""
    text = (ROOT / "docs" / "api.md").read_text(encoding="utf-8")
    wanted = ("## Recommending and scoring", "## Stage 1 alone", "## Splitting, evaluating")
    monkeypatch.chdir(quickstart["cwd"])
    for title in wanted:
        start = text.index(title)
        block = code_blocks(text[start:text.find("\n## ", start + 1)], "python")[0]
        exec(compile(block, f"docs/api.md {title}", "exec"), {})  # noqa: S102 - our own documentation


def test_index_before_embed_says_to_run_embed(tmp_path: Path, sample_data: Path) -> None:
    """A newcomer's `index` on a fresh --out warned that no item has content, though every item
    has a title: the embeddings were simply not made yet."""
    result = invoke("index", "--data", str(sample_data), "--out", str(tmp_path / "art"))
    text = " ".join(result.output.split())
    assert result.exit_code == 0, text
    assert re.search(r"no item embeddings in \S+embeddings, though the items have [a-z, ]*title[a-z, ]*: run "
                     r"`fusionrec embed` on this --out first \(or `fusionrec run`\)", text), text
    assert "no item has text, image or audio content" not in text
