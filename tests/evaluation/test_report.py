"""The HTML report: one self-contained page whose plots are embedded PNGs.

The browser test renders the page in headless Chromium with the network cut off and counts
the images that decoded; it is skipped with the reason where Chromium is absent.
"""

from __future__ import annotations

import base64
import io
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from PIL import Image

from fusionrec.evaluation.report import Section, render_report, write_report

ALL_PLOTS = {"metrics_vs_k", "peers", "ablations", "feature_importance", "modality_weights", "user_attention",
             "popularity_lorenz"}


class _Collector(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.imgs: list[dict[str, str]] = []
        self.tags: list[str] = []
        self.h2: list[str] = []
        self._in_h2 = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append(tag)
        if tag == "img":
            self.imgs.append({k: v or "" for k, v in attrs})
        self._in_h2 = tag == "h2"

    def handle_data(self, data: str) -> None:
        if self._in_h2:
            self.h2.append(data)
            self._in_h2 = False


def parse(page: str) -> _Collector:
    c = _Collector()
    c.feed(page)
    return c


def sections() -> dict:
    rng = np.random.default_rng(0)
    runs = {
        "popularity": {"recall@10": 0.07, "recall@20": 0.12, "ndcg@10": 0.34, "ndcg@20": 0.31, "n_users": 301},
        "fusion": {"recall@10": 0.09, "recall@20": 0.15, "ndcg@10": 0.37, "ndcg@20": 0.35, "n_users": 301},
    }
    table = pl.DataFrame({"model": ["popularity", "ALS"], "ndcg@10": [0.34, 0.33],
                          "ndcg@10_ci_low": [0.30, 0.29], "ndcg@10_ci_high": [0.37, 0.36],
                          "recall@10": [0.071, 0.074]})
    recs = pl.DataFrame({"user_id": ["u1", "u1", "u2", "u2"], "rank": [1, 2, 1, 2],
                         "item_id": ["a", "b", "a", "c"], "score": [1.0, 0.5, 1.0, 0.5]})
    return dict(
        title="test <report>",
        meta={"data": "tiny"},
        summary=runs["fusion"],
        runs=runs,
        slices={"all": {"n_users": 301, "ndcg@10": 0.37}, "new_users": {"n_users": 192, "ndcg@10": 0.45}},
        comparisons=[{"metric": "ndcg@10", "diff": 0.03, "ci_low": 0.01, "ci_high": 0.05, "p_value": 0.004}],
        peers=table,
        ablations=table.rename({"model": "variant"}).with_columns(pl.Series("variant", ["text only", "image only"])),
        feature_importance=pl.DataFrame({"feature": [f"f{i}" for i in range(8)], "importance": rng.random(8)}),
        modality_weights={"text": 0.5, "image": 0.3, "behaviour": 0.2},
        user_attention=pl.DataFrame({"user_id": ["u1", "u2", "u3"], "text": [0.2, 0.5, 0.7],
                                     "image": [0.8, 0.5, 0.3]}),
        exposure={"popularity": recs, "counts": np.array([5, 1, 0, 0])},
        n_items=4,
        sections=[Section("Notes", "<p>hand-written</p>")],
    )


@pytest.fixture(scope="module")
def page() -> str:
    return render_report(**sections())


def test_every_plot_is_an_embedded_png(page: str) -> None:
    doc = parse(page)
    plots = [i for i in doc.imgs if i.get("data-plot")]
    assert {i["data-plot"] for i in plots} == ALL_PLOTS
    assert len(plots) == len(doc.imgs) == len(ALL_PLOTS)
    for img in plots:
        prefix = "data:image/png;base64,"
        assert img["src"].startswith(prefix)
        raw = base64.b64decode(img["src"][len(prefix):], validate=True)
        assert raw[:8] == b"\x89PNG\r\n\x1a\n"
        with Image.open(io.BytesIO(raw)) as im:
            assert im.width > 100 and im.height > 100
            assert "Software" not in im.info  # no URL-bearing metadata


def test_page_is_self_contained(page: str) -> None:
    doc = parse(page)
    assert not re.search(r"https?://", page)
    assert "script" not in doc.tags and "link" not in doc.tags and "iframe" not in doc.tags
    assert not re.search(r"""(?:src|href)=["'](?!data:)""", page)
    assert "@import" not in page and "url(" not in page


def test_sections_tables_and_escaping(page: str) -> None:
    doc = parse(page)
    assert doc.h2 == ["Summary", "Metrics against cut-off", "Slices", "Paired comparisons (offline A/B)",
                      "Peers", "Ablations", "Feature importance", "Modality weights", "Popularity bias", "Notes"]
    assert "<title>test &lt;report&gt;</title>" in page
    assert "0.3400 [0.3000, 0.3700]" in page  # CI columns folded into the metric cell
    assert "<p>hand-written</p>" in page
    # Exposure [2, 1, 1, 0] and [5, 1, 0, 0] over 4 items: Gini 6/16 and 16/24, by hand.
    assert "<td>0.3750</td>" in page and "<td>0.6667</td>" in page


def test_missing_sections_are_left_out() -> None:
    only = render_report(peers=sections()["peers"])
    doc = parse(only)
    assert [i["data-plot"] for i in doc.imgs] == ["peers"]
    assert doc.h2 == ["Peers"]
    empty = parse(render_report())
    assert empty.imgs == [] and empty.h2 == []
    # Long-form per-user attention without global weights still gets its histogram.
    long = pl.DataFrame({"modality": ["text", "image", "text"], "weight": [0.1, 0.9, 0.4]})
    assert [i["data-plot"] for i in parse(render_report(user_attention=long)).imgs] == ["user_attention"]


def test_write_is_atomic(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "report.html"
    write_report(target, peers=sections()["peers"])
    first = target.read_text()
    assert first.startswith("<!DOCTYPE html>")
    with pytest.raises(ValueError, match="numeric column"):
        write_report(target, feature_importance=pl.DataFrame({"feature": ["f"], "importance": ["high"]}))
    assert target.read_text() == first  # a failed render leaves the old page whole
    write_report(target, title="second")
    assert "second" in target.read_text()
    assert [p.name for p in target.parent.iterdir()] == ["report.html"]  # no temp files left


def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        found = shutil.which(name)
        if found:
            return found
    return "/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None


CHECK_SCRIPT = """<script>
window.addEventListener('load', function () {
  var imgs = Array.prototype.slice.call(document.images);
  var ok = imgs.filter(function (i) {
    return i.complete && i.naturalWidth > 0 && i.src.indexOf('data:image/png;base64,') === 0;
  });
  var d = document.createElement('div');
  d.id = 'img-check';
  d.textContent = ok.length + '/' + imgs.length + ':' + ok.map(function (i) {
    return i.getAttribute('data-plot'); }).sort().join(',');
  document.body.appendChild(d);
});
</script>"""


def test_renders_in_headless_chromium(tmp_path: Path, page: str) -> None:
    browser = _chromium()
    if browser is None:
        pytest.skip("Chromium not installed (apt-get install chromium); the parsed-HTML tests still ran")
    # The check script is added to a copy: the report itself stays script-free.
    probe = tmp_path / "probe.html"
    probe.write_text(page.replace("</body>", CHECK_SCRIPT + "</body>"), encoding="utf-8")
    cmd = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           "--disable-dev-shm-usage", "--host-resolver-rules=MAP * ~NOTFOUND",  # no network at all
           f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=5000", "--dump-dom",
           probe.as_uri()]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=90)
    except subprocess.TimeoutExpired:
        pytest.fail("headless Chromium did not finish within 90 s")
    marker = re.search(r'<div id="img-check">([^<]*)</div>', done.stdout)
    assert marker, f"no check marker in the DOM (exit {done.returncode}): {done.stderr[-2000:]}"
    expected = ",".join(sorted(ALL_PLOTS))
    assert marker.group(1) == f"{len(ALL_PLOTS)}/{len(ALL_PLOTS)}:{expected}"
