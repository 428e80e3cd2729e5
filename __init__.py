"""fusionrec: an offline two-stage multimodal recommender.

Stage 1 (`fusionrec.pipeline`) embeds each modality with frozen encoders, fuses the
modalities and retrieves candidates with FAISS; stage 2 (`fusionrec.ranker`) reorders them
with LightGBM; `fusionrec.evaluation` measures the lists; `fusionrec.jobs` runs the stages.

The public API is what `__all__` names::

    import fusionrec
    cfg = fusionrec.load_config(None, ["export.k=20"])
    fusionrec.run_nightly("data/", "artifacts/", cfg)
    recs = fusionrec.Recommender("artifacts/").recommend(["u1"], k=10)
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

from fusionrec.jobs import run_embed, run_index, run_nightly, run_recommend, run_train, sample_data_dir
from fusionrec.pipeline.config import Config, load_config
from fusionrec.pipeline.errors import ConfigError, FusionrecError, InputError
from fusionrec.pipeline.retrieval.retriever import Retriever
from fusionrec.ranker.model import Ranker
from fusionrec.ranker.serving.recommender import Recommender

try:
    __version__ = version("fusionrec")
except PackageNotFoundError:  # pragma: no cover - running from a bare checkout
    __version__ = "0+unknown"

__all__ = [
    "Config",
    "ConfigError",
    "FusionrecError",
    "InputError",
    "Ranker",
    "Recommender",
    "Retriever",
    "load_config",
    "run_embed",
    "run_index",
    "run_nightly",
    "run_recommend",
    "run_train",
    "sample_data_dir",
]
