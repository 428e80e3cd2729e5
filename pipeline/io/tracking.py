"""Optional MLflow tracking of the nightly job (`[tracking] mlflow_uri`).

When `tracking.mlflow_uri` is set, `fusionrec run` logs one MLflow run: the config as
params (dotted keys), the stage timings, counts and validation figures as metrics, and the
small artifacts (manifest, retriever and ranker descriptions, the ranker model) as files.
The manifest is written either way. MLflow is optional (`pip install mlflow-skinny`): a
set URI without it is a config error before any stage runs; a tracking server that fails
at the end is a warning, never a failed night.
"""

from __future__ import annotations

import importlib.util
import logging
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fusionrec.pipeline.config import Config
from fusionrec.pipeline.errors import ConfigError, first_line

__all__ = ["ARTIFACTS", "check_tracking", "flat_params", "log_nightly", "numeric_metrics"]

log = logging.getLogger("fusionrec.tracking")
ARTIFACTS = ("manifest.json", "index/retriever.json", "ranker/features.json", "ranker/model.txt")
_MAX_PARAM = 500  # MLflow's param value limit is larger on new servers, 500 on old ones


def check_tracking(config: Config) -> bool:
    """True when tracking is on; ConfigError (exit 2) when it is set but MLflow is not installed."""
    if not config.tracking.mlflow_uri:
        return False
    if importlib.util.find_spec("mlflow") is None:
        raise ConfigError("config key 'tracking.mlflow_uri' is set but MLflow is not installed: "
                          "pip install mlflow-skinny (or leave tracking.mlflow_uri empty)")
    return True


def flat_params(values: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested config -> {"ranker.learning_rate": "0.05", ...} (tables of numbers stay one value)."""
    out: dict[str, str] = {}
    for key, value in values.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, Mapping) and value and any(isinstance(v, Mapping) for v in value.values()):
            out.update(flat_params(value, dotted + "."))
        elif isinstance(value, Mapping) and value and not all(isinstance(v, (int, float)) for v in value.values()):
            out.update(flat_params(value, dotted + "."))
        else:
            out[dotted] = str(value)[:_MAX_PARAM]
    return out


def numeric_metrics(values: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    """Every finite number in a nested summary, under a dotted, MLflow-safe name."""
    out: dict[str, float] = {}
    for key, value in values.items():
        name = f"{prefix}{key}".replace("@", "_at_").replace(" ", "_")
        if isinstance(value, Mapping):
            out.update(numeric_metrics(value, name + "."))
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(float(value)):
            out[name] = float(value)
    return out


def log_nightly(config: Config, art_dir: Path, data_dir: Path | None, metrics: Mapping[str, Any],
                run_name: str = "fusionrec run") -> str | None:
    """Log one nightly run to MLflow; returns the MLflow run id (None when tracking is off or failed)."""
    if not check_tracking(config):
        return None
    uri = config.tracking.mlflow_uri
    if uri.startswith("file:") or "://" not in uri:
        # MLflow 3 keeps the file store behind this switch; a local folder is the documented test store.
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    try:
        import mlflow

        mlflow.set_tracking_uri(uri)
        mlflow.set_experiment(config.tracking.experiment)
        with mlflow.start_run(run_name=run_name) as run:
            mlflow.log_params(flat_params(config.to_dict()))
            mlflow.set_tags({"data_dir": str(data_dir or ""), "art_dir": str(art_dir)})
            mlflow.log_metrics(numeric_metrics(metrics))
            for rel in ARTIFACTS:
                path = Path(art_dir) / rel
                if path.is_file():
                    parent = str(Path(rel).parent)
                    mlflow.log_artifact(str(path), artifact_path=None if parent == "." else parent)
            return str(run.info.run_id)
    except Exception as exc:  # tracking never fails a night that finished: the manifest has the record
        log.warning("MLflow tracking at %s failed (%s: %s); the run itself is complete and in the manifest",
                    uri, type(exc).__name__, first_line(exc, empty=""))
        return None
