"""Batch scoring on Ray: top-k for every user, users split into batches over an actor pool.

Each actor loads the artifacts once (`Recommender`: index, ranker, snapshot) and runs the
same path as `Recommender.recommend` on its batches of users, so the result equals the
local engine's. Users go out sorted by id and come back in order, so the output (like
`recommend`'s) is sorted by user_id, then rank, and can stream to a Parquet file without
being held in the driver. The FAISS index is memory-mapped (`ART/index/index.faiss`): the
actors of one node share one copy of it in the page cache. Every actor holds its own copy
of the rest of the fitted model: size the actors by the interaction snapshot and the
item and user vectors of `ART/index`.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import cast

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from fusionrec.pipeline.config import RayConfig
from fusionrec.pipeline.embedding.ray_engine import import_ray, ordered_actor_calls, ray_runtime
from fusionrec.pipeline.errors import FusionrecError
from fusionrec.pipeline.io.storage import atomic_path
from fusionrec.pipeline.retrieval.candidates import served_user_ids
from fusionrec.ranker.serving.export import TOPK_SCHEMA
from fusionrec.ranker.serving.privacy import pseudonymise
from fusionrec.ranker.serving.recommender import Recommender


def known_users(art_dir: Path | str) -> list[str]:
    """The users `Recommender.recommend(None)` serves, sorted, read without loading the model: as
    `CandidateModel.fit`, the users of the snapshot's log and users table and of the index (a
    user with neither history nor content is served the popular items, on Ray too)."""
    art_dir = Path(art_dir)
    path = art_dir / "index" / "users.parquet"
    if not path.is_file():
        raise FusionrecError(f"{art_dir} has no index: run `fusionrec index` (or `fusionrec run`) first")
    tables = (path, art_dir / "data" / "interactions.parquet", art_dir / "data" / "users.parquet")
    return served_user_ids(*(pl.read_parquet(t, columns=["user_id"])["user_id"] for t in tables
                             if t.is_file())).tolist()


def score_users(rec: Recommender, users: list[str], k: int, *, exclude_seen: bool = True, explain: bool = False,
                use_ranker: bool = True, fallback: bool = True) -> pl.DataFrame:
    """`rec.recommend(users, k)` for one batch.

    fallback=True: as `recommend(user_ids)`, users the artifacts do not know get the
    popularity sources' list. fallback=False: as `recommend(None)` restricted to these
    users, which serves only the users the artifacts know.
    """
    ranked = rec.recommend(users, k, exclude_seen=exclude_seen, explain=explain, use_ranker=use_ranker)
    if fallback:
        return ranked
    return ranked.filter(pl.col("user_id").is_in(rec.known_users_))


class ScoreActor:
    """One Ray actor: the artifacts loaded once, then `score_users` on batches of user ids."""

    def __init__(self, art_dir: str, k: int, exclude_seen: bool, explain: bool, use_ranker: bool,
                 fallback: bool) -> None:
        # The index memory-mapped: the actors on a node share one copy of it in the page cache.
        self.rec = Recommender(art_dir, use_ranker=use_ranker, mmap_index=True)
        self.options = {"exclude_seen": exclude_seen, "explain": explain, "use_ranker": use_ranker,
                        "fallback": fallback}
        self.k = k

    def run(self, users: list[str]) -> pa.Table:
        return score_users(self.rec, users, self.k, **self.options).to_arrow()


def iter_recommendations(art_dir: Path | str, k: int = 10, ray_config: RayConfig | None = None, *,
                         user_ids: list[str] | None = None, exclude_seen: bool = True, explain: bool = False,
                         use_ranker: bool = True) -> Iterator[pl.DataFrame]:
    """Top-k frames, one per batch of `ray.scoring_batch_users` users, in user_id order.

    user_ids=None: every user the index knows, as `Recommender.recommend(None, k)`; a list:
    as `Recommender.recommend(user_ids, k)` (unknown users get the popular items).
    """
    rc = ray_config or RayConfig()
    import_ray()
    art_dir = Path(art_dir).resolve()
    users = known_users(art_dir) if user_ids is None else sorted(set(map(str, user_ids)))
    if not users:
        return
    if k < 1:
        raise FusionrecError(f"k must be at least 1, not {k}")
    per = max(1, rc.scoring_batch_users)
    batches = [users[s:s + per] for s in range(0, len(users), per)]
    kwargs = {"art_dir": str(art_dir), "k": k, "exclude_seen": exclude_seen, "explain": explain,
              "use_ranker": use_ranker, "fallback": user_ids is not None}
    with ray_runtime(rc) as ray:
        for out in ordered_actor_calls(ray, ScoreActor, kwargs, batches, min(rc.num_actors, len(batches)),
                                       "batch scoring"):
            if out.num_rows:
                yield cast(pl.DataFrame, pl.from_arrow(out))


def recommend_all(art_dir: Path | str, k: int = 10, ray_config: RayConfig | None = None, *,
                  user_ids: list[str] | None = None, exclude_seen: bool = True, explain: bool = False,
                  use_ranker: bool = True) -> pl.DataFrame:
    """`Recommender(art_dir).recommend(user_ids, k)` computed on Ray, as one frame."""
    frames = list(iter_recommendations(art_dir, k, ray_config, user_ids=user_ids, exclude_seen=exclude_seen,
                                       explain=explain, use_ranker=use_ranker))
    if not frames:  # nobody to score
        return pl.DataFrame(schema=TOPK_SCHEMA)
    return pl.concat(frames)  # already in user_id, rank order: the batches come back in order


def write_all(art_dir: Path | str, path: Path | str, k: int = 10, ray_config: RayConfig | None = None, *,
              key: bytes | None = None, exclude_seen: bool = True, use_ranker: bool = True) -> dict[str, int]:
    """Stream every user's top-k to one Parquet file (atomic), never holding all of it.

    key: pseudonymise user ids with this export key (ranker.privacy), as exports do.
    Returns {"rows", "users"}.
    """
    path = Path(path)
    if path.suffix.lower() != ".parquet":
        raise FusionrecError(f"streamed exports are Parquet: {path} does not end in .parquet")
    rows = users = 0
    writer: pq.ParquetWriter | None = None
    with atomic_path(path) as tmp:
        try:
            for frame in iter_recommendations(art_dir, k, ray_config, exclude_seen=exclude_seen,
                                              use_ranker=use_ranker):
                users += frame["user_id"].n_unique()
                rows += frame.height
                if key is not None:
                    frame = pseudonymise(frame, key)
                table = frame.to_arrow()
                if writer is None:
                    writer = pq.ParquetWriter(tmp, table.schema, compression="zstd")
                writer.write_table(table.cast(writer.schema))
        finally:
            if writer is not None:
                writer.close()
        if writer is None:  # no user at all: an empty file with the export's columns
            pq.write_table(pl.DataFrame(schema=TOPK_SCHEMA).to_arrow(), tmp)
    return {"rows": rows, "users": users}
