"""Calibration KL (Steck 2018) and the rerank trade-off section of the HTML report."""

from __future__ import annotations

import base64
import io
import math

import polars as pl
import pytest
from PIL import Image

from fusionrec.evaluation.metrics import calibration_kl, calibration_kl_per_user
from fusionrec.evaluation.report import render_report
from tests.evaluation.test_report import parse

ITEMS = pl.DataFrame({"item_id": ["a", "b", "c", "d"], "tags": ["x", "y", "x|y", None]})


def test_calibration_kl_by_hand() -> None:
    history = pl.DataFrame({"user_id": ["u", "u", "v"], "item_id": ["a", "c", "b"]})
    recs = pl.DataFrame({"user_id": ["u", "u", "v", "w"], "rank": [1, 2, 1, 1], "item_id": ["a", "b", "d", "a"]})
    got = dict(calibration_kl_per_user(recs, history, ITEMS, "tags").iter_rows())
    # u: p = (x 0.75, y 0.25) from a (x) and c (x|y); q = (x 0.5, y 0.5).
    alpha = 0.01
    p, q = [0.75, 0.25], [0.5, 0.5]
    want_u = sum(pi * math.log(pi / ((1 - alpha) * qi + alpha * pi)) for pi, qi in zip(p, q, strict=True))
    assert got["u"] == pytest.approx(want_u)
    # v: p = (y 1); the list's only item has no tags: q = 0, KL = log(1 / alpha).
    assert got["v"] == pytest.approx(math.log(1 / alpha))
    assert "w" not in got  # no history to calibrate against
    assert calibration_kl(recs, history, ITEMS, "tags") == pytest.approx((want_u + math.log(100)) / 2)
    same = pl.DataFrame({"user_id": ["u", "u"], "rank": [1, 2], "item_id": ["c", "a2"]})
    items = pl.concat([ITEMS, pl.DataFrame({"item_id": ["a2", "a3"], "tags": ["x", "x"]})])
    assert calibration_kl(same, history.filter(pl.col("user_id") == "u"), items, "tags") == pytest.approx(0.0)


def test_the_report_draws_the_tradeoff_curves() -> None:
    base = {"option": "none (shipped order)", "value": None, "ndcg@10": 0.22, "coverage": 0.3, "gini": 0.88,
            "long_tail_share": 0.09, "ild": 0.95, "calibration_kl": 0.73}
    points = [base] + [
        {"option": "long-tail minimum", "value": v, "ndcg@10": 0.22 - v / 10, "ndcg@10_diff": -v / 10,
         "ndcg@10_ci": [-v / 10 - 0.003, -v / 10 + 0.003], "coverage": 0.3 + v / 5, "gini": 0.88 - v / 10,
         "long_tail_share": v, "ild": 0.95, "calibration_kl": 0.73 + v / 10} for v in (0.1, 0.3, 0.5)]
    page = render_report(tradeoff=points)
    doc = parse(page)
    assert [i["data-plot"] for i in doc.imgs] == ["tradeoff"]
    assert "Beyond accuracy: rerank trade-offs" in doc.h2
    png = base64.b64decode(doc.imgs[0]["src"].split(",", 1)[1])
    assert Image.open(io.BytesIO(png)).size[0] > 600
    assert "long-tail minimum" in page and "none (shipped order)" in page
    assert "tradeoff" not in [i["data-plot"] for i in parse(render_report(tradeoff=[])).imgs]
