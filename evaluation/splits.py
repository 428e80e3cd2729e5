"""The train/test splits, kept importable here: they live in `fusionrec.pipeline.splits`,
which the retriever's weight search and the candidate sources use as well (one temporal split
for training and evaluation alike)."""

from fusionrec.pipeline.splits import (
    global_temporal_split,
    leave_last_out,
    per_user_temporal_split,
    stable_hash,
    time_order,
)

__all__ = ["global_temporal_split", "leave_last_out", "per_user_temporal_split", "stable_hash", "time_order"]
