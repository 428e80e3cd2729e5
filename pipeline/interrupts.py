"""Ctrl-C that always stops a job, at the latest at the next safe point.

Python turns SIGINT into a KeyboardInterrupt wherever the main thread happens to be. When that
is a destructor (`__del__`) or a weakref callback, the exception is printed as "Exception
ignored" and dropped, and the job went on to finish with exit 0. `install` (called by
`cli.main`) also remembers the request, silences that printout, and `check`, called at the
boundaries of stages and batches (and by every run record before it reports success), raises
the interrupt again there. Work already committed (finished shards, atomically written
artifacts) is kept, so a rerun resumes.

SIGTERM (what a scheduler, `docker stop`, systemd or Kubernetes send) is handled the same way
(exit 143 instead of 130): by default it killed the job outright, with no line, no run record
and its `.lock` left behind, which a job on another host takes over only once its lease runs out. So is SIGHUP (the
terminal or SSH session that started the job closed; exit 129), unless it is ignored, as under
`nohup`, where the job goes on.
"""

from __future__ import annotations

import signal
import sys
import threading
from collections.abc import Callable
from typing import Any

_requested = threading.Event()
_installed = False
_signal = signal.SIGINT  # the first signal that asked the job to stop
NAMES = {signal.SIGINT: "Ctrl-C", signal.SIGTERM: "SIGTERM", signal.SIGHUP: "SIGHUP"}


def _on_signal(signum: int, frame: Any) -> None:
    global _signal
    if not _requested.is_set():
        _signal = signal.Signals(signum)
    _requested.set()
    raise KeyboardInterrupt


def _unraisable(previous: Any) -> Any:
    def hook(unraisable: Any) -> None:
        # The interrupt was requested and `check` raises it at the next boundary: no traceback.
        if isinstance(unraisable.exc_value, KeyboardInterrupt) and _requested.is_set():
            return
        previous(unraisable)

    return hook


def install() -> None:
    """Handle SIGINT, SIGTERM and SIGHUP as above; only from the main thread (where Python delivers
    signals). A signal whose handler someone else chose (a test runner, an embedding host) keeps it."""
    global _installed
    if _installed or threading.current_thread() is not threading.main_thread():
        return
    defaults = ((signal.SIGINT, signal.default_int_handler), (signal.SIGTERM, signal.SIG_DFL),
                (signal.SIGHUP, signal.SIG_DFL))
    ours = [s for s, default in defaults if signal.getsignal(s) == default]
    if not ours:
        return
    for signum in ours:
        signal.signal(signum, _on_signal)
    sys.unraisablehook = _unraisable(sys.unraisablehook)
    _installed = True


def requested() -> bool:
    """Whether Ctrl-C (SIGINT) was pressed, or SIGTERM received, during this process."""
    return _requested.is_set()


def reason() -> str:
    """What stopped the job, for its messages: "Ctrl-C", "SIGTERM" or "SIGHUP"."""
    return NAMES.get(_signal, _signal.name) if _requested.is_set() else NAMES[signal.SIGINT]


def exit_code() -> int:
    """The exit status of an interrupted job: 128 + the signal, as shells report it (130 for Ctrl-C)."""
    return 128 + int(_signal if _requested.is_set() else signal.SIGINT)


_checks: list[Callable[[], None]] = []  # more reasons to stop at a safe point (`on_check`)


def on_check(reason: Callable[[], None]) -> None:
    """Have `check` also call `reason`, which raises when the job must stop (the artifacts lock
    lost to another job: `storage.check_locks`)."""
    if reason not in _checks:
        _checks.append(reason)


def check() -> None:
    """Raise KeyboardInterrupt if an interrupt was requested (even one that was swallowed), or
    what a reason given to `on_check` raises."""
    if _requested.is_set():
        raise KeyboardInterrupt
    for reason in _checks:
        reason()


def request(signum: int = signal.SIGINT) -> None:
    """Record an interrupt as SIGINT (or `signum`) does (for tests and for hosts that catch the signal themselves)."""
    global _signal
    if not _requested.is_set():
        _signal = signal.Signals(signum)
    _requested.set()


def clear() -> None:
    """Forget a recorded interrupt (tests, or a host that goes on after handling one)."""
    global _signal
    _requested.clear()
    _signal = signal.SIGINT
