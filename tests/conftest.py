"""Shared fixtures: paths to the sample data and the shared real data sets."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

pytest_plugins = ["tests.reliability_counts"]

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

PROJECT = Path(__file__).resolve().parents[1]
SAMPLE_DATA = PROJECT / "data"
SHARED_DATASETS = PROJECT.parent / "shared" / "datasets"


@pytest.fixture(scope="session")
def sample_data() -> Path:
    if not (SAMPLE_DATA / "items.csv").is_file():
        pytest.skip("data/ sample not generated (run: make sample)")
    return SAMPLE_DATA


def shared_dataset(name: str) -> Path:
    path = SHARED_DATASETS / name / "fusionrec"
    if not path.is_dir():
        pytest.skip(f"shared data set {name} absent at {path} (tests on real data need ../shared/datasets)")
    return path


@pytest.fixture(scope="session")
def movielens() -> Path:
    return shared_dataset("movielens-100k")


@pytest.fixture(scope="session")
def lastfm() -> Path:
    return shared_dataset("lastfm-2k")
