"""Probes: fusionrec used as a careless or a hostile user would (issue 14), and more found since.

Each probe runs a real command and is counted in the reliability line as `probes tried N
(tracebacks T, silent damage S)`; T and S must stay 0. A probe states its exit code, a
message, and, where nothing should change, that the artifacts stay byte for byte as they
were. Classes: media paths (NUL, FIFO, device, directory, URL), table encodings (BOM,
Latin-1, UTF-16), id spellings, value ranges (inf, NaN, milliseconds, far future), damaged
artifacts (truncated, zeroed, swapped), export targets and CSV injection, the export key,
the manifest, locks between concurrent commands, and the CLI's last line of defence.

Grow it: add a case to a table below (or a test) for every new class found.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from typer.testing import CliRunner

from fusionrec.cli import app
from fusionrec.pipeline.io.storage import ArtifactLock, ReadLock
from tests.reliability_counts import digests, small_catalog, temporaries
from tests.tiny_models import tiny_text_model

KEY = "probe-suite-export-key-0123456789abcdef"


def invoke(*args: str | Path, env: dict[str, str] | None = None):
    return CliRunner().invoke(app, [str(a) for a in args], env={"COLUMNS": "250", **(env or {})})


def flat(text: str) -> str:
    return " ".join(text.split())


def probe(reliability, name: str, result, code: int, pattern: str | None = None, *,
          damaged: list[str] | None = None) -> None:
    """Count one probe and check it: exit `code`, `pattern` in the output, no traceback, and
    (when `damaged` is given: the files that changed but should not have) no silent damage."""
    output = result.output
    traceback = "Traceback" in output or (result.exception is not None and not isinstance(result.exception,
                                                                                            SystemExit))
    silent = result.exit_code == 0 and bool(damaged)
    reliability.record(probes=1, tracebacks=int(traceback), silent_damage=int(silent), case=f"probe: {name}")
    assert not traceback, (name, output[-3000:], repr(result.exception))
    assert result.exit_code == code, (name, result.exit_code, output[-3000:])
    if pattern is not None:
        assert re.search(pattern, flat(output)), (name, output[-3000:])
    assert not damaged, (name, damaged)


def changed(before: dict[str, str], after: dict[str, str]) -> list[str]:
    return sorted(n for n in set(before) | set(after) if before.get(n) != after.get(n) and n != "manifest.json")


@dataclass
class Base:
    data: Path
    art: Path
    text_model: Path
    work: Path

    def opts(self) -> list[str]:
        return ["--set", f"embed.text.model={self.text_model}", "--set", "embed.image.enabled=false",
                "--set", "embed.audio.enabled=false", "-q"]

    def fresh(self, tmp_path: Path, name: str = "art") -> Path:
        art = tmp_path / name
        shutil.copytree(self.art, art, symlinks=True)
        return art

    def data_copy(self, tmp_path: Path) -> Path:
        data = tmp_path / "data"
        shutil.copytree(self.data, data)
        return data


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Base:
    work = tmp_path_factory.mktemp("probes")
    b = Base(small_catalog(work / "data", 1), work / "art", tiny_text_model(work / "bert"), work)
    result = invoke("run", "--data", b.data, "--out", b.art, *b.opts(), env={"FUSIONREC_EXPORT_KEY": KEY})
    assert result.exit_code == 0, result.output
    return b


# --------------------------------------------------------------------------- the export key


def test_a_broken_export_key_link_is_refused_not_replaced(base: Base, tmp_path: Path, reliability) -> None:
    art = base.fresh(tmp_path)
    (art / "export.key").unlink(missing_ok=True)
    (art / "export.key").symlink_to(tmp_path / "vault" / "secret.key")
    before = digests(art)
    out = tmp_path / "recs.parquet"
    result = invoke("recommend", "--out", art, "--export", out, "-q", env={"FUSIONREC_EXPORT_KEY": ""})
    probe(reliability, "broken export.key symlink", result, 1, r"export key .*export\.key is a link to .*secret\.key, "
          r"which does not exist", damaged=changed(before, digests(art)))
    assert (art / "export.key").is_symlink() and not out.exists()


def test_an_export_key_readable_by_others_is_warned_about(base: Base, tmp_path: Path, reliability) -> None:
    art = base.fresh(tmp_path)
    key = art / "export.key"
    key.write_text("k" * 40 + "\n")
    key.chmod(0o644)
    result = invoke("recommend", "--out", art, "--export", tmp_path / "recs.parquet", "-q",
                    env={"FUSIONREC_EXPORT_KEY": ""})
    probe(reliability, "export.key mode 0644", result, 0, r"export key .*export\.key has mode 0644")
    key.chmod(0o600)
    result = invoke("recommend", "--out", art, "--export", tmp_path / "recs2.parquet", "-q",
                    env={"FUSIONREC_EXPORT_KEY": ""})
    probe(reliability, "export.key mode 0600", result, 0)
    assert "has mode" not in result.output


# --------------------------------------------------------------------------- --out against --data


@pytest.mark.parametrize("layout", ["same", "out_inside_data", "data_inside_out"])
def test_out_and_data_must_not_overlap(base: Base, tmp_path: Path, reliability, layout: str) -> None:
    data = base.data_copy(tmp_path)
    emb = data / "embeddings"
    emb.mkdir()
    # The user's own precomputed vectors: the job must never replace them.
    shutil.copy(base.art / "embeddings" / "item_text.parquet", emb / "item_text.parquet")
    if layout == "same":
        out = data
    elif layout == "out_inside_data":
        out = data / "art"
    else:
        out = tmp_path / "art"
        shutil.copytree(data, out / "input")
        data = out / "input"
    before = digests(data)
    for command in ("run", "embed", "index"):
        result = invoke(command, "--data", data, "--out", out, *base.opts())
        probe(reliability, f"{command} --out/--data {layout}", result, 2,
              r"(--out .* (is the data directory|is inside the data directory)|--data .* is inside the artifacts)",
              damaged=changed(before, digests(data)))
    assert digests(data) == before


# --------------------------------------------------------------------------- exports


@pytest.mark.parametrize("target", ["data/interactions.parquet", "manifest.json", "export.key",
                                    "index/retriever.json", "ranker/new.csv", "."])
def test_exports_never_land_on_the_artifacts_own_files(base: Base, tmp_path: Path, reliability, target: str) -> None:
    art = base.fresh(tmp_path)
    (art / "export.key").write_text("k" * 40 + "\n")
    before = digests(art)
    for command in ("recommend", "score"):
        path = art / target if target != "." else art
        if command == "score":
            pairs = tmp_path / "pairs.csv"
            pairs.write_text("user_id,item_id\nu1,i1\n")
            args = ["score", "--out", art, "--candidates", pairs, "--export", path, "-q"]
        else:
            args = ["recommend", "--out", art, "--export", path, "-q"]
        result = invoke(*args, env={"FUSIONREC_EXPORT_KEY": KEY})
        code = 2
        pattern = r"would land among the artifacts' own files|unsupported format"
        probe(reliability, f"{command} --export ART/{target}", result, code, pattern,
              damaged=changed(before, digests(art)))
    # The artifacts still serve.
    result = invoke("recommend", "--out", art, "--export", tmp_path / "ok.parquet", "-q",
                    env={"FUSIONREC_EXPORT_KEY": KEY})
    assert result.exit_code == 0, result.output


def test_csv_exports_escape_formulas_unless_raw(tmp_path: Path, reliability) -> None:
    from fusionrec.ranker.serving.export import read_topk, write_topk

    frame = pl.DataFrame({"user_id": ["=HYPERLINK(\"http://x\")", "+1", "-2+3", "@SUM(A1)", "\tx", "plain"],
                          "rank": pl.Series([1] * 6, dtype=pl.Int32), "item_id": ["a", "b", "c", "d", "e", "-f"],
                          "score": [-1.5, 0.5, 1.0, 2.0, 3.0, -4.0],
                          "retrieval_score": pl.Series([0.1] * 6, dtype=pl.Float32)})
    write_topk(frame, tmp_path / "safe.csv")
    text = (tmp_path / "safe.csv").read_text()
    for cell in ("'=HYPERLINK", "'+1", "'-2+3", "'@SUM", "'-f"):
        assert cell in text, cell
    assert ",-1.5," in text  # numbers stay numbers
    assert read_topk(tmp_path / "safe.csv").equals(frame)  # the escape is removed on reading
    write_topk(frame, tmp_path / "raw.csv", raw=True)
    assert "\n+1," in (tmp_path / "raw.csv").read_text() and "'" not in (tmp_path / "raw.csv").read_text()
    reliability.record(probes=2, case="probe: CSV injection escaped; raw on request")


def test_torn_export_temporaries_are_removed_on_the_next_run(base: Base, tmp_path: Path, reliability) -> None:
    art = base.fresh(tmp_path)
    exports = tmp_path / "exports"
    exports.mkdir()
    torn = exports / ".tmp-0123456789ab-recs.csv"
    torn.write_text("user_id,rank,item_id\nu1,1,")  # a recommend killed mid-write
    fresh = exports / ".tmp-ba9876543210-recs.csv"
    fresh.write_text("being written")  # another recommend writing right now
    old = time.time() - 3600
    os.utime(torn, (old, old))
    result = invoke("recommend", "--out", art, "--export", exports / "recs.csv", "-q",
                    env={"FUSIONREC_EXPORT_KEY": KEY})
    probe(reliability, "torn .tmp-* in the export folder", result, 0, r"removed 1 torn temporary")
    assert not torn.exists() and fresh.exists() and (exports / "recs.csv").is_file()


# --------------------------------------------------------------------------- the manifest


@pytest.mark.parametrize("damage", ["half", "zeroed", "garbage", "not_an_object"])
def test_a_damaged_manifest_is_recovered_with_a_warning(base: Base, tmp_path: Path, reliability, damage: str) -> None:
    art = base.fresh(tmp_path)
    path = art / "manifest.json"
    raw = path.read_bytes()
    runs = json.loads(raw)["runs"]
    damaged = {"half": raw[: len(raw) // 2], "zeroed": b"\0" * len(raw), "garbage": b"\x89PNG\r\n\x1a\n...",
               "not_an_object": b"[1, 2, 3]\n"}[damage]
    path.write_bytes(damaged)
    out = tmp_path / "recs.parquet"
    result = invoke("recommend", "--out", art, "--export", out, "-q", env={"FUSIONREC_EXPORT_KEY": KEY})
    probe(reliability, f"manifest.json {damage}", result, 0, r"manifest\.json is damaged: recovered \d+ complete run")
    manifest = json.loads(path.read_text())
    assert manifest["runs"][-1]["command"] == "recommend" and out.is_file()
    kept = manifest["runs"][:-1]
    assert [r["run_id"] for r in kept] == [r["run_id"] for r in runs[:len(kept)]]
    if damage == "half":
        assert len(kept) >= 1
    assert (art / "manifest.json.damaged").read_bytes() == damaged
    # The next command reads it without a warning.
    again = invoke("recommend", "--out", art, "--export", out, "-q", env={"FUSIONREC_EXPORT_KEY": KEY})
    assert again.exit_code == 0 and "damaged" not in again.output


def test_concurrent_run_records_are_never_lost(tmp_path: Path, reliability) -> None:
    from fusionrec.pipeline.io.manifest import RunRecord, read_manifest

    art = tmp_path / "art"
    art.mkdir()

    def finish(i: int) -> None:
        RunRecord("recommend" if i % 2 else "embed", art).finish("ok")

    threads = [threading.Thread(target=finish, args=(i,)) for i in range(24)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(read_manifest(art)["runs"]) == 24
    reliability.record(probes=1, case="probe: 24 commands finishing at once keep 24 run records")


# --------------------------------------------------------------------------- locks between commands


def test_readers_share_and_writers_exclude(base: Base, tmp_path: Path, reliability) -> None:
    art = base.fresh(tmp_path)
    env = {"FUSIONREC_EXPORT_KEY": KEY, "FUSIONREC_LOCK_WAIT": "0"}
    before = digests(art)
    # A writer holds the artifacts: a reader is refused (it would read a half-updated set).
    writer = ArtifactLock(art).acquire()
    try:
        result = invoke("recommend", "--out", art, "--export", tmp_path / "a.parquet", "-q", env=env)
        probe(reliability, "recommend during a writer", result, 1, r"in use by a job that writes them|another "
              r"fusionrec job")
        pairs = tmp_path / "pairs.csv"
        pairs.write_text("user_id,item_id\nu1,i1\n")
        result = invoke("score", "--out", art, "--candidates", pairs, "--export", tmp_path / "s.parquet", "-q", env=env)
        probe(reliability, "score during a writer", result, 1, r"in use by a job that writes them")
    finally:
        writer.release()
    # Readers hold it: a writer is refused, other readers are not.
    with ReadLock(art), ReadLock(art):
        result = invoke("index", "--data", base.data, "--out", art, *base.opts(), env=env)
        probe(reliability, "index during readers", result, 1, r"in use by a command that reads them",
              damaged=changed(before, digests(art)))
        result = invoke("recommend", "--out", art, "--export", tmp_path / "b.parquet", "-q", env=env)
        probe(reliability, "recommend during readers", result, 0)
    assert not (art / ".lock").exists() and temporaries(art) == []


# --------------------------------------------------------------------------- tables: encodings, values, ids


def _items(d: Path) -> pl.DataFrame:
    return pl.read_csv(d / "items.csv", infer_schema=False)


def _inter(d: Path) -> pl.DataFrame:
    return pl.read_csv(d / "interactions.csv", infer_schema=False)


def _set_cell(frame: pl.DataFrame, row: int, column: str, value: str) -> pl.DataFrame:
    return frame.with_columns(pl.when(pl.int_range(pl.len()) == row - 1).then(pl.lit(value))
                              .otherwise(pl.col(column)).alias(column))


def _bom(d: Path) -> None:
    (d / "items.csv").write_bytes(b"\xef\xbb\xbf" + (d / "items.csv").read_bytes())


def _utf16(d: Path) -> None:
    (d / "items.csv").write_bytes((d / "items.csv").read_text().encode("utf-16"))


def _latin1(d: Path) -> None:
    _set_cell(_items(d), 4, "title", "Caf\u00e9 del mar").write_csv(d / "items.csv")
    (d / "items.csv").write_bytes((d / "items.csv").read_text().encode("latin-1"))


def _value(v: str):
    def make(d: Path) -> None:
        frame = _inter(d)
        frame = frame if "value" in frame.columns else frame.with_columns(pl.lit("1").alias("value"))
        _set_cell(frame, 3, "value", v).write_csv(d / "interactions.csv")
    return make


def _timestamps(kind: str):
    def make(d: Path) -> None:
        frame = _inter(d)
        ts = frame["timestamp"].cast(pl.Int64)
        if kind == "ms":
            frame = frame.with_columns((ts * 1000).cast(pl.String).alias("timestamp"))
        elif kind == "mixed":
            frame = _set_cell(frame, 5, "timestamp", str(int(ts[4]) * 1000))
        elif kind == "9999":
            frame = _set_cell(frame, 7, "timestamp", "9999-12-31T00:00:00")
        elif kind == "1e18":
            frame = _set_cell(frame, 2, "timestamp", str(10**18))
        frame.write_csv(d / "interactions.csv")
    return make


def _spaced_ids(d: Path) -> None:
    items = _items(d)
    items.with_columns((" " + pl.col("item_id") + " ").alias("item_id")).write_csv(d / "items.csv")


# (name, how to damage the data dir, exit code, message)
TABLE_PROBES = [
    ("items.csv with a UTF-8 BOM", _bom, 0, None),
    ("items.csv in UTF-16", _utf16, 2, r"items\.csv: the file is UTF-16 text; save it as UTF-8"),
    ("items.csv in Latin-1", _latin1, 2, r"items\.csv, row 4, field 'title': invalid UTF-8 .* save the file as UTF-8"),
    ("value inf", _value("inf"), 2, r"interactions\.csv, row 3, field 'value': expected a finite number, found 'inf'"),
    ("value -inf", _value("-inf"), 2, r"interactions\.csv, row 3, field 'value': expected a finite number"),
    ("value NaN", _value("NaN"), 2, r"interactions\.csv, row 3, field 'value': expected a finite number"),
    ("value 1e400", _value("1e400"), 2, r"interactions\.csv, row 3, field 'value': expected a finite number"),
    ("timestamps in milliseconds", _timestamps("ms"), 0, r"every timestamp is in milliseconds"),
    ("seconds and milliseconds mixed", _timestamps("mixed"), 2,
     r"interactions\.csv, row 5, field 'timestamp': timestamp '\d+' is in milliseconds while row 1 .* is in seconds"),
    ("a row dated 9999", _timestamps("9999"), 2,
     r"interactions\.csv, row 7, field 'timestamp': timestamp '9999-12-31T00:00:00' lies in the far future"),
    ("a timestamp of 10^18", _timestamps("1e18"), 2,
     r"interactions\.csv, row 2, field 'timestamp': timestamp '1000000000000000000' lies in the far future"),
    ("item ids with surrounding spaces", _spaced_ids, 0, None),
]


@pytest.mark.parametrize(("name", "make", "code", "pattern"), TABLE_PROBES, ids=[c[0] for c in TABLE_PROBES])
def test_table_probes(base: Base, tmp_path: Path, reliability, name: str, make, code: int, pattern: str | None) -> None:
    data = base.data_copy(tmp_path)
    make(data)
    art = base.fresh(tmp_path)
    before = digests(art)
    result = invoke("run", "--data", data, "--out", art, *base.opts(), env={"FUSIONREC_EXPORT_KEY": KEY})
    probe(reliability, name, result, code, pattern,
          damaged=None if code == 0 else changed(before, digests(art)))
    if code != 0:
        assert digests(art) == before | {"manifest.json": digests(art)["manifest.json"]} or \
            changed(before, digests(art)) == []


# --------------------------------------------------------------------------- media paths


def test_bad_media_paths_never_stop_the_job(base: Base, tmp_path: Path, reliability) -> None:
    from PIL import Image

    data = base.data_copy(tmp_path)
    media = data / "media"
    media.mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(media / "ok.png")
    os.mkfifo(media / "pipe.png")
    (media / "folder.png").mkdir()
    (media / "null.png").symlink_to("/dev/zero")
    cases = {
        "nul": ("media/ok.png\x00.txt", "NUL byte"),
        "fifo": ("media/pipe.png", "not a regular file"),
        "directory": ("media/folder.png", "not a regular file"),
        "device": ("media/null.png", "outside the data directory"),
        "url": ("https://example.com/a.png", "URLs are not fetched"),
        "ok": ("media/ok.png", None),
    }
    items = _items(data).head(len(cases))
    ids = items["item_id"].to_list()
    items.with_columns(pl.Series("image", [p for p, _ in cases.values()])).write_parquet(data / "items.parquet")
    (data / "items.csv").unlink()
    inter = _inter(data).filter(pl.col("item_id").is_in(ids))
    inter.write_csv(data / "interactions.csv")
    art = tmp_path / "art"
    opts = ["--set", f"embed.text.model={base.text_model}", "--set", "embed.image.weights=none",
            "--set", "embed.audio.enabled=false", "--set", "embed.max_failed_share=0.95", "-q"]
    result = invoke("embed", "--data", data, "--out", art, *opts)
    probe(reliability, "media: NUL, FIFO, directory, device, URL", result, 0,
          r"5 item image files could not be used \(first: item ")
    failures = pl.read_parquet(art / "embeddings" / "failures.parquet")
    errors = dict(zip(failures["id"], failures["error"]))
    for item, (name, (_, expected)) in zip(ids, cases.items()):
        if expected is None:
            assert item not in errors
        else:
            assert expected in errors[item], (name, errors.get(item))
    reliability.record(probes=len(cases) - 2, case="probe: each bad media path recorded in failures.parquet")
    # Over the media limit: the job fails, but keeps what it encoded, so a rerun encodes nothing again.
    tight = [*opts[:-3], "--set", "embed.max_failed_share=0.1", "-q"]
    art2 = tmp_path / "art2"
    first = invoke("embed", "--data", data, "--out", art2, *tight)
    probe(reliability, "media over embed.max_failed_share", first, 1, r"media files could not be read")
    again = invoke("embed", "--data", data, "--out", art2, *opts)
    assert again.exit_code == 0, again.output
    rows = json.loads((art2 / "manifest.json").read_text())["runs"][-1]["counts"]
    assert rows["item_text"]["encoded"] == 0 and rows["item_image"]["encoded"] == 0, rows


# --------------------------------------------------------------------------- damaged artifacts


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: max(1, path.stat().st_size // 2)])


def _zero(path: Path) -> None:
    path.write_bytes(b"\0" * path.stat().st_size)


def _garbage(path: Path) -> None:
    path.write_bytes(b"PAR1 garbage, not what the loader expects " * 10)


def _serving_files(art: Path) -> list[str]:
    return sorted(str(p.relative_to(art)) for p in art.rglob("*") if p.is_file()
                  and p.relative_to(art).parts[0] in ("data", "index", "sources", "ranker"))


def test_every_damaged_serving_artifact_is_a_clean_exit_1(base: Base, tmp_path: Path, reliability) -> None:
    names = _serving_files(base.art)
    assert any(n.startswith("index/") for n in names) and any(n.startswith("ranker/") for n in names)
    first = invoke("recommend", "--out", base.art, "--export", tmp_path / "reference.parquet", "-q",
                   env={"FUSIONREC_EXPORT_KEY": KEY})
    assert first.exit_code == 0, first.output
    reference = pl.read_parquet(tmp_path / "reference.parquet")
    failures = []
    for name in names:
        for how, damage in (("truncated", _truncate), ("zeroed", _zero), ("garbage", _garbage)):
            art = tmp_path / f"{name.replace('/', '_')}-{how}"
            shutil.copytree(base.art, art, symlinks=True)
            damage(art / name)
            out = tmp_path / f"{art.name}.parquet"
            result = invoke("recommend", "--out", art, "--export", out, "-q", env={"FUSIONREC_EXPORT_KEY": KEY})
            traceback = "Traceback" in result.output or (result.exception is not None
                                                        and not isinstance(result.exception, SystemExit))
            # Exit 0 from a damaged artifact is fine only if serving never read it: the same lists as before.
            silent = result.exit_code == 0 and not pl.read_parquet(out).equals(reference)
            if result.exit_code == 0 and not silent:
                reliability.record(case=f"  ({name} is not read by serving)")
                shutil.rmtree(art)
                continue
            reliability.record(probes=1, tracebacks=int(traceback), silent_damage=int(silent),
                               case=f"probe: {how} {name}")
            if traceback or silent or result.exit_code != 1 or not re.search(r"\brerun `fusionrec|\brun `fusionrec",
                                                                             flat(result.output)):
                failures.append((name, how, result.exit_code, flat(result.output)[-300:]))
            shutil.rmtree(art)
    assert failures == [], "\n".join(map(str, failures))


def test_swapped_artifacts_are_a_clean_exit_1(base: Base, tmp_path: Path, reliability) -> None:
    names = _serving_files(base.art)
    pairs = [(a, b) for a, b in zip(names, names[1:]) if Path(a).suffix == Path(b).suffix or True][:8]
    failures = []
    for a, b in pairs:
        art = tmp_path / "swap"
        shutil.copytree(base.art, art, symlinks=True)
        ra, rb = (art / a).read_bytes(), (art / b).read_bytes()
        (art / a).write_bytes(rb)
        (art / b).write_bytes(ra)
        result = invoke("recommend", "--out", art, "--export", tmp_path / "swap.parquet", "-q",
                        env={"FUSIONREC_EXPORT_KEY": KEY})
        traceback = "Traceback" in result.output or (result.exception is not None
                                                    and not isinstance(result.exception, SystemExit))
        reliability.record(probes=1, tracebacks=int(traceback), silent_damage=int(result.exit_code == 0),
                           case=f"probe: swapped {a} and {b}")
        if traceback or result.exit_code != 1:
            failures.append((a, b, result.exit_code, flat(result.output)[-300:]))
        shutil.rmtree(art)
    assert failures == []


# --------------------------------------------------------------------------- the CLI itself


def test_evaluate_k_0_is_a_usage_error(base: Base, tmp_path: Path, reliability) -> None:
    test = tmp_path / "test.csv"
    _inter(base.data).head(20).write_csv(test)
    for k in ("0", "10,0", "-3"):
        result = invoke("evaluate", "--out", base.art, "--test", test, "--k", k, "-q")
        probe(reliability, f"evaluate --k {k}", result, 2, r"--k")


def test_the_last_line_of_defence(tmp_path: Path, monkeypatch, capsys, reliability) -> None:
    from fusionrec import cli, jobs

    def boom(*_a, **_k):
        raise RuntimeError("an unforeseen bug\nwith a second line")

    monkeypatch.setattr(jobs, "run_nightly", boom)
    monkeypatch.setenv("FUSIONREC_CRASH_DIR", str(tmp_path / "crash"))
    monkeypatch.delenv("FUSIONREC_DEBUG", raising=False)
    data = tmp_path / "d"
    data.mkdir()
    with pytest.raises(SystemExit) as exit_:
        cli.main(["run", "--data", str(data), "--out", str(tmp_path / "art"), "-q"])
    err = capsys.readouterr().err
    assert exit_.value.code == 1
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert re.search(r"error: unexpected RuntimeError: an unforeseen bug \(traceback in \S+\.log; "
                     r"FUSIONREC_DEBUG=1 shows it\)", err), err
    log = Path(re.search(r"traceback in (\S+\.log)", err).group(1))
    assert "Traceback" in log.read_text() and "an unforeseen bug" in log.read_text()
    monkeypatch.setenv("FUSIONREC_DEBUG", "1")
    with pytest.raises(SystemExit) as exit_:
        cli.main(["run", "--data", str(data), "--out", str(tmp_path / "art"), "-q"])
    assert exit_.value.code == 1 and "Traceback" in capsys.readouterr().err
    # Usage errors stay exit 2.
    with pytest.raises(SystemExit) as exit_:
        cli.main(["recommend", "--k", "zero"])
    assert exit_.value.code == 2
    reliability.record(probes=3, case="probe: unexpected exception, FUSIONREC_DEBUG, usage error")


# --------------------------------------------------------------------------- precomputed embeddings


def _precomputed(ids: list, vectors) -> pl.DataFrame:
    return pl.DataFrame({"item_id": ids, "vector": vectors})


def _vectors(n: int, d: int = 16, seed: int = 0) -> list[list[float]]:
    # 16: the users' text is encoded by the tiny model (hidden 16), and a user's and an item's
    # text vectors need one dimension (`run` refuses others)
    return np.random.default_rng(seed).normal(size=(n, d)).astype(np.float32).tolist()


def _item_ids(base: Base) -> list[str]:
    return _items(base.data)["item_id"].to_list()


PRECOMPUTED_PROBES = [
    ("duplicate id", lambda ids: _precomputed(ids + [ids[3]], _vectors(len(ids) + 1)), 2,
     r"item_text\.parquet, row {n}, field 'item_id': duplicate id 'i0004' \(first on row 4\)"),
    ("ids with surrounding spaces", lambda ids: _precomputed([f"  {i} " for i in ids], _vectors(len(ids))), 0, None),
    ("ids spelled without leading zeros", lambda ids: _precomputed([re.sub(r"0+(?=\d)", "", i) for i in ids],
                                                                   _vectors(len(ids))), 2,
     r"item_text\.parquet, row 1, field 'item_id': \d+ of \d+ ids \(100%\) match no id of the items table .* "
     r"'i1' \(the items table has 'i0001'\)"),
    ("every vector empty", lambda ids: _precomputed(ids, [[] for _ in ids]), 2,
     r"item_text\.parquet, row 1, field 'vector': every vector is empty"),
    ("a vector column of strings", lambda ids: _precomputed(ids, ["0.1,0.2"] * len(ids)), 2,
     r"item_text\.parquet, row 1, field 'vector': vector must be a list of numbers, found String"),
    ("item_text.parquet is a directory", None, 2, r"item_text\.parquet, field 'vector': is a directory"),
]


@pytest.mark.parametrize(("name", "make", "code", "pattern"), PRECOMPUTED_PROBES,
                         ids=[c[0] for c in PRECOMPUTED_PROBES])
def test_precomputed_embedding_probes(base: Base, tmp_path: Path, reliability, name: str, make, code: int,
                                      pattern: str | None) -> None:
    data = base.data_copy(tmp_path)
    (data / "embeddings").mkdir()
    ids = _item_ids(base)
    target = data / "embeddings" / "item_text.parquet"
    if make is None:
        target.mkdir()
        (target / "part-0.parquet").write_bytes(b"")
    else:
        make(ids).write_parquet(target)
    # A second, good table that sorts first: it must not land either when the other is bad.
    _precomputed(ids, _vectors(len(ids), 4, seed=1)).write_parquet(data / "embeddings" / "item_audio.parquet")
    art = base.fresh(tmp_path)
    before = digests(art)
    result = invoke("embed", "--data", data, "--out", art, *base.opts())
    probe(reliability, f"precomputed: {name}", result, code,
          pattern.replace("{n}", str(len(ids) + 1)) if pattern else None,
          damaged=None if code == 0 else changed(before, digests(art)))
    if code != 0:
        assert changed(before, digests(art)) == []
    else:
        from fusionrec.pipeline.embedding.job import read_artifact_table

        assert sorted(read_artifact_table(art / "embeddings" / "item_text.parquet")[0]) == sorted(ids)


# --------------------------------------------------------------------------- config abuse (values: pipeline/config.py)


CONFIG_PROBES = [
    ("index.n_candidates=0", ["--set", "index.n_candidates=0"], r"index\.n_candidates"),
    ("export.k=0", ["--set", "export.k=0"], r"export\.k"),
    ("fusion.method=bogus", ["--set", "fusion.method=bogus"], r"fusion\.method"),
    ("ranker.objective=bogus", ["--set", "ranker.objective=bogus"], r"ranker\.objective"),
    ("index.factory=NotAFactory", ["--set", "index.factory=NotAFactory"], r"index\.factory"),
    ("embed.text.batch_size=0", ["--set", "embed.text.batch_size=0"], r"embed\.text\.batch_size"),
    ("a --config that is a directory", ["--config", "{dir}"], r"config"),
    ("a --config with invalid UTF-8", ["--config", "{latin1}"], r"config|UTF-8"),
    ("an unknown key", ["--set", "embed.txet.model=x"], r"embed\.txet"),
]


@pytest.mark.parametrize(("name", "args", "pattern"), CONFIG_PROBES, ids=[c[0] for c in CONFIG_PROBES])
def test_config_abuse_is_exit_2_before_any_stage(base: Base, tmp_path: Path, reliability, name: str,
                                                  args: list[str], pattern: str) -> None:
    (tmp_path / "conf.d").mkdir()
    (tmp_path / "latin1.toml").write_bytes(b"[embed.text]\nmodel = \"caf\xe9\"\n")
    args = [a.replace("{dir}", str(tmp_path / "conf.d")).replace("{latin1}", str(tmp_path / "latin1.toml"))
            for a in args]
    art = base.fresh(tmp_path)
    before = digests(art)
    result = invoke("run", "--data", base.data, "--out", art, *args, "-q")
    probe(reliability, f"config: {name}", result, 2, pattern, damaged=changed(before, digests(art)))
    assert digests(art) == before


def test_two_writers_one_waits_out(base: Base, tmp_path: Path, reliability) -> None:
    art = base.fresh(tmp_path)
    writer = ArtifactLock(art).acquire()
    before = digests(art)
    try:
        result = invoke("embed", "--data", base.data, "--out", art, *base.opts(), env={"FUSIONREC_LOCK_WAIT": "0"})
        probe(reliability, "embed during another writer", result, 1, r"another fusionrec job \(pid \d+",
              damaged=changed(before, digests(art)))
        assert digests(art) == before
    finally:
        writer.release()
