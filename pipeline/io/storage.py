"""Atomic writes, the artifacts lock and content hashes.

Every artifact appears by `os.replace` of a finished temporary file in the same
directory, so a killed job never leaves a partial file under its final name.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import re
import signal
import socket
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from fusionrec.pipeline import interrupts
from fusionrec.pipeline.errors import ConfigError, FusionrecError, LockError, first_line

TMP_PREFIX = ".tmp-"
FAULT_ENV = "FUSIONREC_FAULT"  # test hook, e.g. "write:3" (kill -9) or "write:3=enospc"
FAULT_TRACE_ENV = "FUSIONREC_FAULT_TRACE"  # test hook: append every fault point reached to this file
_fault_counts: dict[str, int] = {}
# Writers report a full or unwritable disk in their own exception types (polars: ComputeError,
# faiss: RuntimeError); their messages carry the OS error, which is what tells them apart from bugs.
_IO_FAILURE_RE = re.compile(r"os error \d+|IO error|write error|Errno \d+|No space left|File too large|"
                            r"Read-only file system|Permission denied|Disk quota", re.IGNORECASE)

log = logging.getLogger("fusionrec.storage")


def fault_point(name: str, path: Path | str | None = None, tmp: Path | None = None) -> None:
    """A place where tests crash the job on purpose; a no-op unless FUSIONREC_FAULT(_TRACE) is set.

    `FUSIONREC_FAULT=write:3` kills the process (SIGKILL, as `kill -9`) at the third `write`
    point it reaches (`write`: a finished temporary file about to replace its artifact;
    `written`: just replaced); `write:3=enospc` raises "No space left on device" there
    instead, `write:3=stop` stops the process (SIGSTOP), alive and holding its lock, and
    `write:3=torn` cuts the temporary file to half its size before the kill (a kill mid-write);
    `write:3=int` is Ctrl-C there, and `write:3=int-in-del` Ctrl-C landing in a destructor,
    where Python drops the KeyboardInterrupt (`pipeline.interrupts`).
    """
    spec, trace = os.environ.get(FAULT_ENV), os.environ.get(FAULT_TRACE_ENV)
    if not spec and not trace:
        return
    n = _fault_counts[name] = _fault_counts.get(name, 0) + 1
    if trace:
        with open(trace, "a") as fh:
            fh.write(f"{name}:{n}\t{path}\n")
    if spec:
        target, _, action = spec.partition("=")
        if target == f"{name}:{n}":
            if action == "enospc":
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
            if action == "torn" and tmp is not None and tmp.is_file():
                os.truncate(tmp, tmp.stat().st_size // 2)
            if action == "int":
                os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C: the handler raises here
                time.sleep(5)
                return
            if action == "int-in-del":
                _interrupt_in_a_destructor()
                return
            os.kill(os.getpid(), signal.SIGSTOP if action == "stop" else signal.SIGKILL)


class _InterruptedWhileCollected:
    def __del__(self) -> None:
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(5)  # the handler runs in this destructor; Python drops its KeyboardInterrupt


def _interrupt_in_a_destructor() -> None:
    """Ctrl-C landing in a destructor, where Python prints and drops the KeyboardInterrupt."""
    _InterruptedWhileCollected()  # collected at once


def _io_failure(exc: BaseException) -> str | None:
    """The OS-level reason when `exc` is a failed write (disk full, read-only ...), else None."""
    if isinstance(exc, FusionrecError):
        return None
    if isinstance(exc, OSError):
        return exc.strerror or str(exc)
    text = str(exc)
    if isinstance(exc, Exception) and _IO_FAILURE_RE.search(text):
        return text.strip().splitlines()[0][-300:] if text.strip() else type(exc).__name__
    return None


@contextlib.contextmanager
def atomic_path(path: Path | str) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it replaces `path` atomically."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise FusionrecError(f"cannot create directory {path.parent}: {exc.strerror or exc}") from exc
    tmp = path.parent / f"{TMP_PREFIX}{uuid.uuid4().hex[:12]}-{path.name}"
    check_locks_held(path)
    try:
        yield tmp
        if tmp.is_file():
            with open(tmp, "rb") as fh:
                os.fsync(fh.fileno())
        fault_point("write", path, tmp)
        check_locks_held(path)  # a job that lost its artifacts lock replaces nothing more
        os.replace(tmp, path)
        _fsync_directory(path.parent)  # the rename itself survives a power loss
    except BaseException as exc:
        _remove_quietly(tmp)
        reason = _io_failure(exc)
        if reason is not None:
            raise FusionrecError(f"cannot write {path}: {reason}") from exc
        raise
    fault_point("written", path)


def _fsync_directory(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return  # platforms without directory handles
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems refuse fsync on a directory; the file itself is synced
    finally:
        os.close(fd)


def _remove_quietly(path: Path) -> None:
    with contextlib.suppress(OSError):
        if path.is_dir():
            import shutil

            shutil.rmtree(path)
        else:
            path.unlink()


def write_parquet(table: pa.Table, path: Path | str) -> None:
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, compression="zstd")


def write_json(obj: Any, path: Path | str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def write_text(text: str, path: Path | str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def keep_files(files: list[Path], folder: Path | str) -> None:
    """Make `folder` hold these files under their names, all of them or none: hard links (copies
    where the filesystem has none) gathered in a temporary folder beside it, which then replaces
    it (`atomic_path`; a folder already there is removed first). For a set of files a writer is
    about to replace one at a time: the kept copy stays whole meanwhile."""
    import shutil

    folder = Path(folder)
    with atomic_path(folder) as tmp:
        tmp.mkdir()
        for source in files:
            try:
                os.link(source, tmp / source.name)  # the writer replaces the file, never rewrites it in place
            except OSError:
                shutil.copyfile(source, tmp / source.name)
                with open(tmp / source.name, "rb") as fh:
                    os.fsync(fh.fileno())
        _fsync_directory(tmp)
        _remove_quietly(folder)  # os.replace puts a folder only where none is, or an empty one


def clean_temporaries(directory: Path) -> int:
    """Remove temporary files a killed job left behind; returns how many."""
    removed = 0
    if directory.is_dir():
        for tmp in directory.rglob(f"{TMP_PREFIX}*"):
            _remove_quietly(tmp)
            removed += 1
    return removed


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path | str) -> str:
    with open(path, "rb") as fh:
        return sha256_fileobj(fh)


def sha256_fileobj(fh: Any, chunk: int = 1 << 20) -> str:
    """sha256 of what is left to read of an open binary file (every file hash goes through here)."""
    digest = hashlib.sha256()
    while block := fh.read(chunk):
        digest.update(block)
    return digest.hexdigest()


HASH_CACHE_SCHEMA = pa.schema([("path", pa.string()), ("size", pa.int64()), ("mtime_ns", pa.int64()),
                               ("ctime_ns", pa.int64()), ("inode", pa.int64()), ("sha256", pa.string())])
RACY_NS = 2_000_000_000  # a file modified this close to its hashing is hashed again next time


class FileHashes:
    """sha256 of files, remembered by (path, size, modification time, change time, inode) in a
    Parquet file.

    A file whose absolute path, size, mtime, ctime and inode all match the remembered entry is
    not read again (ctime, as git does: a rewrite that puts the mtime back, such as
    `cp -p` or `rsync --inplace -t`, still changes it); any other file (new, rewritten, or replaced by another file with the same size
    and mtime) is hashed. `verify=True` hashes every file again. Entries are taken from an
    `os.fstat` of the open file being hashed, so they describe exactly the bytes read; a file
    modified within `RACY_NS` of its hashing is not remembered (a later write in the same
    timestamp tick could otherwise go unseen). `save` keeps the entries this run looked up.
    """

    def __init__(self, store: Path | str | None = None, *, verify: bool = False) -> None:
        self.store = None if store is None else Path(store)
        self.verify = verify
        self.hashed = 0  # files read (hashed) by this object
        self._known: dict[str, tuple[int, int, int, int, str]] | None = None
        self._used: dict[str, tuple[int, int, int, int, str]] = {}

    def _load(self) -> dict[str, tuple[int, int, int, int, str]]:
        if self._known is None:
            self._known = {}
            if self.store is not None and self.store.is_file():
                try:
                    # ParquetFile, not read_table: the latter imports pyarrow.dataset (0.3 s).
                    cols = pq.ParquetFile(self.store).read().cast(HASH_CACHE_SCHEMA).to_pydict()
                    self._known = {p: (s, m, c, i, h) for p, s, m, c, i, h in zip(
                        cols["path"], cols["size"], cols["mtime_ns"], cols["ctime_ns"], cols["inode"],
                        cols["sha256"], strict=True)}
                except (OSError, ValueError, pa.ArrowException) as exc:  # a damaged cache is only a cache
                    log.warning("ignoring the file hash cache %s (%s): every file is hashed again", self.store,
                                exc)
        return self._known

    def sha256(self, path: Path | str) -> str:
        """The file's sha256, from the cache when its path, size, mtime, ctime and inode are unchanged."""
        key = os.path.abspath(path)
        if not self.verify:
            known = self._load().get(key)
            if known is not None:
                st = os.stat(key)
                if (st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino) == known[:4]:
                    self._used[key] = known
                    return known[4]
        started = time.time_ns()
        with open(key, "rb") as fh:
            before = os.fstat(fh.fileno())
            digest = sha256_fileobj(fh)
            after = os.fstat(fh.fileno())
        self.hashed += 1
        stat = (before.st_size, before.st_mtime_ns, before.st_ctime_ns, before.st_ino)
        if stat == (after.st_size, after.st_mtime_ns, after.st_ctime_ns, after.st_ino) \
                and before.st_mtime_ns < started - RACY_NS:
            self._used[key] = (*stat, digest)
        else:
            self._used.pop(key, None)
        return digest

    def save(self) -> None:
        """Write the entries looked up since creation (atomically), when they differ from the file's."""
        if self.store is None or (self._known is not None and self._known == self._used):
            return
        rows = sorted(self._used.items())
        table = pa.table({"path": [p for p, _ in rows], "size": [e[0] for _, e in rows],
                          "mtime_ns": [e[1] for _, e in rows], "ctime_ns": [e[2] for _, e in rows],
                          "inode": [e[3] for _, e in rows], "sha256": [e[4] for _, e in rows]},
                         schema=HASH_CACHE_SCHEMA)
        write_parquet(table, self.store)
        self._known = dict(self._used)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _process_start(pid: int) -> int | None:
    """When process `pid` started (clock ticks since boot; Linux), to tell a reused pid apart."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return int(stat.rsplit(")", 1)[1].split()[19])
    except (OSError, ValueError, IndexError):
        return None


LOCK_GRACE_S = 10.0  # an unreadable lock younger than this may be one being written
LOCK_LEASE_ENV = "FUSIONREC_LOCK_LEASE"  # seconds another host's lock lives without a refresh
LOCK_LEASE_S = 600.0
LOCK_LEASE_BOUNDS = (10.0, 7 * 86400.0)  # under 10 s, file times' resolution (1-2 s) and pauses decide


def lock_lease() -> float:
    """`FUSIONREC_LOCK_LEASE` in seconds (default 600); ConfigError outside `LOCK_LEASE_BOUNDS`."""
    raw = os.environ.get(LOCK_LEASE_ENV, "").strip()
    if not raw:
        return LOCK_LEASE_S
    try:
        lease = float(raw)
    except ValueError:
        lease = float("nan")
    low, high = LOCK_LEASE_BOUNDS
    if not low <= lease <= high:  # nan fails too
        raise ConfigError(f"{LOCK_LEASE_ENV}={raw!r}: expected seconds from {low:g} to {high:g} (default "
                          f"{LOCK_LEASE_S:g}): how long another host waits on a lock its holder stopped refreshing")
    return lease


def _holder_key(holder: dict) -> tuple[Any, Any, Any, Any]:
    """Who holds a lock: pid, host, PID namespace and the process's start time (a pid alone
    repeats across containers and after restarts)."""
    return holder.get("pid"), holder.get("host"), holder.get("pidns"), holder.get("start")


def _pid_namespace() -> str | None:
    """This process's PID namespace (Linux: "pid:[4026531836]"); None where there is none to read."""
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return None


def _elsewhere(holder: dict, me: dict) -> bool:
    """Whether a lock's holder is out of this process's sight: another host, or another PID
    namespace on this one (containers that share the host's name, as with `--network host`,
    see other pids, or none, under the holder's number)."""
    if holder.get("host") != me["host"]:
        return True
    theirs, ours = holder.get("pidns"), me.get("pidns")
    return theirs is not None and ours is not None and theirs != ours


def _lease_of(holder: dict) -> float | None:
    """The lease a lock's holder keeps refreshing, in seconds; None for a lock without one."""
    lease = holder.get("lease")
    if isinstance(lease, bool) or not isinstance(lease, (int, float)) or not 0 < lease < float("inf"):
        return None
    return float(lease)


_HELD: list[ArtifactLock] = []  # the artifacts locks this process holds: `atomic_path` checks them


def check_locks_held(path: Path) -> None:
    """Raise LockError if `path` lies in an artifacts directory whose lock this process took and
    has since lost (`ArtifactLock.verify`): called as each atomic write starts and before it replaces."""
    if not _HELD:
        return
    where = os.path.abspath(path)
    for lock in list(_HELD):
        if where.startswith(lock.root_):
            lock.verify(path)


def check_locks() -> None:
    """Raise LockError if this process lost any artifacts lock it holds: at every safe point
    (`interrupts.check`: each stage, batch and shard), so a job that lost its directory stops
    before it removes or writes anything more there."""
    for lock in list(_HELD):
        lock.verify()


interrupts.on_check(check_locks)


class ArtifactLock:
    """An exclusive lock on an artifacts directory (`ART/.lock`).

    The lock file holds the owner's pid, its start time, host and lease; it appears complete (a
    finished temporary file hard-linked onto `.lock`, which fails if one exists). A lock
    whose process is gone on this host (or whose pid now belongs to another process) is
    stale: it is taken over, with a note in `taken_over_`, and the temporary files the dead
    job left in the artifacts directory are removed.

    Another host's process cannot be looked up (a Kubernetes pod or a container restarted
    after a kill -9 or an out-of-memory kill comes back under a new hostname), so the holder
    refreshes the lock file's time every tenth of its lease (`FUSIONREC_LOCK_LEASE`, default
    600 s; at most every minute), and another host's lock not refreshed for its lease is stale
    too. Its age is measured against the filesystem's clock (the time of a file just written
    beside it), not this host's. A lock written without a lease (before it existed) is never
    stale from another host. A holder that was stopped past its lease (SIGSTOP, a paused
    container, a suspended machine) may have lost its lock: each atomic write inside ART (as it
    starts and before it replaces) and every safe point (`interrupts.check`) first check that
    `.lock` is still its own (`verify`), and stop the job if not.
    """

    def __init__(self, art_dir: Path | str) -> None:
        self.art_dir = Path(art_dir)
        self.path = self.art_dir / ".lock"
        self.root_ = os.path.join(os.path.abspath(self.art_dir), "")
        self.taken_over_: dict | None = None
        self._rw: int | None = None  # the flock on ART/.rwlock while held
        self._heartbeat: tuple[Any, Any] | None = None  # (thread, stop event) refreshing the lease
        self._me: dict[str, Any] | None = None  # what this holder wrote into `.lock`
        self._fs_now: float | None = None  # the filesystem's time at the last attempt (`_age`)
        self._lost_said = False  # whether a safe point (`check_locks`) has said the lock was lost

    def acquire(self) -> ArtifactLock:
        lease = lock_lease()  # a bad value is bad usage (exit 2) before anything is touched
        check_out_folder(self.art_dir)  # a file in the way is bad usage (exit 2), as `split` and `doctor` say
        try:
            self.art_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise FusionrecError(f"cannot create artifacts directory {self.art_dir}: {exc.strerror or exc}") from exc
        me: dict[str, Any] = {"pid": os.getpid(), "start": _process_start(os.getpid()), "host": socket.gethostname(),
              "pidns": _pid_namespace(), "since": time.time(), "lease": lease}
        self._me = me
        for _ in range(3):
            try:
                self._create(json.dumps(me))
            except FileExistsError:
                try:
                    raw = self._read_existing()
                except OSError as exc:  # unreadable is not damaged: it may be a live job's
                    raise LockError(f"cannot read the lock {self.path} ({exc.strerror or exc}): another fusionrec "
                                    "job may be using it; wait for it to finish, or delete it once you know no "
                                    "job runs") from None
                if raw is None:
                    continue  # released meanwhile: try again
                mtime = self._mtime()
                holder = self._read_holder(raw)
                if holder is None and self._age() < LOCK_GRACE_S:
                    raise LockError(f"another fusionrec job is taking the lock {self.path}; wait for it to "
                                    "finish or use another --out") from None
                if holder is not None and self._alive(holder, me):
                    raise LockError(
                        f"another fusionrec job (pid {holder.get('pid')} on {holder.get('host')}) is using "
                        f"{self.art_dir}; wait for it to finish or use another --out{self._stale_hint(holder, me)}"
                    ) from None
                # Stale: its process is gone, its lease ran out (or the file is damaged). Remove and retry.
                self.taken_over_ = holder or {}
                if holder is not None and _elsewhere(holder, me):
                    self.taken_over_ = {**holder, "unrefreshed_s": round(self._age(), 1),
                                        "where": "on another host" if holder.get("host") != me["host"]
                                        else "in another PID namespace (container) on this host"}
                self._remove_if_unchanged(raw, mtime)
                continue
            except OSError as exc:
                raise FusionrecError(f"cannot write lock file {self.path}: {exc.strerror or exc}") from exc
            try:  # .lock is ours from here: whatever stops acquire now gives it back
                self._rw = _flock(self.art_dir, exclusive=True)
                self._start_heartbeat(me)
                _HELD.append(self)
                if self.taken_over_ is not None:
                    self._report_takeover(clean_temporaries(self.art_dir))
            except BaseException:
                self.release()
                raise
            return self
        raise LockError(f"could not take the lock {self.path}")

    def _report_takeover(self, removed: int) -> None:
        taken = self.taken_over_ or {}
        if "unrefreshed_s" in taken:
            log.warning("took over the lock of a job %s (pid %s on %s): not refreshed for %.0f s, past its lease of "
                        "%.0f s; removed %d temporary files it left", taken["where"], taken.get("pid"),
                        taken.get("host"), taken["unrefreshed_s"], _lease_of(taken) or 0.0, removed)
        else:
            log.warning("took over the lock of a job that is gone (pid %s on %s); removed %d temporary files it left",
                        taken.get("pid"), taken.get("host"), removed)

    def _create(self, payload: str) -> None:
        """Make `.lock` appear with its whole content, or raise FileExistsError."""
        tmp = self.art_dir / f"{TMP_PREFIX}lock-{uuid.uuid4().hex[:12]}"
        try:
            with open(tmp, "w") as fh:
                fh.write(payload)
                fh.flush()
                os.fsync(fh.fileno())
                # "Now" by the clock that stamps files here (the server's, on a network filesystem).
                self._fs_now = os.fstat(fh.fileno()).st_mtime
            try:
                os.link(tmp, self.path)
            except FileExistsError:
                raise
            except FileNotFoundError:
                # Another job took over a stale lock meanwhile and cleared the temporaries,
                # ours included: it holds the lock now.
                raise LockError(f"another fusionrec job is taking the lock {self.path}; wait for it to "
                                "finish or use another --out") from None
            except OSError as exc:  # no hard links on this filesystem: exclusive create instead
                if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV):
                    raise
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
                with os.fdopen(fd, "w") as fh:
                    fh.write(payload)
        finally:
            _remove_quietly(tmp)

    def _alive(self, holder: dict, me: dict) -> bool:
        if _elsewhere(holder, me):
            # Another machine's job, or another container's on this machine: its process cannot be
            # looked up; alive while it refreshes its lease (a lock without one, from before
            # leases, holds until deleted).
            lease = _lease_of(holder)
            return lease is None or self._age() < lease
        try:
            raw_pid: Any = holder.get("pid")  # None or garbage: the except below
            pid = int(raw_pid)
        except (TypeError, ValueError):
            return False
        if not _pid_alive(pid):
            return False
        # The pid is in use, but by the job that wrote the lock only if it started then too
        # (a container restarted after a crash gives its new job the same low pid).
        start = holder.get("start")
        return start is None or _process_start(pid) in (None, start)

    def _mtime(self) -> float | None:
        try:
            return self.path.stat().st_mtime
        except OSError:
            return None

    def _age(self) -> float:
        """Seconds since `.lock` was written or refreshed, by the filesystem's clock where known."""
        mtime = self._mtime()
        if mtime is None:
            return LOCK_GRACE_S
        return (self._fs_now if self._fs_now is not None else time.time()) - mtime

    def _stale_hint(self, holder: dict, me: dict) -> str:
        """What the refusal adds for another host's lock: when it goes stale, or how to end it."""
        if not _elsewhere(holder, me):
            return ""
        lease = _lease_of(holder)
        if lease is None:
            return (f" (that job's lock has no lease, so it never goes stale from another host: delete "
                    f"{self.path} once you know no job runs)")
        return (f" (its lock was refreshed {max(0.0, self._age()):.0f} s ago; it is taken over once it goes "
                f"{lease:g} s without one)")

    def _refresh(self, key: tuple[Any, Any, Any, Any]) -> bool | None:
        """Touch `.lock` if it is still the holder `key`'s: True if touched, False if it is gone or
        another's, None if it cannot be read now (a network filesystem's hiccup: try again)."""
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except FileNotFoundError:
            return False
        except OSError:
            return None
        try:
            holder = self._read_holder(os.read(fd, 1 << 16))
            if holder is None or _holder_key(holder) != key:
                return False
            os.utime(fd)  # this inode only: a lock that replaced ours meanwhile is not touched
            return True
        except OSError:
            return None
        finally:
            os.close(fd)

    def _start_heartbeat(self, me: dict) -> None:
        """Refresh the lock file's time every tenth of the lease (at most every minute) while the
        lock is held and the file is still ours (a daemon thread: it dies with the process, and
        so does the lease). A read that fails is tried again at the next beat."""
        import threading

        stop = threading.Event()
        interval = min(60.0, float(me["lease"]) / 10)
        key = _holder_key(me)

        def beat() -> None:
            while not stop.wait(interval):
                if self._refresh(key) is False:
                    return  # taken over or removed: no longer ours to keep alive (`verify` says so)

        thread = threading.Thread(target=beat, name="fusionrec-lock-lease", daemon=True)
        thread.start()
        self._heartbeat = (thread, stop)

    def verify(self, path: Path | str | None = None) -> None:
        """Raise LockError if `.lock` is no longer this holder's (gone, or another job's), before
        `path` is written (or at a safe point, with no path): a job stopped past its lease may have
        lost the directory to a job on another host. A lock that cannot be read now is given the
        benefit of the doubt."""
        if self._me is None:
            return
        try:
            raw = self._read_existing()
        except OSError:
            return
        holder = self._read_holder(raw) if raw is not None else None
        if holder is not None and _holder_key(holder) == _holder_key(self._me):
            return
        if holder is None:
            whom = "its lock file was removed or replaced while it ran"
        else:
            whom = (f"pid {holder.get('pid')} on {holder.get('host')} took the lock over while it ran (this job's "
                    f"lock went unrefreshed for its lease of {self._me['lease']:g} s, as when a job is stopped or "
                    "suspended, or two jobs took a stale lock at once)")
        if path is None:
            if self._lost_said:
                return  # said once at a safe point: later ones may be about other work of this process
            self._lost_said = True
        where = f" before writing {path}" if path is not None else ""
        raise LockError(f"this job lost the lock on {self.art_dir}: {whom}; it stopped{where}. "
                        "Rerun once no other job uses it")

    def _read_existing(self) -> bytes | None:
        """`.lock`'s bytes; None where there is no lock file. Any other OSError is raised: an
        unreadable lock is not a missing one."""
        try:
            return self.path.read_bytes()
        except FileNotFoundError:
            return None

    def _read_raw(self) -> bytes | None:
        try:
            return self.path.read_bytes()
        except OSError:
            return None

    def _read_holder(self, raw: bytes | None = None) -> dict | None:
        raw = self._read_raw() if raw is None else raw
        try:
            holder = json.loads(raw) if raw is not None else None
        except ValueError:
            return None
        return holder if isinstance(holder, dict) and "pid" in holder else None

    def _remove_if_unchanged(self, stale: bytes | None, mtime: float | None) -> None:
        """Remove `.lock` if it still holds `stale`, unrefreshed since `mtime`. Two jobs that found
        the same stale lock take turns here (an flock on the directory), so the second sees the
        first one's new lock (or none yet) and leaves it: only one of them can then create
        `.lock`. A filesystem without flock on directories (NFS) gets no turns: there the check
        and the removal are as close together as they can be."""
        import fcntl

        fd = os.open(self.art_dir, os.O_RDONLY)
        try:
            with contextlib.suppress(OSError):  # EBADF, ENOLCK, EINVAL: no flock here
                fcntl.flock(fd, fcntl.LOCK_EX)
            if self._read_raw() == stale and self._mtime() == mtime:
                with contextlib.suppress(FileNotFoundError):
                    self.path.unlink()
        finally:
            os.close(fd)  # closing releases the flock

    def release(self) -> None:
        heartbeat, self._heartbeat = self._heartbeat, None
        if heartbeat is not None:
            heartbeat[1].set()
        with contextlib.suppress(ValueError):
            _HELD.remove(self)
        rw, self._rw = self._rw, None
        if rw is not None:
            os.close(rw)  # closing releases the flock
        holder = self._read_holder()
        # Ours only if pid, host and start time all match: since leases, a job on another host
        # (in a container, often with our pid) may have taken the lock over while we were stopped.
        me = self._me or {"pid": os.getpid(), "host": socket.gethostname(), "pidns": _pid_namespace(),
                          "start": _process_start(os.getpid())}
        if holder is not None and _holder_key(holder) == _holder_key(me):
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
        if heartbeat is not None:
            heartbeat[0].join(timeout=5)  # after the unlink: a second Ctrl-C here leaves no lock behind

    def __enter__(self) -> ArtifactLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


# --------------------------------------------------------------------------- readers and writers

LOCK_WAIT_ENV = "FUSIONREC_LOCK_WAIT"  # seconds a job waits for the other side (default 10)
LOCK_DIR_ENV = "FUSIONREC_LOCK_DIR"  # where the flock files live (default: <tmp>/fusionrec-locks)


def lock_file(art_dir: Path | str, kind: str) -> Path | None:
    """The flock file of one artifacts directory, outside it (ART holds artifacts only), named
    by the directory's device and inode: `rw` (shared by readers, exclusive by writers) or
    `manifest` (run record appends). None when ART does not exist yet."""
    import tempfile

    try:
        st = os.stat(art_dir)
    except OSError:
        return None
    folder = Path(os.environ.get(LOCK_DIR_ENV) or Path(tempfile.gettempdir()) / "fusionrec-locks")
    try:
        folder.mkdir(mode=0o1777, parents=True, exist_ok=True)
    except OSError:
        return None
    return folder / f"{st.st_dev}-{st.st_ino}.{kind}"


def hold_flock(path: Path | None, *, exclusive: bool, wait: float | None = None) -> int | None:
    """An open fd holding an flock on `path` (closing it releases the lock); None when the
    file cannot be opened or the filesystem has no flock. `wait`: seconds before BlockingIOError
    (None: wait as long as it takes)."""
    import fcntl

    if path is None:
        return None
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError:
        return None
    mode = fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH
    try:
        if wait is None:
            fcntl.flock(fd, mode)
            return fd
        deadline = time.monotonic() + wait
        while True:
            try:
                fcntl.flock(fd, mode | fcntl.LOCK_NB)
                return fd
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise
                time.sleep(0.05)
    except BlockingIOError:
        os.close(fd)
        raise
    except OSError:
        os.close(fd)
        return None


def _lock_wait() -> float:
    try:
        return max(0.0, float(os.environ.get(LOCK_WAIT_ENV, "10")))
    except ValueError:
        return 10.0


def _flock(art_dir: Path, *, exclusive: bool) -> int | None:
    """The readers/writers flock of `art_dir` (an open fd; closing it releases the lock),
    waiting up to FUSIONREC_LOCK_WAIT seconds. None where no lock file can be made. The
    kernel drops the lock of a killed job by itself."""
    try:
        return hold_flock(lock_file(art_dir, "rw"), exclusive=exclusive, wait=_lock_wait())
    except BlockingIOError:
        who = ("a command that reads them (recommend, score or evaluate)" if exclusive
               else "a job that writes them (run, embed, index or train)")
        raise LockError(f"{art_dir} is in use by {who}; wait for it to finish or use another --out") from None


class ReadLock:
    """A shared lock on an artifacts directory: any number of readers, no writer meanwhile."""

    def __init__(self, art_dir: Path | str) -> None:
        self.art_dir = Path(art_dir)
        self._fd: int | None = None

    def __enter__(self) -> ReadLock:
        if self.art_dir.is_dir():
            self._fd = _flock(self.art_dir, exclusive=False)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def clean_stale_exports(directory: Path, name: str, older_than_s: float = 600.0) -> int:
    """Remove the torn temporaries `.tmp-*-<name>` a killed export left in `directory`
    (older than `older_than_s`, so a concurrent writer's file is left alone); returns how many."""
    removed = 0
    if not Path(directory).is_dir():
        return 0
    now = time.time()
    for tmp in Path(directory).glob(f"{TMP_PREFIX}*-{name}"):
        try:
            if tmp.is_file() and now - tmp.stat().st_mtime > older_than_s:
                tmp.unlink()
                removed += 1
        except OSError:
            continue
    if removed:
        log.warning("removed %d torn temporary files a killed export left in %s", removed, directory)
    return removed


def check_out_folder(out_dir: Path | str) -> None:
    """Refuse an --out that is a file or sits under one: no folder can be made there (exit 2:
    `split`, `doctor`, and every stage that writes ART, before it takes the lock)."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f"--out {out_dir} is a file, not a folder")
    blocking = next((p for p in out_dir.resolve().parents if p.exists() and not p.is_dir()), None)
    if blocking is not None:
        raise ConfigError(f"--out {out_dir} cannot be created: {blocking} is a file")


def check_separate_dirs(data_dir: Path | str, art_dir: Path | str) -> None:
    """Refuse an artifacts directory that is, contains or sits inside the data directory (a
    job would overwrite the user's input, or read its own output as input)."""
    data, art = Path(data_dir).resolve(), Path(art_dir).resolve()
    if data == art:
        raise ConfigError(f"--out {art_dir} is the data directory: the job would overwrite its own input; "
                          "use another --out")
    if art.is_relative_to(data):
        raise ConfigError(f"--out {art_dir} is inside the data directory {data_dir}: the job would write into "
                          "its own input; use an --out outside it")
    if data.is_relative_to(art):
        raise ConfigError(f"--data {data_dir} is inside the artifacts directory {art_dir}: the job would "
                          "replace its own input; keep data and artifacts apart")


def read_artifact(path: Path | str, reader: Any, rerun: str = "fusionrec run") -> Any:
    """`reader(path)`, with any failure to load (missing, truncated, garbage, a library's own
    exception) turned into one FusionrecError (exit 1) naming the file and what to rerun."""
    path = Path(path)
    try:
        return reader(path)
    except FusionrecError:
        raise
    except MemoryError:
        raise
    except Exception as exc:  # noqa: BLE001 - any loader error is a damaged artifact to the user
        first = first_line(exc, 200)
        what = "is missing" if isinstance(exc, FileNotFoundError) else f"cannot be loaded ({first})"
        raise FusionrecError(f"artifact {path} {what}; rerun `{rerun}` to rebuild it") from exc
