"""The Ray engine of the embedding job (`engine = "ray"`): reading and encoding on Ray, and
the actor pool of batch scoring.

Reading: the items and users tables are read, validated, cleaned, text-hashed and written as
plan parts in Ray tasks, one per batch of `embed.batch_rows` rows, at most `ray.num_actors`
at once (`ordered_tasks`, `pipeline.embedding.job.plan_partition`); the driver takes their
results in input order, checks the ids are unique and hashes media files. Encoding: the rows
that need it go to a pool of Ray actors. The driver still reuses known vectors and writes the
shards and the final tables (pipeline.embed), so both engines write the same tables. The
todo table (the rows to encode, Parquet) is read in
blocks, each put in Ray's object store as it is read (the driver holds one block), and run
as a Ray Dataset through `map_batches` on an actor pool; each actor builds its own encoder
once (from the config, or a copy of an encoder given in-process), decodes media itself and
returns, per row, a vector or the same error text the local engine records. Results stream back to the driver
in shards of `shard_rows` rows (`embed.shard_size`, or for 0 the device's size), so a killed job
still resumes from its shards.
Batch scoring (`ranker.serving.ray_scoring`, `pipeline.batch.nightly`) runs on a plain
actor pool, `ordered_actor_calls`.

On a cluster every node must see the data directory and the artifacts directory at the same
paths (media paths are sent as absolute paths; the reading tasks write the plan parts under
the artifacts) and have the same model packages (the actor checks the model id).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import re
import socket
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from fusionrec.pipeline.config import Config, EmbedConfig, RayConfig
from fusionrec.pipeline.embedding.encoding import (
    EncodedShard,
    ModalityEncoder,
    TodoRows,
    build_encoders,
    prepare_one,
    shard_rows,
)
from fusionrec.pipeline.errors import FusionrecError, first_line

log = logging.getLogger("fusionrec.ray")

# Ray's own defaults that do not suit a batch job: usage reporting, a dashboard, worker logs
# copied into our output. Set before ray.init; an explicit environment value wins.
_RAY_ENV = {"RAY_DISABLE_USAGE_STATS": "1", "RAY_USAGE_STATS_ENABLED": "0"}


def import_ray() -> Any:
    """`ray` (with Ray Data), or a FusionrecError saying how to install the optional extra."""
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError:
        raise FusionrecError("engine 'ray' needs Ray: pip install 'fusionrec[ray]' (ray[data])") from None
    return ray


def quiet_ray_data_console() -> None:
    """Ray Data prints each dataset's plan and timing (INFO) and a progress-bar notice on stderr,
    through its own handler, whatever the root logger says. Its console follows fusionrec's
    verbosity instead: INFO only with -v, otherwise errors only. Its log file in the Ray session
    directory keeps everything."""
    level = logging.INFO if logging.getLogger().getEffectiveLevel() <= logging.INFO else logging.ERROR
    for handler in logging.getLogger("ray.data").handlers:
        # Ray's own console handler only: a host's handlers on that logger (a test runner's) are theirs.
        if isinstance(handler, logging.StreamHandler) and type(handler).__module__.startswith("ray."):
            handler.setLevel(level)


class _DefaultTokenAuthNote(logging.Filter):
    """Ray 2.5x+ turns token authentication on for a local runtime it starts and says so with a
    WARNING in its own format on every run: the default at work, not a problem to act on. That one
    line goes to fusionrec's log at debug; Ray's warning that authentication is *disabled* (a
    cluster open to its network) still reaches the console."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.getMessage().startswith("Token authentication is enabled for this Ray cluster"):
            log.debug("ray: %s", record.getMessage())
            return False
        return True


_RAY_AUTH_LOGGER = "ray._private.authentication.authentication_token_setup"


def quiet_ray_auth_note() -> None:
    """Install `_DefaultTokenAuthNote` on Ray's authentication logger (once per process)."""
    logger = logging.getLogger(_RAY_AUTH_LOGGER)
    if not any(isinstance(f, _DefaultTokenAuthNote) for f in logger.filters):
        logger.addFilter(_DefaultTokenAuthNote())


# A head that is up accepts a TCP connection at once; this bounds only a host that drops the
# packets (a firewall), where the connect would otherwise wait for the kernel's own timeout.
PROBE_TIMEOUT_S = 5.0


def head_address(address: str) -> tuple[str, int] | None:
    """(host, port) of a `ray.address` that names the cluster's head directly (host:port, its GCS),
    else None: "", "auto", "local" and ray://... are Ray's to resolve (ray:// goes through the
    Ray client, which gives up by itself)."""
    address = address.strip()
    if not address or address in ("auto", "local") or "://" in address:
        return None
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit():
        return None  # not host:port: ray.init says what is wrong with it
    return host.strip("[]"), int(port)  # [::1]:6379 is IPv6's host:port


def probe_address(address: str, timeout: float = PROBE_TIMEOUT_S) -> None:
    """Raise ConnectionError at once when nothing accepts a connection at a host:port
    `ray.address`: ray.init retries joining it for over a minute (82 s with Ray 2.60: 20 tries
    at the GCS, each waiting out its own timeout), and the job looks hung."""
    target = head_address(address)
    if target is None:
        return
    host, port = target
    try:
        with socket.create_connection((host, port), timeout=timeout):
            pass
    except ConnectionRefusedError:
        raise ConnectionError(f"nothing listens at {host}:{port} (connection refused)") from None
    except TimeoutError:
        raise ConnectionError(f"no answer from {host}:{port} within {timeout:g} s") from None
    except socket.gaierror as exc:
        raise ConnectionError(f"cannot resolve the host {host!r} ({exc.strerror or exc})") from None
    except OSError as exc:
        raise ConnectionError(f"cannot connect to {host}:{port} ({exc.strerror or exc})") from None


@contextlib.contextmanager
def ray_runtime(cfg: RayConfig) -> Iterator[Any]:
    """Join the running Ray runtime, else start one (`ray.address`: "" local, "auto", ray://...).

    A runtime started here is shut down on exit; one that was already running is left alone.
    """
    ray = import_ray()
    started = False
    if not ray.is_initialized():
        for key, value in _RAY_ENV.items():
            os.environ.setdefault(key, value)
        # ray.init reads RAY_ADDRESS where ray.address is "" or "auto": that address is probed too.
        from_env = os.environ.get("RAY_ADDRESS", "").strip() if cfg.address in ("", "auto") else ""
        quiet_ray_auth_note()
        try:
            probe_address(from_env or cfg.address)
            ray.init(address=cfg.address or None, include_dashboard=False, log_to_driver=False,
                     ignore_reinit_error=True, logging_level=logging.WARNING)
        except Exception as exc:  # noqa: BLE001 - Ray's own ConnectionError, ValueError, ...: one clear line
            if from_env:
                where = f"join the Ray cluster at RAY_ADDRESS = {from_env!r} (the environment; ray.address = {cfg.address!r})"
            elif cfg.address:
                where = f"join the Ray cluster at ray.address = {cfg.address!r}"
            else:
                where = "start a local Ray runtime (ray.address = \"\")"
            raise FusionrecError(f"engine 'ray': cannot {where}: {type(exc).__name__}: {first_line(exc)}; check "
                                 "ray.address (\"\" starts a local runtime, \"auto\" joins a running one)"
                                 + (" and RAY_ADDRESS" if from_env else "") + ", or run with --engine local") from exc
        started = True
    quiet_ray_data_console()
    try:
        yield ray
    finally:
        if started:
            ray.shutdown()


@contextlib.contextmanager
def data_context(**options: Any) -> Iterator[Any]:
    """Ray Data's DataContext with `execution_options` set for one job, restored after it."""
    import ray.data

    ctx = ray.data.DataContext.get_current()
    saved = {k: getattr(ctx.execution_options, k) for k in options}
    bars = ctx.enable_progress_bars
    ctx.enable_progress_bars = False  # the job draws its own progress
    for k, v in options.items():
        setattr(ctx.execution_options, k, v)
    try:
        yield ctx
    finally:
        for k, v in saved.items():
            setattr(ctx.execution_options, k, v)
        ctx.enable_progress_bars = bars


def root_cause(exc: BaseException) -> str:
    """The user-code error inside Ray's wrappers, as one line.

    Ray Data re-raises an actor's error as RayTaskError(UserCodeException) whose only trace
    of the original exception is the remote traceback text: take its first `Type: message`
    line that is not one of Ray's own wrappers (the error raised first).
    """
    text = str(exc).strip()
    for line in text.splitlines():
        m = _ERROR_LINE.match(line.strip())
        if m and m.group(1).rsplit(".", 1)[-1] not in _RAY_WRAPPERS:
            return line.strip()
    return f"{type(exc).__name__}: {text.splitlines()[-1] if text else ''}"


_ERROR_LINE = re.compile(r"^([A-Za-z_][\w.]*(?:Error|Exception)): (.+)$")
_RAY_WRAPPERS = {"UserCodeException", "RayTaskError", "RayActorError", "RaySystemError"}


# `fn(*call)` for each call, results in the order of the calls (RayEncodeRows.ordered).
RunOrdered = Callable[[Callable[..., Any], Iterable[tuple], str], Iterator[Any]]


def results_in_order(ray: Any, submit: Callable[[int, Any], Any], inputs: Iterable[Any], window: int,
                     what: str) -> Iterator[Any]:
    """`ray.get(submit(i, x))` for each input x (the i-th), at most `window` submitted and not
    yet taken, the results yielded in input order (the driver holds at most `window`).

    The next input is submitted before a result is yielded, so the workers compute while the
    driver uses it. An error while producing an input (a CSV the parser refuses) is raised
    after the results of the inputs before it, as a sequential loop would; a task's own error
    becomes a FusionrecError naming `what` and its cause.
    """
    numbered = enumerate(inputs)
    pending: deque[Any] = deque()
    failure: BaseException | None = None

    def submit_next() -> None:
        nonlocal failure
        if failure is not None:
            return
        try:
            i, x = next(numbered)
        except StopIteration:
            return
        except Exception as exc:  # noqa: BLE001 - raised once the earlier results are out
            failure = exc
            return
        pending.append(submit(i, x))

    try:
        for _ in range(max(1, window)):
            submit_next()
        while pending:
            try:
                result = ray.get(pending.popleft())
            except Exception as exc:  # noqa: BLE001 - Ray wraps the task's error; report its cause
                raise FusionrecError(f"Ray {what} failed: {root_cause(exc)}") from exc
            submit_next()
            yield result
        if failure is not None:
            raise failure
    finally:
        for ref in pending:  # stopped early (a bad row, an error while writing): drop the rest
            with contextlib.suppress(Exception):  # a running actor task cannot be: its actor is killed
                ray.cancel(ref)


def ordered_tasks(ray: Any, fn: Callable[..., Any], calls: Iterable[tuple], workers: int,
                  what: str) -> Iterator[Any]:
    """`fn(*call)` for each call as a Ray task of one CPU, at most `workers` running, the
    results yielded in the order of `calls` (`results_in_order`)."""
    remote = ray.remote(num_cpus=1)(fn)
    yield from results_in_order(ray, lambda _, call: remote.remote(*call), calls, workers, what)


# What a process of one CPU sets so that every library runs one thread (pipeline.threads.cores reads it too).
ONE_THREAD_ENV = {"OMP_NUM_THREADS": "1", "POLARS_MAX_THREADS": "1", "OPENBLAS_NUM_THREADS": "1",
                  "MKL_NUM_THREADS": "1", "RAYON_NUM_THREADS": "1"}


def actor_slots(ray: Any, actors: int, what: str) -> int:
    """How many one-CPU actors to start: `actors`, at most the Ray cluster's CPUs.

    Input i waits on actor i % n, so an actor that never gets a CPU (ray.num_actors past the
    cluster's CPUs) would hold the whole job forever; the pool is cut to the CPUs, with a warning."""
    wanted = max(1, actors)
    try:
        cpus = int(ray.cluster_resources().get("CPU", 0))
    except Exception:  # noqa: BLE001 - no resource view (a client): ask for what was asked
        return wanted
    if 0 < cpus < wanted:
        log.warning("ray.num_actors = %d but the Ray cluster has %d CPU(s): %s runs on %d actors of one CPU each",
                    actors, cpus, what, cpus)
        return cpus
    return wanted


def ordered_actor_calls(ray: Any, actor_cls: type, kwargs: dict[str, Any], inputs: Iterable[Any], actors: int,
                        what: str, *, queued: int = 2) -> Iterator[Any]:
    """`actor.run(x)` for each input x on a pool of `actors` Ray actors (one CPU each, each
    built once with `kwargs`), the results yielded in input order (`results_in_order`).

    Input i goes to actor i % actors, with at most `queued` inputs waiting at each, so an
    actor has its next input as soon as it finishes one and the driver holds at most
    actors x queued results. A plain pool rather than Ray Data's executor: the pool is
    ready as soon as its actors are (Ray Data's executor took 15 to 20 s to start on 2
    cores), and the driver only waits in `ray.get`, leaving the cores to the actors. An
    actor's error (its constructor's too) becomes a FusionrecError naming `what` and its
    cause; the actors are stopped on the way out.
    """
    # One CPU each, so one thread each in every library: without this each actor's polars,
    # OpenMP (FAISS, LightGBM) and thread pools take every core, and two actors on two cores
    # ran slower than one.
    remote_cls = ray.remote(num_cpus=1, runtime_env={"env_vars": ONE_THREAD_ENV})(actor_cls)
    pool = [remote_cls.remote(**kwargs) for _ in range(actor_slots(ray, actors, what))]
    try:
        yield from results_in_order(ray, lambda i, x: pool[i % len(pool)].run.remote(x), inputs,
                                    len(pool) * max(1, queued), what)
    finally:
        for actor in pool:  # also drops what was still queued (stopped early, or an error)
            ray.kill(actor)


def block_rows(n: int, batch_size: int, actors: int) -> int:
    """Rows per input block: small catalogs get one block per batch (every actor gets work),
    large ones about 4 blocks per actor but no more than 16 batches each."""
    return batch_size * max(1, min(16, math.ceil(n / (batch_size * actors * 4))))


class EncodeActor:
    """One Ray actor: builds one encoder, then decodes and encodes batches of rows.

    `source` is either (EmbedConfig, modality), built with `build_encoders` inside the actor,
    or a ModalityEncoder shipped by pickle (encoders given to run_embed in-process).
    """

    def __init__(self, source: tuple[EmbedConfig, str] | ModalityEncoder, model_id: str, dim: int,
                 decode_workers: int = 2) -> None:
        if isinstance(source, ModalityEncoder):
            self.enc = source
        else:
            cfg, modality = source
            self.enc = build_encoders(cfg, {modality})[modality]
        if self.enc.model_id != model_id or self.enc.dim != dim:
            # The driver hashed rows under its model id: a node with other weights must not write them.
            raise FusionrecError(f"encoder on this Ray node is {self.enc.model_id} (dim {self.enc.dim}), "
                                 f"the driver's is {model_id} (dim {dim}): install the same model packages")
        self.decode_workers = decode_workers

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        enc = self.enc
        contents = [str(c) for c in batch["input"]]
        n = len(contents)
        errors = [""] * n
        if enc.prepare is None:
            ok, inputs = list(range(n)), contents
        else:
            ok, inputs = [], []
            for j, (x, err) in enumerate(self._decoded(contents)):
                if err is None:
                    ok.append(j)
                    inputs.append(x)
                else:
                    errors[j] = err
        out = np.zeros((n, enc.dim), dtype=np.float32)
        if ok:
            matrix = np.asarray(enc.encode(inputs), dtype=np.float32)
            if matrix.shape != (len(ok), enc.dim):
                raise FusionrecError(f"encoder returned shape {matrix.shape}, expected ({len(ok)}, {enc.dim})")
            out[ok] = matrix
        return {"row": np.asarray(batch["row"], dtype=np.int64), "id": batch["id"],
                "content_hash": batch["content_hash"], "vector": out, "error": np.asarray(errors, dtype=object)}

    def _decoded(self, paths: list[str]) -> Iterator[tuple[Any, str | None]]:
        """Decode in threads, in input order, with the local engine's error texts."""
        if self.decode_workers <= 1:
            yield from (prepare_one(self.enc, Path(p)) for p in paths)
            return
        import concurrent.futures as futures

        with futures.ThreadPoolExecutor(max_workers=self.decode_workers) as pool:
            yield from pool.map(lambda p: prepare_one(self.enc, Path(p)), paths)


class RayEncodeRows:
    """The `encode_rows` of pipeline.embed.embed_modality, run on a Ray actor pool.

    Ray starts (or is joined) at the first modality with rows to encode, so a rerun that
    reuses every vector never pays for it; `close` shuts down a runtime started here.
    """

    def __init__(self, config: Config, *, ship_encoders: bool = False) -> None:
        self.config, self.ship_encoders = config, ship_encoders
        self._runtime = contextlib.ExitStack()
        self._started = False

    def close(self) -> None:
        self._runtime.close()

    def _start(self) -> None:
        if not self._started:
            self._runtime.enter_context(ray_runtime(self.config.ray))
            self._started = True

    def ordered(self, fn: Callable[..., Any], calls: Iterable[tuple], what: str) -> Iterator[Any]:
        """`ordered_tasks` on this job's runtime, `ray.num_actors` tasks at once (a RunOrdered)."""
        self._start()
        yield from ordered_tasks(import_ray(), fn, calls, self.config.ray.num_actors, what)

    def __call__(self, todo: TodoRows, enc: ModalityEncoder, cfg: EmbedConfig) -> Iterator[EncodedShard]:
        if not todo.rows:
            return
        self._start()
        import pyarrow.parquet as pq
        import ray.data

        rc = self.config.ray
        media = enc.prepare is not None
        actors = max(1, min(rc.num_actors, math.ceil(todo.rows / rc.batch_size)))
        source = enc if self.ship_encoders else (cfg, todo.modality)
        log.info("%s %s: %d rows on %d Ray actors", todo.kind, todo.modality, todo.rows, actors)
        blocks = [ray.put(pa.Table.from_batches([b]))
                  for b in pq.ParquetFile(todo.path).iter_batches(
                      batch_size=block_rows(todo.rows, rc.batch_size, actors))]
        # A Dataset copies the DataContext when it is created: set the options first.
        with data_context(preserve_order=False):
            # ray's annotations: ray.put returns includes.object_ref.ObjectRef, from_arrow_refs wants types.ObjectRef
            ds = ray.data.from_arrow_refs(blocks).map_batches(  # type: ignore[arg-type]
                EncodeActor, fn_constructor_kwargs={"source": source, "model_id": enc.model_id, "dim": enc.dim,
                                                    "decode_workers": cfg.decode_workers if media else 1},
                batch_size=rc.batch_size, batch_format="numpy", zero_copy_batch=True,
                compute=ray.data.ActorPoolStrategy(size=actors), num_cpus=1,
                num_gpus=rc.num_gpus_per_actor or None)
            try:
                # The actors' device: as configured, or a GPU where each actor is given one.
                actors_device = cfg.device if cfg.device != "auto" else "cuda" if rc.num_gpus_per_actor else "cpu"
                shard = shard_rows(cfg, actors_device, media=media)
                for out in ds.iter_batches(batch_size=shard, batch_format="numpy"):
                    yield self._shard(out, enc.dim)
            except FusionrecError:
                raise
            except Exception as exc:  # noqa: BLE001 - Ray wraps the actor's error; report its cause
                raise FusionrecError(f"Ray encoding of {todo.kind} {todo.modality} failed: {root_cause(exc)}") from exc

    @staticmethod
    def _shard(out: dict[str, np.ndarray], dim: int) -> EncodedShard:
        rows = out["row"].astype(np.int64)
        err = np.asarray([str(e) if e is not None else "" for e in out["error"]], dtype=object)
        good = err == ""
        matrix = np.asarray(out["vector"], dtype=np.float32).reshape(len(rows), dim)[good]
        errors = {int(r): str(e) for r, e in zip(rows[~good], err[~good])}
        return EncodedShard(rows[good], [str(v) for v in out["id"][good]],
                            [str(v) for v in out["content_hash"][good]], matrix, errors, len(rows))


@contextlib.contextmanager
def ray_encode_rows(config: Config, data_dir: Path, *, ship_encoders: bool = False) -> Iterator[RayEncodeRows]:
    """The Ray engine for one embedding job (pipeline.embed's engine dispatch).

    Media paths reach the actors resolved by the driver, so `data_dir` is not needed here.
    """
    import_ray()
    engine = RayEncodeRows(config, ship_encoders=ship_encoders)
    try:
        yield engine
    finally:
        engine.close()
