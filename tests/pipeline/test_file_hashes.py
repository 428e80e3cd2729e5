"""File hashes remembered by (path, size, mtime, ctime, inode): what a rerun reads again, and --verify."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fusionrec.pipeline.config import load_config
from fusionrec.pipeline.embedding import encoding
from fusionrec.pipeline.embedding.job import CACHE_DIR, ENCODER_IDENTITIES, FILE_HASHES, run_embed
from fusionrec.pipeline.io import storage
from fusionrec.pipeline.io.manifest import read_manifest
from fusionrec.pipeline.io.storage import FileHashes, sha256_file
from tests.pipeline.test_embed import fake_encoders, last_counts, write_catalog
from tests.tiny_models import tiny_text_model

PROJECT = Path(__file__).resolve().parents[2]
LONG_AGO = time.time() - 3600  # files last written an hour ago (a fresh file is hashed again: RACY_NS)


def backdate(*paths: Path) -> None:
    for path in paths:
        for f in [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]:
            os.utime(f, (LONG_AGO, LONG_AGO))


@pytest.fixture
def hashed(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The files whose bytes were read to hash them (every file hash goes through sha256_fileobj)."""
    seen: list[str] = []
    real = storage.sha256_fileobj

    def spy(fh, *args, **kwargs):
        seen.append(os.path.basename(fh.name))
        return real(fh, *args, **kwargs)

    monkeypatch.setattr(storage, "sha256_fileobj", spy)
    return seen


def test_unchanged_files_are_not_read_again(tmp_path: Path, hashed: list[str]) -> None:
    files = [tmp_path / f"f{i}.bin" for i in range(3)]
    for i, f in enumerate(files):
        f.write_bytes(f"content {i}".encode())
    backdate(*files)
    store = tmp_path / "hashes.parquet"
    first = FileHashes(store)
    digests = [first.sha256(f) for f in files]
    first.save()
    assert digests == [sha256_file(f) for f in files] and first.hashed == 3
    hashed.clear()

    again = FileHashes(store)
    assert [again.sha256(f) for f in files] == digests
    assert hashed == [] and again.hashed == 0
    again.save()  # nothing changed: the cache file is not rewritten
    assert store.stat().st_mtime_ns == os.stat(store).st_mtime_ns


def test_changed_replaced_and_verified_files_are_read_again(tmp_path: Path, hashed: list[str]) -> None:
    a, b, c = (tmp_path / n for n in ("a.bin", "b.bin", "c.bin"))
    a.write_bytes(b"aaaa")
    b.write_bytes(b"bbbb")
    c.write_bytes(b"cccc")
    backdate(a, b, c)
    store = tmp_path / "hashes.parquet"
    cache = FileHashes(store)
    for f in (a, b, c):
        cache.sha256(f)
    cache.save()

    a.write_bytes(b"AAAA!")  # new content (size and mtime change)
    backdate(a)
    st = b.stat()
    other = tmp_path / "other.bin"
    other.write_bytes(b"BBBB")  # same size, then the same mtime: only the inode tells
    os.replace(other, b)
    os.utime(b, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert (b.stat().st_size, b.stat().st_mtime_ns) == (st.st_size, st.st_mtime_ns) and b.stat().st_ino != st.st_ino
    hashed.clear()
    rerun = FileHashes(store)
    got = [rerun.sha256(f) for f in (a, b, c)]
    assert hashed == ["a.bin", "b.bin"] and rerun.hashed == 2  # c came from the cache
    assert got == [sha256_file(f) for f in (a, b, c)]
    rerun.save()

    hashed.clear()
    verify = FileHashes(store, verify=True)
    for f in (a, b, c):
        verify.sha256(f)
    assert sorted(hashed) == ["a.bin", "b.bin", "c.bin"] and verify.hashed == 3


def test_an_in_place_rewrite_that_puts_the_mtime_back_is_read_again(tmp_path: Path, hashed: list[str]) -> None:
    """`cp -p` onto an existing file or `rsync --inplace -t`: same path, size, mtime and inode;
    only the change time (ctime) tells."""
    f = tmp_path / "weights.bin"
    f.write_bytes(b"version 1 of the weights")
    backdate(f)
    store = tmp_path / "hashes.parquet"
    cache = FileHashes(store)
    old = cache.sha256(f)
    cache.save()
    st = f.stat()
    time.sleep(0.01)
    with open(f, "r+b") as fh:  # the same inode, the same size
        fh.write(b"version 2")
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
    after = f.stat()
    assert (after.st_size, after.st_mtime_ns, after.st_ino) == (st.st_size, st.st_mtime_ns, st.st_ino)
    hashed.clear()
    new = FileHashes(store).sha256(f)
    assert hashed == ["weights.bin"] and new == sha256_file(f) != old


def test_a_file_written_just_now_is_not_remembered(tmp_path: Path, hashed: list[str]) -> None:
    f = tmp_path / "fresh.bin"
    f.write_bytes(b"written a moment ago")  # a write in the same timestamp tick could follow unseen
    store = tmp_path / "hashes.parquet"
    first = FileHashes(store)
    first.sha256(f)
    first.save()
    hashed.clear()
    FileHashes(store).sha256(f)
    assert hashed == ["fresh.bin"]


def test_a_damaged_cache_is_only_a_cache(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    f = tmp_path / "f.bin"
    f.write_bytes(b"x")
    store = tmp_path / "hashes.parquet"
    store.write_bytes(b"PAR1 not a parquet file")
    cache = FileHashes(store)
    assert cache.sha256(f) == sha256_file(f) and cache.hashed == 1
    assert "ignoring the file hash cache" in caplog.text


def test_embed_rerun_with_nothing_changed_hashes_no_file(tmp_path: Path, hashed: list[str]) -> None:
    data, art = tmp_path / "data", tmp_path / "art"
    write_catalog(data, n=6)
    backdate(data)
    encoders, _ = fake_encoders()
    run_embed(data, art, encoders=encoders, show_progress=False)
    assert (art / CACHE_DIR / FILE_HASHES).is_file()
    assert "items.csv" in hashed and "i0.bin" in hashed
    first_inputs = read_manifest(art)["runs"][-1]["inputs"]

    hashed.clear()
    encoders, text = fake_encoders()
    report = run_embed(data, art, encoders=encoders, show_progress=False)
    assert hashed == [] and report.files_hashed == 0
    assert read_manifest(art)["runs"][-1]["inputs"] == first_inputs  # the same sha256, remembered
    assert text.rows == 0 and last_counts(art)["item_image"]["encoded"] == 0

    # One image rewritten with new content: that file alone is read, and its row alone encoded.
    (data / "media" / "i3.bin").write_bytes(b"new pixels of 3")
    backdate(data / "media" / "i3.bin")
    hashed.clear()
    encoders, _ = fake_encoders()
    run_embed(data, art, encoders=encoders, show_progress=False)
    assert hashed == ["i3.bin"]
    assert last_counts(art)["item_image"]["encoded"] == 1 and last_counts(art)["item_image"]["reused"] == 5

    # The same bytes under a new inode with the same size and mtime: read again, nothing encoded.
    st = (data / "media" / "i4.bin").stat()
    copy = data / "media" / "copy.tmp"
    copy.write_bytes((data / "media" / "i4.bin").read_bytes())
    os.replace(copy, data / "media" / "i4.bin")
    os.utime(data / "media" / "i4.bin", ns=(st.st_atime_ns, st.st_mtime_ns))
    hashed.clear()
    encoders, _ = fake_encoders()
    run_embed(data, art, encoders=encoders, show_progress=False)
    assert hashed == ["i4.bin"] and last_counts(art)["item_image"]["encoded"] == 0

    # --verify reads every file again (and changes nothing else).
    hashed.clear()
    encoders, _ = fake_encoders()
    report = run_embed(data, art, encoders=encoders, show_progress=False, verify=True)
    assert sorted(hashed) == sorted(["items.csv", *(f"i{i}.bin" for i in range(6))]) and report.files_hashed == 7
    assert last_counts(art)["item_image"]["encoded"] == 0 and last_counts(art)["item_text"]["encoded"] == 0


def test_the_cli_passes_verify_to_the_job(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from fusionrec import cli
    from fusionrec.pipeline.embedding.job import EmbedReport

    seen: dict[str, object] = {}

    def fake_run_embed(data_dir, art_dir, config, **options):
        seen.update(options)
        return EmbedReport()

    monkeypatch.setattr(cli.jobs, "run_embed", fake_run_embed)
    (tmp_path / "data").mkdir()
    for verify in (False, True):
        args = ["embed", "--data", str(tmp_path / "data"), "--out", str(tmp_path / "art"), "-q"]
        result = CliRunner().invoke(cli.app, args + (["--verify"] if verify else []))
        assert result.exit_code == 0, result.output
        assert seen["verify"] is verify


def test_a_known_encoder_loads_only_when_it_encodes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = tiny_text_model(tmp_path / "tiny")
    cfg = load_config(overrides=[f"embed.text.model={model}", "embed.device=cpu"]).embed
    eager = encoding.build_encoders(cfg, {"text"})["text"]
    known = {"text": {"key": eager.identity_key, "model_id": eager.model_id, "dim": eager.dim,
                      "preprocess_id": eager.preprocess_id, "prepare": False}}
    built: list[str] = []
    real = encoding.TextEncoder

    def counting(*args, **kwargs):
        built.append("text")
        return real(*args, **kwargs)

    monkeypatch.setattr(encoding, "TextEncoder", counting)
    lazy = encoding.build_encoders(cfg, {"text"}, known=known)["text"]
    assert built == [] and (lazy.model_id, lazy.dim, lazy.files) == (eager.model_id, eager.dim, eager.files)
    assert lazy.encode(["ocean sea wave"]).tolist() == eager.encode(["ocean sea wave"]).tolist()
    lazy.encode(["snow"])
    assert built == ["text"]  # loaded once, on first use
    # Another configuration (here a different max_length) is another identity: loaded at once.
    other = load_config(overrides=[f"embed.text.model={model}", "embed.device=cpu", "embed.text.max_length=8"]).embed
    encoding.build_encoders(other, {"text"}, known=known)
    assert built == ["text", "text"]
    # A damaged entry (a field missing) is no identity: loaded at once.
    encoding.build_encoders(cfg, {"text"}, known={"text": {"key": eager.identity_key, "dim": "16"}})
    assert built == ["text", "text", "text"]


RERUN_SCRIPT = r"""
import sys
from pathlib import Path
from fusionrec.pipeline.config import load_config
from fusionrec.pipeline.embedding.job import run_embed
cfg = load_config(overrides=["embed.text.model=" + sys.argv[3], "embed.device=cpu"])
report = run_embed(Path(sys.argv[1]), Path(sys.argv[2]), cfg, show_progress=False, verify=sys.argv[4] == "1")
print(report.files_hashed, report.counts["item_text"].encoded,
      " ".join(m for m in ("torch", "transformers", "timm", "librosa") if m in sys.modules))
"""


def test_a_rerun_with_nothing_changed_loads_no_model(tmp_path: Path) -> None:
    data, art = tmp_path / "data", tmp_path / "art"
    write_catalog(data, n=5, with_media=False)
    model = tiny_text_model(tmp_path / "tiny")
    backdate(data, model)

    def embed(verify: bool = False) -> list[str]:
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH",)}
        result = subprocess.run([sys.executable, "-c", RERUN_SCRIPT, str(data),
                                 str(art), str(model), "1" if verify else "0"],
                                capture_output=True, text=True, env=env, timeout=600, check=False)
        assert result.returncode == 0, result.stderr[-3000:]
        return result.stdout.split()

    cold = embed()
    assert cold[:2] != ["0", "0"] and cold[1] == "5" and "torch" in cold[2:]
    assert (art / CACHE_DIR / ENCODER_IDENTITIES).is_file()
    assert embed() == ["0", "0"]  # nothing hashed, nothing encoded, no deep-learning library imported
    verified = embed(verify=True)  # --verify: every file hashed again, the encoder loaded
    assert int(verified[0]) >= 2 and verified[1] == "0" and "torch" in verified[2:]


def test_a_rerun_with_only_a_known_corrupt_image_loads_no_model(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """The configured (lazily loaded) image encoder: a file that failed to decode, unchanged,
    neither loads the model again nor is read; --verify loads it and reads the file again."""
    data, art = tmp_path / "data", tmp_path / "art"
    write_catalog(data, n=5)
    (data / "media" / "i2.bin").write_bytes(b"corrupt jpeg")
    backdate(data)
    cfg = load_config(overrides=["embed.text.enabled=false", "embed.image.weights=none", "embed.device=cpu"])
    loads: list[str] = []
    decoded: list[str] = []

    def fake_load(embed_cfg, needed):
        loads.extend(sorted(needed))
        image = fake_encoders()[0]["image"]
        prepare = image.prepare
        assert prepare is not None

        def counting(path: Path):
            decoded.append(path.name)
            return prepare(path)

        image.prepare = counting
        return {m: image for m in needed}

    monkeypatch.setattr(encoding, "_load_encoders", fake_load)
    run_embed(data, art, cfg, show_progress=False)
    assert loads == ["image"] and len(decoded) == 5 and last_counts(art)["item_image"]["failed"] == 1

    loads.clear()
    decoded.clear()
    report = run_embed(data, art, cfg, show_progress=False)
    assert loads == [] and decoded == []  # no model loaded, no media file decoded
    assert report.counts["item_image"].failed == 1 and report.counts["item_image"].reused == 4
    assert report.files_hashed == 0

    report = run_embed(data, art, cfg, show_progress=False, verify=True)
    assert loads == ["image"] and decoded == ["i2.bin"] and report.counts["item_image"].failed == 1
