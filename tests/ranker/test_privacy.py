"""Privacy and security: pseudonymised exports, logs without user ids, no pickle, pinned model files.

Exports leave the team that made them: with pseudonymisation on (the default) no raw user
id may appear in any exported file (every format, `--explain`, `score`, the evaluation
report) nor in the logs of the commands that made them. The scan reads each file's bytes
and, for Parquet (compressed, so bytes say little), every decoded cell; a positive control
(`--raw-ids`) shows that the scan finds ids where they are.
"""

from __future__ import annotations

import ast
import hashlib
import hmac
import json
import re
import shutil
import stat
import zipfile
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from typer.testing import CliRunner

from fusionrec.cli import app
from fusionrec.pipeline.config import ExportConfig
from fusionrec.pipeline.errors import FusionrecError
from fusionrec.pipeline.io.manifest import read_manifest
from fusionrec.ranker.serving.privacy import export_key, pseudonym
from tests.reliability_counts import small_catalog, visible_files
from tests.tiny_models import tiny_text_model

PROJECT = Path(__file__).resolve().parents[2]
KEY_A = "first-export-key-of-the-team-0001"
KEY_B = "second-export-key-of-the-team-002"


def invoke(*args: str | Path, env: dict[str, str | None] | None = None):
    return CliRunner().invoke(app, [str(a) for a in args], env=env)


def opts(model: Path, *extra: str) -> list[str]:
    return ["--set", f"embed.text.model={model}", "--set", "embed.audio.enabled=false", *extra]


class Deployment:
    """A data set with user avatars (some missing), its artifacts, and every export made from them."""

    def __init__(self, work: Path) -> None:
        from PIL import Image

        self.work = work
        self.model = tiny_text_model(work / "bert")
        self.data = small_catalog(work / "data", 1)
        users = pl.read_csv(self.data / "users.csv", infer_schema=False)
        ids = users["user_id"].to_list()
        # Avatar paths carry the user id, as they often do; two files are missing (logged failures).
        (self.data / "avatars").mkdir()
        for uid in ids[:2]:
            Image.fromarray(np.full((16, 16, 3), 100, np.uint8)).save(self.data / "avatars" / f"{uid}.png")
        (self.data / "avatars" / f"{ids[2]}.png").write_text("not a picture")  # its error names the path
        avatars = [f"avatars/{u}.png" if i < 5 else None for i, u in enumerate(ids)]
        self.bad_avatars = ids[2:5]
        users.with_columns(pl.Series("image", avatars)).write_csv(self.data / "users.csv")
        interactions = pl.read_csv(self.data / "interactions.csv", infer_schema=False)
        self.raw_ids = sorted(set(ids) | set(interactions["user_id"].to_list()))
        self.art = work / "art"
        self.logs: list[str] = []

    def run(self, *args: str | Path, key: str | None = KEY_A, **kw):
        result = invoke(*args, env={"FUSIONREC_EXPORT_KEY": key, "COLUMNS": "250"}, **kw)
        self.logs.append(result.output)
        assert result.exit_code == 0, result.output
        return result


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> Deployment:
    d = Deployment(tmp_path_factory.mktemp("privacy"))
    o = opts(d.model, "--set", "embed.image.weights=none", "--set", "embed.max_failed_share=0.9")
    d.run("run", "--data", d.data, "--out", d.art, *o)  # not quiet: every log line is scanned
    exports = d.work / "exports"
    exports.mkdir()
    for suffix in (".parquet", ".csv", ".jsonl"):
        d.run("recommend", "--out", d.art, "--k", "5", "--explain", "--export", exports / f"recs{suffix}")
    pairs = d.work / "pairs.csv"
    pl.DataFrame({"user_id": d.raw_ids[:6] + ["someone-new"], "item_id": ["i0001"] * 7}).write_csv(pairs)
    users = d.work / "some-users.csv"
    pl.DataFrame({"user_id": d.raw_ids[:4]}).write_csv(users)
    d.run("score", "--out", d.art, "--candidates", pairs, "--export", exports / "scored.jsonl", "--explain")
    d.run("recommend", "--out", d.art, "--users", users, "--export", exports / "some.csv")
    test = d.work / "test.csv"
    # Held-out rows must be new to training (evaluate refuses rows already trained on): each
    # user's later interaction with items they never had.
    seen = pl.read_csv(d.data / "interactions.csv", schema_overrides={"user_id": pl.String, "item_id": pl.String})
    items = pl.read_csv(d.data / "items.csv", schema_overrides={"item_id": pl.String}).select("item_id")
    later = int(seen["timestamp"].max()) + 1
    (seen.select("user_id").unique().sort("user_id").head(30).join(items, how="cross")
     .join(seen.select("user_id", "item_id"), on=["user_id", "item_id"], how="anti")
     .group_by("user_id", maintain_order=True).head(3)
     .with_columns(pl.lit(later).alias("timestamp")).write_csv(test))
    d.run("evaluate", "--out", d.art, "--test", test, "--k", "5", "--no-baselines", "--report",
          exports / "report.html")
    return d


def found_ids(path: Path, raw_ids: list[str]) -> set[str]:
    """Raw ids present in `path`: in its bytes, or (Parquet) in any decoded cell or the metadata."""
    data = path.read_bytes()
    hits = {u for u in raw_ids if u.encode() in data}
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        table = pq.read_table(path)
        meta = json.dumps({k.decode(errors="replace"): v.decode(errors="replace")
                           for k, v in (table.schema.metadata or {}).items()})
        cells = json.dumps(table.to_pylist(), default=str, ensure_ascii=False)  # every cell, nested ones too
        hits |= {u for u in raw_ids if u in cells or u in meta}
    return hits


def test_no_raw_user_id_in_any_export(deployment: Deployment, reliability) -> None:
    files = sorted((deployment.work / "exports").iterdir()) + [deployment.art / "exports" / "topk.parquet"]
    assert len(files) == 7
    for path in files:
        assert found_ids(path, deployment.raw_ids) == set(), path
    # What is there instead: 64-hex HMAC-SHA256 pseudonyms, one per user.
    recs = pl.read_parquet(deployment.work / "exports" / "recs.parquet")
    expected = {pseudonym(u, KEY_A.encode()) for u in deployment.raw_ids}
    assert set(recs["user_id"]) <= expected and recs["user_id"].n_unique() > 100
    scored = pl.read_ndjson(deployment.work / "exports" / "scored.jsonl")
    assert pseudonym("someone-new", KEY_A.encode()) in set(scored["user_id"])  # unknown users too
    reliability.record(case=f"privacy: {len(files)} exports scanned for {len(deployment.raw_ids)} raw user ids")


def test_no_raw_user_id_in_the_logs_or_the_manifest(deployment: Deployment) -> None:
    logs = "\n".join(deployment.logs)
    assert "3 user image files could not be used" in logs  # the avatar failures were logged (one line) ...
    assert "not a recognised image format: <file>" in logs  # ... with their paths (which hold ids) hidden
    assert {u for u in deployment.raw_ids if u in logs} == set()
    manifest = (deployment.art / "manifest.json").read_text()
    assert {u for u in deployment.raw_ids if f'"{u}"' in manifest or f"{u}." in manifest} == set()
    # failures.parquet is an artifact inside ART (not an export): it keeps the id, so the team can act on it.
    failures = pl.read_parquet(deployment.art / "embeddings" / "failures.parquet")
    assert sorted(failures.filter(pl.col("kind") == "user")["id"]) == sorted(deployment.bad_avatars)


def test_the_scan_finds_raw_ids_where_they_are(deployment: Deployment, tmp_path: Path) -> None:
    """Positive control: with --raw-ids the same scan finds the ids, in every format."""
    for suffix in (".parquet", ".csv", ".jsonl"):
        out = tmp_path / f"raw{suffix}"
        deployment.run("recommend", "--out", deployment.art, "--k", "2", "--export", out, "--raw-ids")
        assert len(found_ids(out, deployment.raw_ids)) > 100, suffix


def _user_ids(path: Path) -> list[str]:
    return pl.read_csv(path, schema_overrides={"user_id": pl.String})["user_id"].to_list()


def test_pseudonyms_are_stable_for_a_key_and_differ_across_keys(deployment: Deployment, tmp_path: Path) -> None:
    def export(name: str, key: str | None, *extra: str) -> list[str]:
        deployment.run("recommend", "--out", deployment.art, "--k", "1", "--export", tmp_path / name, *extra, key=key)
        return _user_ids(tmp_path / name)

    first, again = export("a1.csv", KEY_A), export("a2.csv", KEY_A)
    assert first == again  # same key, same pseudonyms, run after run
    other = export("b.csv", KEY_B)
    assert len(other) == len(first) and not set(other) & set(first)
    raw = export("raw.csv", KEY_A, "--raw-ids")
    assert first == [pseudonym(u, KEY_A.encode()) for u in raw]
    assert other == [hmac.new(KEY_B.encode(), u.encode(), hashlib.sha256).hexdigest() for u in raw]

    # The key from a key file (no environment variable) gives the same ids as the same key in the environment.
    key_file = tmp_path / "team.key"
    key_file.write_text(KEY_B + "\n")
    from_file = export("f.csv", None, "--set", f"export.key_file={key_file}")
    assert from_file == other
    # The environment variable wins over the key file.
    assert export("both.csv", KEY_A, "--set", f"export.key_file={key_file}") == first


def test_without_a_configured_key_one_is_made_private_and_kept(tmp_path: Path, deployment: Deployment) -> None:
    art = tmp_path / "art"
    shutil.copytree(deployment.art, art, ignore=shutil.ignore_patterns("export.key"))
    deployment.run("recommend", "--out", art, "--k", "1", "--export", tmp_path / "x.csv", key=None)
    key_path = art / "export.key"
    assert stat.S_IMODE(key_path.stat().st_mode) == 0o600
    key = key_path.read_text().strip()
    assert re.fullmatch(r"[0-9a-f]{64}", key)
    deployment.run("recommend", "--out", art, "--k", "1", "--export", tmp_path / "y.csv", key=None)
    assert key_path.read_text().strip() == key
    assert _user_ids(tmp_path / "x.csv") == _user_ids(tmp_path / "y.csv")
    assert _user_ids(tmp_path / "x.csv")[0] in {pseudonym(u, key.encode()) for u in deployment.raw_ids}


@pytest.mark.parametrize("where", ["env", "file", "art"])
def test_short_keys_are_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, where: str) -> None:
    monkeypatch.delenv("FUSIONREC_EXPORT_KEY", raising=False)
    cfg = ExportConfig()
    if where == "env":
        monkeypatch.setenv("FUSIONREC_EXPORT_KEY", "short")
    elif where == "file":
        (tmp_path / "k").write_text("short\n")
        cfg = ExportConfig(key_file=str(tmp_path / "k"))
    else:
        (tmp_path / "export.key").write_text("")
    with pytest.raises(FusionrecError, match="fewer than 16 bytes"):
        export_key(cfg, tmp_path)


# --------------------------------------------------------------------------- no pickle, safe model loading

PICKLE_SUFFIXES = {".pkl", ".pickle", ".joblib", ".pt", ".pth", ".npy", ".npz", ".ckpt", ".bin"}


def pickle_problems(path: Path) -> list[str]:
    data = path.read_bytes()[:4096]
    problems = []
    if path.suffix in PICKLE_SUFFIXES:
        problems.append(f"{path}: a pickle-style file type")
    if len(data) >= 2 and data[0] == 0x80 and 2 <= data[1] <= 5:
        problems.append(f"{path}: starts with a pickle protocol header")
    if data.startswith(b"PK\x03\x04"):
        with zipfile.ZipFile(path) as zf:
            if any(n.endswith(".pkl") for n in zf.namelist()):
                problems.append(f"{path}: a zip holding a pickle (torch.save)")
    return problems


def test_no_artifact_is_a_pickle(deployment: Deployment) -> None:
    files = visible_files(deployment.art)
    assert len(files) >= 15
    assert [p for f in files for p in pickle_problems(f)] == []
    # The check itself does see pickles.
    import pickle

    probe = deployment.work / "probe.data"
    probe.write_bytes(pickle.dumps({"a": 1}))
    assert pickle_problems(probe)


def _calls(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            owner = func.value.id if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name) else ""
            yield node, owner, name, {k.arg: k.value for k in node.keywords}


def test_loaders_in_the_code_never_unpickle_or_run_remote_code() -> None:
    """A guard over the source: from_pretrained with trust_remote_code=False, torch.load weights-only,
    no pickle/joblib/dill loaders, no np.load(allow_pickle=True)."""
    sources = sorted([*(PROJECT / "pipeline").rglob("*.py"), *(PROJECT / "ranker").rglob("*.py"), *(PROJECT / "evaluation").rglob("*.py"), PROJECT / "cli.py", PROJECT / "jobs.py"])
    problems, pretrained = [], 0
    for path in sources:
        for node, owner, name, kw in _calls(ast.parse(path.read_text(), str(path))):
            where = f"{path.relative_to(PROJECT)}:{node.lineno}"
            if name == "from_pretrained":
                pretrained += 1
                value = kw.get("trust_remote_code")
                if not (isinstance(value, ast.Constant) and value.value is False):
                    problems.append(f"{where}: from_pretrained without trust_remote_code=False")
            elif owner == "torch" and name == "load":
                value = kw.get("weights_only")
                if not (isinstance(value, ast.Constant) and value.value is True):
                    problems.append(f"{where}: torch.load without weights_only=True")
            elif owner in ("pickle", "cloudpickle", "dill", "joblib", "_pickle") and name in ("load", "loads"):
                problems.append(f"{where}: {owner}.{name}")
            elif name == "read_pickle" or (name == "load" and owner in ("np", "numpy")
                                            and isinstance(kw.get("allow_pickle"), ast.Constant)
                                            and kw["allow_pickle"].value):
                problems.append(f"{where}: {owner}.{name} of a pickle")
    assert pretrained >= 5 and problems == []


def _malicious_pickle(canary: Path) -> bytes:
    """A pickle that creates `canary` when unpickled (what a booby-trapped weights file does)."""
    import pickle

    class Trap:
        def __reduce__(self):
            return (Path.touch, (canary,))

    return pickle.dumps({"weight": Trap()}, protocol=2)


def test_a_booby_trapped_pickle_beside_safetensors_is_never_opened(tmp_path: Path) -> None:
    from fusionrec.pipeline.encoders.text import TextEncoder
    from fusionrec.pipeline.errors import ConfigError

    model = tiny_text_model(tmp_path / "bert")
    canary = tmp_path / "pwned"
    (model / "pytorch_model.bin").write_bytes(_malicious_pickle(canary))
    vectors = TextEncoder(str(model), device="cpu").encode(["ocean sea wave"])
    assert vectors.shape == (1, 16) and not canary.exists()  # safetensors taken, the pickle never read

    (model / "model.safetensors").unlink()  # now the pickle is the only weights file
    with pytest.raises(ConfigError, match=rf"cannot load the text model {re.escape(str(model))}: Unable to load weights"):
        TextEncoder(str(model), device="cpu").encode(["ocean"])
    assert not canary.exists(), "unpickling ran code"

    # Through the CLI: one clear line and exit 2, not a traceback.
    data = small_catalog(tmp_path / "data", 1, n_items=3)
    result = invoke("embed", "--data", data, "--out", tmp_path / "art", *opts(model, "--set",
                                                                              "embed.image.enabled=false", "-q"))
    assert result.exit_code == 2 and "error: cannot load the text model" in result.output, result.output
    assert not canary.exists()


def test_a_booby_trapped_image_checkpoint_is_refused(tmp_path: Path) -> None:
    from fusionrec.pipeline.encoders.image import ImageEncoder
    from fusionrec.pipeline.errors import ConfigError

    canary = tmp_path / "pwned"
    checkpoint = tmp_path / "weights.pth"
    checkpoint.write_bytes(_malicious_pickle(canary))
    with pytest.raises(ConfigError, match="cannot load as a weights-only torch checkpoint"):
        ImageEncoder(weights=str(checkpoint))
    assert not canary.exists()


# --------------------------------------------------------------------------- model file hashes


def test_manifest_records_model_file_hashes_and_a_changed_weights_file_reencodes(tmp_path: Path) -> None:
    import torch
    from transformers import BertModel

    model = tiny_text_model(tmp_path / "bert")
    data = small_catalog(tmp_path / "data", 1, n_items=12)
    (data / "users.csv").unlink()
    art = tmp_path / "art"
    args = ["embed", "--data", data, "--out", art, *opts(model, "--set", "embed.image.enabled=false", "-q")]

    def embed_run() -> dict:
        result = invoke(*args)
        assert result.exit_code == 0, result.output
        return read_manifest(art)["runs"][-1]

    first = embed_run()
    weights = model / "model.safetensors"
    recorded = first["models"]["weights_sha256"]["text"]
    assert recorded["model.safetensors"] == hashlib.sha256(weights.read_bytes()).hexdigest()
    assert {"config.json", "vocab.txt", "tokenizer.json"} <= set(recorded)
    assert first["models"]["text"].startswith(f"{model}#sha256:")
    assert first["counts"]["item_text"]["encoded"] == 12
    assert embed_run()["counts"]["item_text"]["reused"] == 12  # unchanged files: nothing to do

    # Same architecture, same file name, other weights (a retrained or tampered file).
    torch.manual_seed(1)
    BertModel(BertModel.config_class.from_pretrained(model)).save_pretrained(model, safe_serialization=True)
    third = embed_run()
    assert third["models"]["weights_sha256"]["text"]["model.safetensors"] != recorded["model.safetensors"]
    assert third["models"]["text"] != first["models"]["text"]
    counts = third["counts"]["item_text"]
    assert (counts["encoded"], counts["reused"]) == (12, 0)  # the changed model re-encodes the modality
    table = pl.read_parquet(art / "embeddings" / "item_text.parquet")
    assert set(table["model"]) == {third["models"]["text"]}


def test_the_default_encoders_name_their_weight_files() -> None:
    from fusionrec.pipeline.config import EmbedConfig
    from fusionrec.pipeline.encoders.model_files import encoder_files, is_weights

    try:
        files = {m: encoder_files(m, EmbedConfig()) for m in ("text", "image", "audio")}
    except (FusionrecError, ModuleNotFoundError) as exc:
        pytest.skip(f"a default weights package is absent: {exc}")
    assert [n for n in files["text"] if is_weights(n)] == ["model.safetensors"]  # safetensors, no pickle
    assert [n for n in files["image"] if is_weights(n)] == ["mobilenet_v2-b0353104.pth"]
    assert [n for n in files["audio"] if is_weights(n)] == ["model.bin"]  # CTranslate2 binary, read with struct
    assert all(p.is_file() for f in files.values() for p in f.values())
