"""The nightly job and the commands users run, end to end on the shipped sample (text modality)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest
from typer.testing import CliRunner

from fusionrec.cli import app
from fusionrec.pipeline.io.manifest import read_manifest

pytestmark = pytest.mark.integration
FAST = ["--set", "embed.image.enabled=false", "--set", "embed.audio.enabled=false"]


@pytest.fixture(scope="module")
def art(tmp_path_factory: pytest.TempPathFactory, sample_data: Path) -> Path:
    out = tmp_path_factory.mktemp("cli") / "art"
    result = CliRunner().invoke(app, ["run", "--data", str(sample_data), "--out", str(out), "-q", *FAST])
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture(scope="module")
def themes(sample_data: Path) -> dict:
    return json.loads((sample_data / "themes.json").read_text())


def invoke(*args: str) -> object:
    return CliRunner().invoke(app, list(args))


def test_run_writes_every_artifact_and_a_manifest(art: Path) -> None:
    for rel in ("embeddings/item_text.parquet", "embeddings/user_text.parquet", "embeddings/failures.parquet",
                "index/index.faiss", "index/retriever.json", "candidates.parquet", "ranker/model.txt",
                "ranker/features.json", "exports/topk.parquet", "manifest.json"):
        assert (art / rel).is_file(), rel
    runs = read_manifest(art)["runs"]
    assert [r["command"] for r in runs] == ["embed", "index", "train", "recommend", "run"]
    assert set(runs[-1]["timings"]) == {"embed", "index", "train", "recommend"}
    index_run = next(r for r in runs if r["command"] == "index")
    weights = index_run["retrieval"]["weights"]
    assert abs(sum(weights.values()) - 1) < 1e-6 and set(weights) == {"text", "behaviour", "popularity"}
    assert index_run["retrieval"]["weights_source"] == "validation_search"
    top = pl.read_parquet(art / "exports" / "topk.parquet")
    assert top.columns[:5] == ["user_id", "rank", "item_id", "score", "retrieval_score"]
    assert top.group_by("user_id").len()["len"].max() == 10


def test_the_shipped_order_is_the_one_that_won_on_validation(art: Path) -> None:
    train = next(r for r in read_manifest(art)["runs"] if r["command"] == "train")["training"]
    guard = train["guard"]
    ndcg = train["valid_ndcg@10"]
    assert guard["users"] >= 20 and set(ndcg) == {"ranker", "retrieval"}
    if train["order"] == "ranker":
        assert guard["ships"] and guard["interval"][0] > 0 and ndcg["ranker"] > ndcg["retrieval"]
    else:  # not a clear gain across users, or a clear loss forward in time: the reason says which
        assert not guard["ships"] and guard["reason"]
        assert guard["interval"][0] <= 0 or (guard["forward"] and guard["forward"]["harms"])
    assert json.loads((art / "ranker" / "guard.json").read_text())["order"] == train["order"]


def test_recommendations_follow_each_users_themes(art: Path, tmp_path: Path, themes: dict) -> None:
    out = tmp_path / "recs.csv"
    result = invoke("recommend", "--out", str(art), "--k", "10", "--export", str(out), "--raw-ids", "-q")
    assert result.exit_code == 0, result.output
    recs = pl.read_csv(out, schema_overrides={"user_id": pl.String, "item_id": pl.String})
    item_theme = pl.DataFrame({"item_id": list(themes["items"]), "theme": list(themes["items"].values())})
    fav = pl.DataFrame({"user_id": list(themes["users"]), "fav": list(themes["users"].values())})
    joined = recs.join(item_theme, on="item_id").join(fav, on="user_id")
    share = joined.select(pl.col("fav").list.contains(pl.col("theme")).mean()).item()
    assert share > 0.8  # the simulated users put 89% of their interactions in their themes
    # New users with profile text only are served from their own content.
    for user in themes["cold_users"]:
        mine = joined.filter(pl.col("user_id") == user)
        assert mine.height == 10
        assert mine.select(pl.col("fav").list.contains(pl.col("theme")).mean()).item() >= 0.6, user


def test_seen_items_are_left_out_unless_asked(art: Path, tmp_path: Path) -> None:
    seen = pl.read_parquet(art / "data" / "interactions.parquet").select("user_id", "item_id").unique()
    for flag, expect_overlap in (([], False), (["--include-seen"], True)):
        out = tmp_path / f"recs{len(flag)}.parquet"
        assert invoke("recommend", "--out", str(art), "--k", "20", "--export", str(out), "--raw-ids", "-q",
                      *flag).exit_code == 0
        overlap = pl.read_parquet(out).join(seen, on=["user_id", "item_id"]).height
        assert (overlap > 0) == expect_overlap


def test_score_says_which_items_it_does_not_know(art: Path, tmp_path: Path, sample_data: Path) -> None:
    """Before: an empty score, no warning, and `source` naming a list the row is not in."""
    user = pl.read_csv(sample_data / "interactions.csv")["user_id"].sort()[0]
    item = pl.read_csv(sample_data / "items.csv")["item_id"].sort()[0]
    pairs = tmp_path / "pairs.csv"
    pl.DataFrame({"user_id": [user, user, "nobody"], "item_id": [item, "zzz", "zzz"]}).write_csv(pairs)
    scored = tmp_path / "scored.csv"
    result = invoke("score", "--out", str(art), "--candidates", str(pairs), "--export", str(scored), "--raw-ids")
    text = " ".join(result.output.split())
    assert result.exit_code == 0, text
    assert "2 of 3 pairs name an item the artifacts do not know (e.g. 'zzz'" in text
    rows = pl.read_csv(scored).sort("item_id")
    assert rows["item_id"].to_list() == [item, "zzz", "zzz"]
    assert rows["score"].null_count() == 2 and rows["score"][0] is not None
    assert rows["source"].null_count() == 2 and rows["source"][0] is not None


def test_score_and_recommend_agree_on_the_same_pairs(art: Path, tmp_path: Path) -> None:
    recs = tmp_path / "recs.parquet"
    assert invoke("recommend", "--out", str(art), "--k", "5", "--export", str(recs), "--raw-ids", "-q").exit_code == 0
    pairs = tmp_path / "pairs.csv"
    pl.read_parquet(recs).select("user_id", "item_id").write_csv(pairs)
    scored = tmp_path / "scored.jsonl"
    result = invoke("score", "--out", str(art), "--candidates", str(pairs), "--export", str(scored), "--raw-ids", "-q")
    assert result.exit_code == 0, result.output
    a = pl.read_parquet(recs).select("user_id", "item_id", "score")
    b = pl.read_ndjson(scored).select("user_id", "item_id", pl.col("score").alias("scored"))
    both = a.join(b, on=["user_id", "item_id"])
    assert both.height == a.height
    assert (both["score"] - both["scored"]).abs().max() < 1e-9


def test_an_export_to_stdout_is_json_lines_and_nothing_else(art: Path, tmp_path: Path) -> None:
    # `--export -` pipes the list: standard output holds its JSON lines only (logs go to
    # stderr, without -q too), the same rows as a file export; the run record says "-".
    recs = tmp_path / "recs.jsonl"
    assert invoke("recommend", "--out", str(art), "--k", "3", "--export", str(recs), "--raw-ids", "-q").exit_code == 0
    result = CliRunner().invoke(app, ["recommend", "--out", str(art), "--k", "3", "--export", "-", "--raw-ids"])
    assert result.exit_code == 0, result.output
    piped = pl.DataFrame([json.loads(line) for line in result.stdout.splitlines()])
    assert piped.equals(pl.read_ndjson(recs))
    assert "wrote" in result.stderr and "wrote" not in result.stdout
    assert [r for r in read_manifest(art)["runs"] if r["command"] == "recommend"][-1]["export"] == "-"
    pairs = tmp_path / "pairs.csv"
    piped.select("user_id", "item_id").write_csv(pairs)
    scored = invoke("score", "--out", str(art), "--candidates", str(pairs), "--export", "-", "--raw-ids", "-q")
    assert scored.exit_code == 0, scored.output
    assert [json.loads(line)["item_id"] for line in scored.stdout.splitlines()] == piped["item_id"].to_list()


def test_a_k_past_the_candidates_says_the_lists_are_shorter(art: Path, tmp_path: Path) -> None:
    out = tmp_path / "recs.parquet"
    result = CliRunner().invoke(app, ["recommend", "--out", str(art), "--k", "500", "--export", str(out), "--raw-ids"])
    assert result.exit_code == 0, result.output
    per_user = pl.read_parquet(out).group_by("user_id").len()["len"]
    assert per_user.max() < 500
    assert f"{per_user.len()} of {per_user.len()} users got fewer than 500 items" in result.stderr
    assert "raise index.n_candidates" in result.stderr
    record = [r for r in read_manifest(art)["runs"] if r["command"] == "recommend"][-1]
    assert record["counts"]["short_lists"] == per_user.len()
    ok = CliRunner().invoke(app, ["recommend", "--out", str(art), "--k", "3", "--export", str(out), "--raw-ids"])
    assert ok.exit_code == 0 and "fewer than" not in ok.stderr


def test_unknown_users_get_popular_items_not_an_error(art: Path, tmp_path: Path) -> None:
    users = tmp_path / "users.csv"
    pl.DataFrame({"user_id": ["u0001", "someone-new"]}).write_csv(users)
    out = tmp_path / "recs.parquet"
    result = invoke("recommend", "--out", str(art), "--k", "3", "--users", str(users), "--export", str(out),
                    "--raw-ids", "-q")
    assert result.exit_code == 0, result.output
    recs = pl.read_parquet(out)
    assert sorted(recs["user_id"].unique()) == ["someone-new", "u0001"]
    assert recs.filter(pl.col("user_id") == "someone-new").height == 3


def test_unknown_requested_users_are_counted_and_a_pseudonym_is_recognised(art: Path, tmp_path: Path) -> None:
    """A typo, or an id copied from a pseudonymised export, used to get the popular items in silence."""
    users = tmp_path / "users.csv"
    pseudonym = "ab" * 32
    pl.DataFrame({"user_id": ["u0001", "u0001 ", "someone-new", pseudonym]}).write_csv(users)
    out = tmp_path / "recs.parquet"
    result = CliRunner().invoke(app, ["recommend", "--out", str(art), "--k", "3", "--users", str(users),
                                      "--export", str(out), "--raw-ids"])
    assert result.exit_code == 0, result.output
    assert (f"2 of 3 requested users are unknown to {art} ({pseudonym}, someone-new): they get the popular items; "
            "64-hex ids look like the pseudonyms an export writes: pass the raw ids (`--raw-ids` exports them)"
            in " ".join(result.stderr.split())), result.stderr
    record = [r for r in read_manifest(art)["runs"] if r["command"] == "recommend"][-1]
    assert record["counts"]["unknown_users"] == 2
    known = tmp_path / "known.csv"
    pl.DataFrame({"user_id": ["u0001"]}).write_csv(known)
    ok = CliRunner().invoke(app, ["recommend", "--out", str(art), "--k", "3", "--users", str(known),
                                  "--export", str(out), "--raw-ids"])
    assert ok.exit_code == 0 and "requested users are unknown" not in ok.stderr


def test_exports_are_pseudonymised_by_default(art: Path, tmp_path: Path) -> None:
    out = tmp_path / "recs.csv"
    assert invoke("recommend", "--out", str(art), "--k", "2", "--export", str(out), "-q").exit_code == 0
    text = out.read_text()
    raw = pl.read_parquet(art / "data" / "interactions.parquet")["user_id"].unique().to_list()
    assert not any(f"{u}," in text or f",{u}" in text for u in raw)
    ids = pl.read_csv(out)["user_id"]
    assert ids.str.len_chars().min() == 64 and ids.n_unique() == len(raw) + 3  # + users with text only
    again = tmp_path / "again.csv"
    assert invoke("recommend", "--out", str(art), "--k", "2", "--export", str(again), "-q").exit_code == 0
    assert again.read_text() == text  # stable across runs with the same key


def test_explain_shares_and_contributions(art: Path, tmp_path: Path) -> None:
    out = tmp_path / "explained.parquet"
    assert invoke("recommend", "--out", str(art), "--k", "3", "--explain", "--export", str(out), "--raw-ids",
                  "-q").exit_code == 0
    recs = pl.read_parquet(out)
    shares = [c for c in recs.columns if c.startswith("share_")]
    contribs = [c for c in recs.columns if c.startswith("contrib_")]
    # The shipped order explains itself: the ranker by feature group and modality, the
    # retrieval order by candidate source (each source's weight times its z-score).
    order = json.loads((art / "ranker" / "guard.json").read_text())["order"]
    if order == "ranker":
        assert {"share_text", "share_behaviour"} <= set(shares)
    else:  # sources with a blend weight, and the cold-start part of users without history
        assert len(shares) >= 2 and "share_cold_start" in shares
    total = recs.select(pl.sum_horizontal(shares)).to_series()
    assert ((total - 1).abs() < 1e-6).all()
    raw = recs.select(pl.sum_horizontal(contribs) + pl.col("explain_bias")).to_series()
    # The blend is computed in float32: its parts add up to the score within float32 rounding.
    assert ((raw - recs["score"]).abs() < 1e-6 * (1 + recs["score"].abs()) * (1 if order == "ranker" else 10)).all()


def test_evaluate_prints_the_table_and_writes_a_report(art: Path, tmp_path: Path, sample_data: Path) -> None:
    test_file = tmp_path / "test.csv"
    # Held-out rows that are still in the training log cannot be scored: exit 2, no report.
    pl.read_csv(sample_data / "interactions.csv").tail(200).write_csv(test_file)
    report = tmp_path / "report.html"
    result = invoke("evaluate", "--out", str(art), "--test", str(test_file), "--k", "5,10", "--report", str(report),
                    "-q")
    assert result.exit_code == 2, result.output
    assert "no scorable user" in result.output and "fusionrec split" in " ".join(result.output.split())
    assert not report.exists()
    # Rows the artifacts never saw are scored (the full evaluation on a split is in test_newcomer.py).
    unseen = tmp_path / "unseen.csv"
    items = pl.read_csv(sample_data / "items.csv")["item_id"].to_list()
    seen = pl.read_csv(sample_data / "interactions.csv").select("user_id", "item_id")
    users = seen["user_id"].unique().sort().to_list()[:20]
    rows = [(u, i) for u in users for i in items if seen.filter((pl.col("user_id") == u)
                                                                & (pl.col("item_id") == i)).height == 0][:200]
    pl.DataFrame({"user_id": [u for u, _ in rows], "item_id": [i for _, i in rows],
                  "timestamp": [int(pl.read_csv(sample_data / "interactions.csv")["timestamp"].max()) + 60] * len(rows)}
                 ).write_csv(unseen)
    result = invoke("evaluate", "--out", str(art), "--test", str(unseen), "--k", "5,10", "--report", str(report),
                    "-q")
    assert result.exit_code == 0, result.output
    for name in ("fusionrec", "retrieval only", "popularity", "item-kNN"):
        assert name in result.output
    html = report.read_text()
    assert html.count("data:image/png;base64,") >= 3 and "http://" not in html and "https://" not in html


def test_bad_input_exits_2_naming_file_row_and_field(tmp_path: Path, sample_data: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    (data / "items.csv").write_text("item_id,title\na,x\nb,y\na,z\n")
    result = invoke("embed", "--data", str(data), "--out", str(tmp_path / "art"), "-q")
    assert result.exit_code == 2
    assert "items.csv, row 3, field 'item_id': duplicate id 'a'" in " ".join(result.output.split())
    pairs = tmp_path / "pairs.csv"
    pairs.write_text("user,item_id\nu,a\n")
    result = invoke("score", "--out", str(tmp_path / "art"), "--candidates", str(pairs), "--export",
                    str(tmp_path / "x.csv"))
    assert result.exit_code == 2 and "field 'user_id'" in " ".join(result.output.split())


def test_missing_artifacts_exit_1_with_a_hint(tmp_path: Path) -> None:
    result = invoke("recommend", "--out", str(tmp_path / "nothing"), "--export", str(tmp_path / "r.csv"))
    assert result.exit_code == 1
    assert "run `fusionrec index`" in " ".join(result.output.split())


def test_every_command_has_help() -> None:
    for command in ("run", "embed", "index", "train", "recommend", "score", "evaluate", "doctor"):
        result = invoke(command, "--help")
        assert result.exit_code == 0 and "Usage" in result.output and "--out" in result.output


SERVING_SCRIPT = """
import sys
from fusionrec.cli import main
try:
    main(sys.argv[1:])
except SystemExit as exc:
    assert exc.code in (0, None), exc.code
print('loaded:', *(m for m in ('torch', 'transformers', 'timm', 'librosa', 'ray', 'implicit', 'mlflow', 'matplotlib',
                                 'jinja2') if m in sys.modules))
"""


def test_serving_commands_load_no_deep_learning_library(art: Path, tmp_path: Path, sample_data: Path) -> None:
    import subprocess
    import sys

    pairs = tmp_path / "pairs.csv"
    pl.read_parquet(art / "candidates.parquet", columns=["user_id", "item_id"]).head(50).write_csv(pairs)
    unseen = tmp_path / "unseen.csv"
    seen = pl.read_csv(sample_data / "interactions.csv").select("user_id", "item_id")
    items = pl.read_csv(sample_data / "items.csv").select("item_id")
    fresh = seen.select("user_id").unique().sort("user_id").head(10).join(items, how="cross").join(
        seen, on=["user_id", "item_id"], how="anti").head(100)
    fresh.with_columns(pl.lit(int(pl.read_csv(sample_data / "interactions.csv")["timestamp"].max()) + 60)
                       .alias("timestamp")).write_csv(unseen)
    for args in (["recommend", "--out", str(art), "--export", str(tmp_path / "recs.parquet"), "-q"],
                 ["score", "--out", str(art), "--candidates", str(pairs), "--export", str(tmp_path / "s.csv"), "-q"],
                 ["evaluate", "--out", str(art), "--test", str(unseen), "-q"]):
        result = subprocess.run([sys.executable, "-c", SERVING_SCRIPT, *args], capture_output=True, text=True,
                                timeout=600, check=False)
        assert result.returncode == 0, result.stderr[-3000:]
        assert result.stdout.splitlines()[-1] == "loaded:", f"{args[0]} {result.stdout.splitlines()[-1]}"


def _copy(art: Path, to: Path) -> Path:
    shutil.copytree(art, to)
    return to


def test_score_gives_the_rankers_score_of_recommend_where_the_ranker_ships(art: Path, tmp_path: Path) -> None:
    """`score` feeds the ranker the rank features the candidates have (ranks among unseen
    items), so where the ranker's order ships its scores equal `recommend`'s."""
    shipped = _copy(art, tmp_path / "art")
    guard = json.loads((shipped / "ranker" / "guard.json").read_text())
    guard["order"] = "ranker"  # the sample's guard ships retrieval; serve the trained ranker
    (shipped / "ranker" / "guard.json").write_text(json.dumps(guard))
    recs = tmp_path / "recs.parquet"
    assert invoke("recommend", "--out", str(shipped), "--k", "10", "--export", str(recs), "--raw-ids", "-q",
                  "--explain").exit_code == 0
    listed = pl.read_parquet(recs)
    assert (listed["source"] == "ranker").sum() > 0
    pairs = tmp_path / "pairs.csv"
    listed.select("user_id", "item_id").write_csv(pairs)
    scored = tmp_path / "scored.parquet"
    result = invoke("score", "--out", str(shipped), "--candidates", str(pairs), "--export", str(scored), "--raw-ids",
                    "-q")
    assert result.exit_code == 0, result.output
    both = listed.select("user_id", "item_id", "score").join(
        pl.read_parquet(scored).select("user_id", "item_id", pl.col("score").alias("scored")), on=["user_id", "item_id"])
    assert both.height == listed.height
    assert (both["score"] - both["scored"]).abs().max() < 1e-6


def test_evaluate_never_writes_its_report_over_an_artifact(art: Path, tmp_path: Path) -> None:
    copy = _copy(art, tmp_path / "art")
    before = (copy / "manifest.json").read_bytes()
    held = tmp_path / "held.csv"
    held.write_text("user_id,item_id,timestamp\nu0001,i0001,9999999999\n")
    result = invoke("evaluate", "--out", str(copy), "--test", str(held), "--report", str(copy / "manifest.json"), "-q")
    assert result.exit_code == 2, result.output
    assert "would land among the artifacts' own files" in " ".join(result.output.split())
    assert (copy / "manifest.json").read_bytes() == before


def test_an_export_inside_the_artifacts_goes_under_exports_on_every_night(art: Path, tmp_path: Path,
                                                                         sample_data: Path) -> None:
    """A new file at ART's top level was accepted, and the same command refused the next night
    (the file then being there, "the artifacts' own file"). Inside ART only ART/exports/ takes
    exports, the first night as the second; there a report is replaced night after night."""
    copy = _copy(art, tmp_path / "art")
    log = pl.read_csv(sample_data / "interactions.csv")
    user = log["user_id"].sort()[0]
    item = next(i for i in pl.read_csv(sample_data / "items.csv")["item_id"].to_list()
                if log.filter((pl.col("user_id") == user) & (pl.col("item_id") == i)).height == 0)
    held = tmp_path / "held.csv"
    held.write_text(f"user_id,item_id,timestamp\n{user},{item},{int(log['timestamp'].max()) + 60}\n")
    result = invoke("evaluate", "--out", str(copy), "--test", str(held), "--report", str(copy / "r.html"), "-q")
    assert result.exit_code == 2, result.output
    assert (f"{copy / 'r.html'}: the export would land among the artifacts' own files ({copy / 'r.html'}); inside "
            f"the artifacts directory only {copy / 'exports'} takes exports: write it there or outside") \
        in " ".join(result.output.split())
    assert not (copy / "r.html").exists()
    for night in (1, 2):
        result = invoke("evaluate", "--out", str(copy), "--test", str(held), "--report",
                        str(copy / "exports" / "r.html"), "-q")
        assert result.exit_code == 0, (night, result.output)
        assert "<html" in (copy / "exports" / "r.html").read_text().lower()


def test_evaluate_names_a_damaged_artifact_and_the_command_that_rebuilds_it(art: Path, tmp_path: Path) -> None:
    copy = _copy(art, tmp_path / "art")
    meta = copy / "sources" / "sources.json"
    meta.write_bytes(meta.read_bytes()[: meta.stat().st_size // 2])
    held = tmp_path / "held.csv"
    held.write_text("user_id,item_id,timestamp\nu0001,i0001,9999999999\n")
    for command in (["evaluate", "--test", str(held)], ["recommend", "--export", str(tmp_path / "r.csv")]):
        result = invoke(*command, "--out", str(copy), "-q")
        text = " ".join(result.output.split())
        assert result.exit_code == 1, text
        assert "unexpected" not in text and "sources.json" in text and "fusionrec index" in text


def test_errors_print_brackets_as_they_are(art: Path, tmp_path: Path) -> None:
    """Messages are text, not markup: a path or key with [brackets] is printed whole."""
    missing = tmp_path / "users[prod].csv"
    result = invoke("recommend", "--out", str(art), "--users", str(missing), "--export", str(tmp_path / "r.csv"))
    assert result.exit_code == 2
    assert "users[prod].csv: no such file" in " ".join(result.output.split())
    odd = tmp_path / "x[/b]" / "u.csv"
    result = invoke("recommend", "--out", str(art), "--users", str(odd), "--export", str(tmp_path / "r.csv"))
    assert result.exit_code == 2 and "x[/b]" in result.output and "unexpected" not in result.output


def test_user_ids_are_trimmed_and_must_be_scalars(art: Path, tmp_path: Path) -> None:
    users = tmp_path / "users.csv"
    users.write_text("user_id\n u0002 \n")
    plain = tmp_path / "plain.csv"
    plain.write_text("user_id\nu0002\n")
    outs = []
    for name, path in (("trimmed", users), ("plain", plain)):
        out = tmp_path / f"{name}.csv"
        assert invoke("recommend", "--out", str(art), "--users", str(path), "--export", str(out), "--raw-ids",
                      "-q").exit_code == 0
        outs.append(pl.read_csv(out))
    assert outs[0]["user_id"].unique().to_list() == ["u0002"]
    assert outs[0].equals(outs[1])
    nested = tmp_path / "nested.parquet"
    pl.DataFrame({"user_id": [["u0001"], ["u0002"]]}).write_parquet(nested)
    result = invoke("recommend", "--out", str(art), "--users", str(nested), "--export", str(tmp_path / "n.csv"))
    assert result.exit_code == 2
    assert "field 'user_id': ids must be text or numbers" in " ".join(result.output.split())
    pairs = tmp_path / "pairs.parquet"
    pl.DataFrame({"user_id": ["u0001"], "item_id": [{"id": 1}]}).write_parquet(pairs)
    result = invoke("score", "--out", str(art), "--candidates", str(pairs), "--export", str(tmp_path / "s.csv"))
    assert result.exit_code == 2 and "field 'item_id'" in " ".join(result.output.split())


def test_a_truncated_embeddings_table_is_a_damaged_artifact(art: Path, tmp_path: Path) -> None:
    """Not bad input (exit 2): the artifacts' own file, exit 1 with the command that rebuilds it."""
    copy = _copy(art, tmp_path / "art")
    table = copy / "embeddings" / "item_text.parquet"
    table.write_bytes(table.read_bytes()[: table.stat().st_size // 2])
    result = invoke("recommend", "--out", str(copy), "--export", str(tmp_path / "r.csv"), "-q")
    text = " ".join(result.output.split())
    assert result.exit_code == 1, text
    assert "item_text.parquet" in text and "fusionrec embed" in text


def test_a_deleted_embeddings_table_the_index_was_built_with_is_an_error(art: Path, tmp_path: Path) -> None:
    """Not lists that change silently: exit 1 naming the table and the command that rebuilds it."""
    copy = _copy(art, tmp_path / "art")
    # Another item table stays (the sample's index has one content modality; with none left
    # the same check names it).
    (copy / "embeddings" / "item_text.parquet").rename(copy / "embeddings" / "item_spare.parquet")
    result = invoke("recommend", "--out", str(copy), "--export", str(tmp_path / "r.csv"), "-q")
    text = " ".join(result.output.split())
    assert result.exit_code == 1, text
    assert "item_text.parquet is missing" in text and "fusionrec embed" in text


def test_a_file_without_users_or_pairs_is_refused_and_the_last_export_kept(art: Path, tmp_path: Path) -> None:
    """A header-only --users or --candidates file would replace yesterday's export with nothing."""
    last = tmp_path / "topk.csv"
    last.write_text("yesterday\n")
    header_only = tmp_path / "header.csv"
    header_only.write_text("user_id,item_id\n")
    blank_ids = tmp_path / "blank.csv"
    blank_ids.write_text("user_id\n \n\"\"\n")
    for command, option, path, message in (("recommend", "--users", header_only, "no user ids: the file has no rows"),
                                           ("recommend", "--users", blank_ids, "no user ids: every user_id is empty"),
                                           ("score", "--candidates", header_only, "no pairs")):
        result = invoke(command, "--out", str(art), option, str(path), "--export", str(last))
        text = " ".join(result.output.split())
        assert result.exit_code == 2, text
        assert f"{path}" in text and message in text
        assert last.read_text() == "yesterday\n"


def test_a_ragged_pairs_file_names_its_row(art: Path, tmp_path: Path) -> None:
    pairs = tmp_path / "pairs.csv"
    pairs.write_text("user_id,item_id\nu0001,i0001\nu0002,i0002,extra\n")
    result = invoke("score", "--out", str(art), "--candidates", str(pairs), "--export", str(tmp_path / "s.csv"))
    text = " ".join(result.output.split())
    assert result.exit_code == 2, text
    assert f"{pairs}, row 2" in text and "3 cells, but the header names 2 columns" in text


def test_evaluate_refuses_a_k_past_the_catalogue_and_warns_on_unrated_rows(art: Path, tmp_path: Path,
                                                                          sample_data: Path) -> None:
    """A huge --k exits 2 (before: a crash allocating for it); --relevance keeps rows without a
    value relevant and says how many; a non-finite --relevance exits 2."""
    n_items = pl.read_csv(sample_data / "items.csv").height
    seen = pl.read_csv(sample_data / "interactions.csv")
    user = seen["user_id"].sort()[0]
    unseen_items = [i for i in pl.read_csv(sample_data / "items.csv")["item_id"].to_list()
                    if i not in set(seen.filter(pl.col("user_id") == user)["item_id"].to_list())][:4]
    held = tmp_path / "held.csv"
    pl.DataFrame({"user_id": [user] * 4, "item_id": unseen_items, "timestamp": [int(seen["timestamp"].max()) + 60] * 4,
                  "value": [5.0, 1.0, None, None]}).write_csv(held)
    for k in ("99999999999999999999", f"10,{n_items + 1}"):
        result = invoke("evaluate", "--out", str(art), "--test", str(held), "--k", k, "--no-baselines")
        text = " ".join(result.output.split())
        assert result.exit_code == 2 and f"above the catalogue's {n_items} items" in text, text
    result = invoke("evaluate", "--out", str(art), "--test", str(held), "--relevance", "nan", "--no-baselines")
    assert result.exit_code == 2 and "--relevance must be a finite number" in result.output
    result = invoke("evaluate", "--out", str(art), "--test", str(held), "--relevance", "most", "--no-baselines")
    assert result.exit_code == 2 and "takes a number, auto or all, not 'most'" in " ".join(result.output.split())
    result = invoke("evaluate", "--out", str(art), "--test", str(held), "--relevance", "4", "--k", "5",
                    "--no-baselines")
    text = " ".join(result.output.split())
    assert result.exit_code == 0, text
    assert "2 of 4 held-out rows have no value; they stay relevant" in text


def test_train_on_a_missing_artifacts_folder_says_what_to_run_and_creates_nothing(tmp_path: Path) -> None:
    """Before, the write lock created the folder (and a manifest) to record the failure."""
    result = invoke("train", "--out", str(tmp_path / "none"))
    text = " ".join(result.output.split())
    assert result.exit_code == 1 and (f"the artifacts folder {tmp_path / 'none'} does not exist: give the --out that "
                                      "`fusionrec run` (or `fusionrec index`) wrote, or run `fusionrec index` there "
                                      "first") in text, text
    assert not (tmp_path / "none").exists()
    for command in (["recommend", "--export", str(tmp_path / "r.csv")], ["evaluate", "--test", str(tmp_path / "t.csv")]):
        result = invoke(command[0], "--out", str(tmp_path / "none"), *command[1:])  # a mistyped --out
        text = " ".join(result.output.split())
        assert result.exit_code == 1 and f"the artifacts folder {tmp_path / 'none'} does not exist" in text, text
    (tmp_path / "file").write_text("x")
    result = invoke("recommend", "--out", str(tmp_path / "file"), "--export", str(tmp_path / "r.csv"))
    assert result.exit_code == 1 and "is not a folder" in " ".join(result.output.split())
    # A folder without an index still says what to run.
    (tmp_path / "empty").mkdir()
    result = invoke("train", "--out", str(tmp_path / "empty"))
    assert result.exit_code == 1 and "has no index yet: run `fusionrec index`" in " ".join(result.output.split())


def test_paths_of_the_wrong_kind_are_bad_usage_named_as_such(art: Path, tmp_path: Path, sample_data: Path) -> None:
    """Before: an --out that is a file exited 1 ("cannot create artifacts directory: File exists"),
    a --data file was said not to exist, and an --export folder had an "unsupported format '(none)'"."""
    afile = tmp_path / "afile.csv"
    afile.write_text("x\n")
    result = invoke("index", "--data", str(sample_data), "--out", str(afile))
    assert result.exit_code == 2 and f"--out {afile} is a file, not a folder" in " ".join(result.output.split())
    assert afile.read_text() == "x\n"
    result = invoke("embed", "--data", str(sample_data / "items.csv"), "--out", str(tmp_path / "art"))
    text = " ".join(result.output.split())  # typer's framed usage error: the words, not the line breaks
    assert result.exit_code == 2 and "file, not a folder" in text and "does not exist" not in text, text
    folder = tmp_path / "exports"
    folder.mkdir()
    result = invoke("recommend", "--out", str(art), "--export", str(folder))
    text = " ".join(result.output.split())
    assert result.exit_code == 2 and "is a folder: give the export a file name ending in .parquet" in text, text


def test_a_model_its_guard_did_not_check_is_not_served(art: Path, tmp_path: Path) -> None:
    """A train stage stopped after saving its model but before writing guard.json leaves the new
    model beside the last night's verdict: serving keeps the retrieval order and says why."""
    copy = _copy(art, tmp_path / "art")
    guard_path, meta_path = copy / "ranker" / "guard.json", copy / "ranker" / "features.json"
    guard = json.loads(guard_path.read_text())
    assert guard["model_sha256"] == json.loads(meta_path.read_text())["model_sha256"]
    guard["order"] = "ranker"  # the sample's guard ships retrieval; say it checked this ranker
    guard_path.write_text(json.dumps(guard))
    recs = tmp_path / "checked.parquet"
    assert invoke("recommend", "--out", str(copy), "--k", "5", "--export", str(recs), "-q").exit_code == 0
    assert (pl.read_parquet(recs)["source"] == "ranker").sum() > 0

    # Another model, saved whole (model.txt and features.json agree), that the guard never saw.
    import lightgbm

    text = lightgbm.Booster(model_file=str(copy / "ranker" / "model.txt")).model_to_string(num_iteration=1)
    (copy / "ranker" / "model.txt").write_text(text)
    meta = json.loads(meta_path.read_text())
    meta["model_sha256"] = hashlib.sha256(text.encode()).hexdigest()
    meta_path.write_text(json.dumps(meta))
    recs = tmp_path / "unchecked.parquet"
    result = invoke("recommend", "--out", str(copy), "--k", "5", "--export", str(recs))
    assert result.exit_code == 0, result.output
    assert "is not the model its guard.json checked" in " ".join(result.output.split())
    assert (pl.read_parquet(recs)["source"] == "ranker").sum() == 0


def test_a_ranker_save_killed_between_its_files_serves_the_last_complete_ranker(art: Path, tmp_path: Path) -> None:
    """Before, a train stage killed after replacing model.txt but before features.json left a
    ranker that would not load, and recommend stopped ("train again"). Now the save kept the
    complete pair in ranker/previous/: recommend serves it, the one guard.json checked, and says so."""
    copy = _copy(art, tmp_path / "art")
    guard_path = copy / "ranker" / "guard.json"
    guard = json.loads(guard_path.read_text())
    guard["order"] = "ranker"  # the sample's guard ships retrieval; say it checked this ranker
    guard_path.write_text(json.dumps(guard))
    before = tmp_path / "before.parquet"
    assert invoke("recommend", "--out", str(copy), "--k", "5", "--export", str(before), "-q").exit_code == 0
    assert (pl.read_parquet(before)["source"] == "ranker").sum() > 0

    ranker = copy / "ranker"
    code = ("from fusionrec.ranker.model import Ranker\n"
            f"r = Ranker.load({str(ranker)!r}); r.best_iteration_ = 1; r.save({str(ranker)!r})\n")  # another model
    # Killed (SIGKILL) once model.txt is replaced: the save's fault points are the kept pair, model.txt, features.json.
    env = {**os.environ, "FUSIONREC_FAULT": "written:2", "FUSIONREC_LIGHTGBM_SKLEARN": "0"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == -signal.SIGKILL, done.stderr
    assert hashlib.sha256((ranker / "model.txt").read_bytes()).hexdigest() != guard["model_sha256"]

    after = tmp_path / "after.parquet"
    result = invoke("recommend", "--out", str(copy), "--k", "5", "--export", str(after))
    text = " ".join(result.output.split())
    assert result.exit_code == 0 and "Traceback" not in result.output, result.output
    assert (f"{ranker / 'model.txt'} does not match {ranker / 'features.json'} (interrupted write?): loading the "
            f"last complete ranker, kept in {ranker / 'previous'}; rerun `fusionrec train`") in text, text
    assert pl.read_parquet(after).equals(pl.read_parquet(before))  # the same ranker, the same lists
