"""Ctrl-C that always stops a job, at the latest at the next safe point.

Python turns SIGINT into a KeyboardInterrupt wherever the main thread happens to be. When that
is a destructor (`__del__`) or a weakref callback, the exception is printed as "Exception
ignored" and dropped, and the job went on to finish with exit 0. `install` (called by
`cli.main`) also remembers the request, silences that printout, and `check`, called at the
boundaries of stages and batches (and by every run record before it reports success), raises
the interrupt again there. Work already committed (finished shards, atomically written
artifacts) is kept, so a rerun resumes.
"""

from __future__ import annotations

import signal
import sys
import threading
from typing import Any

_requested = threading.Event()
_installed = False


def _on_sigint(signum: int, frame: Any) -> None:
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
    """Handle SIGINT as above; only from the main thread (where Python delivers signals)."""
    global _installed
    if _installed or threading.current_thread() is not threading.main_thread():
        return
    if signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        return  # someone (a test runner, an embedding host) chose their own handler: keep it
    signal.signal(signal.SIGINT, _on_sigint)
    sys.unraisablehook = _unraisable(sys.unraisablehook)
    _installed = True


def requested() -> bool:
    """Whether Ctrl-C (SIGINT) was pressed during this process."""
    return _requested.is_set()


def check() -> None:
    """Raise KeyboardInterrupt if an interrupt was requested (even one that was swallowed)."""
    if _requested.is_set():
        raise KeyboardInterrupt


def request() -> None:
    """Record an interrupt as SIGINT does (for tests and for hosts that catch the signal themselves)."""
    _requested.set()


def clear() -> None:
    """Forget a recorded interrupt (tests, or a host that goes on after handling one)."""
    _requested.clear()
