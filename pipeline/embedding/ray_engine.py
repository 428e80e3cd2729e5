"""The Ray engine of the embedding job (`engine = "ray"`): encoding on a pool of Ray actors.

Only the encoding of rows that need it moves: the driver still reads the inputs (streamed),
hashes them, reuses known vectors, writes shards and the final tables (pipeline.embed), so
both engines write the same tables. The todo table (the rows to encode, Parquet) is read in
blocks, each put in Ray's object store as it is read (the driver holds one block), and run
as a Ray Dataset through `map_batches` on an actor pool; each actor builds its own encoder
once (from the config, or a copy of an encoder given in-process), decodes media itself and
returns, per row, a vector or the same error text the local engine records. Results stream back to the driver
in shards of `embed.shard_size` rows, so a killed job still resumes from its shards.

On a cluster every node must see the data directory at the same path (media paths are
sent as absolute paths) and have the same model packages (the actor checks the model id).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from fusionrec.pipeline.config import Config, EmbedConfig, RayConfig
from fusionrec.pipeline.embedding.encoding import EncodedShard, ModalityEncoder, TodoRows, build_encoders, prepare_one
from fusionrec.pipeline.errors import FusionrecError

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
        ray.init(address=cfg.address or None, include_dashboard=False, log_to_driver=False,
                 ignore_reinit_error=True, logging_level=logging.WARNING)
        started = True
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

    def __call__(self, todo: TodoRows, enc: ModalityEncoder, cfg: EmbedConfig) -> Iterator[EncodedShard]:
        if not todo.rows:
            return
        if not self._started:
            self._runtime.enter_context(ray_runtime(self.config.ray))
            self._started = True
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
                for out in ds.iter_batches(batch_size=cfg.shard_size, batch_format="numpy"):
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
