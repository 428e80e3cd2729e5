"""Ctrl-C and failures leave a run record that says what happened (pipeline.interrupts, io.manifest).

The end-to-end cases (a real SIGINT mid-night, one landing in a destructor) are in
tests/test_faults.py."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from fusionrec.pipeline import interrupts
from fusionrec.pipeline.errors import FusionrecError, InputError
from fusionrec.pipeline.io.manifest import stage_run


@pytest.fixture
def requested_interrupt():
    interrupts.request()
    try:
        yield
    finally:
        interrupts.clear()


def runs(art: Path) -> list[dict]:
    return json.loads((art / "manifest.json").read_text())["runs"]


def test_a_swallowed_interrupt_turns_the_next_success_into_an_interrupted_record(tmp_path: Path) -> None:
    try:
        with pytest.raises(KeyboardInterrupt), stage_run("index", tmp_path, lock=False) as record:
            interrupts.request()  # Ctrl-C lands where Python drops it; the stage goes on to the end
            record.finish("ok")
    finally:
        interrupts.clear()
    (only,) = runs(tmp_path)
    assert only["command"] == "index" and only["status"] == "interrupted"
    assert only["error"] == "interrupted (Ctrl-C)"


def test_no_stage_starts_after_an_interrupt(tmp_path: Path, requested_interrupt) -> None:
    started = []
    with pytest.raises(KeyboardInterrupt), stage_run("train", tmp_path, lock=False):
        started.append(True)
    assert started == [] and not (tmp_path / "manifest.json").exists()


@pytest.mark.parametrize(("exc", "error"), [
    (FusionrecError("the interactions table is empty"), "the interactions table is empty"),
    (ValueError("bad shape\nsecond line"), "unexpected ValueError: bad shape"),
])
def test_a_stage_that_raises_leaves_a_failed_record_with_the_reason(tmp_path: Path, exc: Exception,
                                                                   error: str) -> None:
    with pytest.raises(type(exc)), stage_run("train", tmp_path, lock=False) as record:
        record.counts["rows"] = 3
        raise exc
    (only,) = runs(tmp_path)
    assert (only["status"], only["error"], only["counts"]) == ("failed", error, {"rows": 3})


def test_bad_input_leaves_the_manifest_as_it_was(tmp_path: Path) -> None:
    with pytest.raises(InputError), stage_run("embed", tmp_path, lock=False):
        raise InputError("not a number", file="items.csv", row=3, field="price")
    assert not (tmp_path / "manifest.json").exists()


def test_a_failure_on_a_missing_artifacts_directory_does_not_create_it(tmp_path: Path) -> None:
    with pytest.raises(FusionrecError), stage_run("recommend", tmp_path / "none", lock=False):
        raise FusionrecError("no index yet: run `fusionrec index` first")
    assert list(tmp_path.iterdir()) == []


def test_a_stage_that_recorded_its_own_failure_is_not_recorded_twice(tmp_path: Path) -> None:
    with pytest.raises(FusionrecError), stage_run("embed", tmp_path, lock=False) as record:
        record.extra["error"] = "too many media files could not be read"
        record.finish("failed")
        raise FusionrecError("too many media files could not be read")
    assert [(r["status"], r["error"]) for r in runs(tmp_path)] == [("failed", "too many media files could not be read")]


def test_the_unraisable_hook_drops_only_a_requested_interrupt(requested_interrupt) -> None:
    seen = []
    hook = interrupts._unraisable(seen.append)
    dropped = SimpleNamespace(exc_value=KeyboardInterrupt())
    other = SimpleNamespace(exc_value=ValueError("a real bug in a destructor"))
    hook(dropped)
    hook(other)
    assert seen == [other]
    interrupts.clear()
    hook(dropped)  # a KeyboardInterrupt nobody asked for (raised by code) is still shown
    assert seen == [other, dropped]


def test_sigterm_is_recorded_and_exits_as_sigterm(tmp_path: Path) -> None:
    """SIGTERM (a scheduler's stop) is an interrupt too: its record and exit status name it."""
    import signal

    try:
        with pytest.raises(KeyboardInterrupt), stage_run("train", tmp_path, lock=False) as record:
            interrupts.request(signal.SIGTERM)
            interrupts.request(signal.SIGINT)  # a later Ctrl-C does not change what stopped the job
            record.finish("ok")
        assert (interrupts.reason(), interrupts.exit_code()) == ("SIGTERM", 143)
    finally:
        interrupts.clear()
    assert (interrupts.reason(), interrupts.exit_code()) == ("Ctrl-C", 130)
    (only,) = runs(tmp_path)
    assert (only["status"], only["error"]) == ("interrupted", "interrupted (SIGTERM)")


def test_sighup_stops_a_job_like_sigterm_unless_it_is_ignored_as_under_nohup() -> None:
    """A closed terminal sends SIGHUP, which killed the job outright (no line, no record, the
    lock left); now it is an interrupt (exit 129). Under nohup (SIGHUP ignored) the job goes on."""
    import os
    import signal
    import subprocess
    import sys

    code = ("import os, signal\n"
            "from fusionrec.pipeline import interrupts\n"
            "interrupts.install()\n"
            "try:\n"
            "    os.kill(os.getpid(), signal.SIGHUP)\n"
            "    interrupts.check()\n"
            "    print('went on')\n"
            "except KeyboardInterrupt:\n"
            "    print(interrupts.reason(), interrupts.exit_code())\n")
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": str(root)}
    # The default disposition set explicitly: this test itself may run under nohup (ignored, inherited).
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=root, env=env,
                         preexec_fn=lambda: signal.signal(signal.SIGHUP, signal.SIG_DFL))
    assert out.stdout.split() == ["SIGHUP", "129"], out.stderr
    under_nohup = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=root,
                                 env=env, preexec_fn=lambda: signal.signal(signal.SIGHUP, signal.SIG_IGN))
    assert under_nohup.stdout.split() == ["went", "on"], under_nohup.stderr
