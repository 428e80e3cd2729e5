"""The post-ranking step (`ranker.rerank`): each option does what it says, exactly, and
the step is deterministic; off, it leaves the lists byte for byte as they were."""

from __future__ import annotations

import io
import math
import os
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from polars.testing import assert_frame_equal

from fusionrec.evaluation.metrics import (
    calibration_kl,
    head_items,
    intra_list_diversity,
    item_popularity,
    popularity_bias,
)
from fusionrec.jobs import check_engine, run_nightly, run_recommend
from fusionrec.pipeline.config import RerankConfig, load_config
from fusionrec.pipeline.errors import ConfigError, FusionrecError, InputError
from fusionrec.ranker.rerank import read_rules, rerank
from fusionrec.ranker.serving.export import TOPK_SCHEMA, read_topk, topk, write_topk
from fusionrec.ranker.serving.recommender import Recommender
from tests.ranker.rerank_data import make_case
from tests.ranker.test_training import QUIET, make_catalog

K = 10


@pytest.fixture(scope="module")
def case():
    return make_case()


def order_of(frame: pl.DataFrame) -> list[tuple[str, str]]:
    return frame.sort("user_id", "rank").select("user_id", "item_id").rows()


def parquet_bytes(frame: pl.DataFrame) -> bytes:
    buffer = io.BytesIO()
    frame.write_parquet(buffer)
    return buffer.getvalue()


def test_with_every_option_off_the_lists_are_the_shipped_order(case) -> None:
    cands, inputs = case
    out = rerank(cands, K, RerankConfig(), inputs)
    assert order_of(out) == order_of(topk(cands, K))
    assert out["rerank"].null_count() == out.height
    assert out.columns == ["user_id", "rank", "item_id", "score", "retrieval_score", "rerank"]


@pytest.mark.parametrize("modality_vectors", ["given", "none needed"])
def test_mmr_with_tradeoff_0_returns_the_rankers_order(case, modality_vectors: str) -> None:
    cands, inputs = case
    if modality_vectors == "none needed":
        inputs = type(inputs)(items=inputs.items, history=inputs.history, n_items=inputs.n_items)
    out = rerank(cands, K, RerankConfig(mmr_lambda=0.0, mmr_modality="text"), inputs)
    assert order_of(out) == order_of(topk(cands, K))


def test_mmr_diversifies_and_labels_what_it_moved(case) -> None:
    cands, inputs = case
    base = rerank(cands, K, RerankConfig(), inputs)
    ild = [intra_list_diversity(rerank(cands, K, RerankConfig(mmr_lambda=lm), inputs), inputs.vectors)
           for lm in (0.0, 0.3, 0.6)]
    assert ild[0] == pytest.approx(intra_list_diversity(base, inputs.vectors))
    assert ild[0] < ild[1] < ild[2]
    out = rerank(cands, K, RerankConfig(mmr_lambda=0.6), inputs)
    assert set(out["rerank"].drop_nulls().unique().to_list()) == {"mmr"}
    # The score column is the ranker's, untouched: every row's score is its candidate's.
    joined = out.join(cands, on=["user_id", "item_id"], suffix="_in")
    assert joined.height == out.height and (joined["score"] == joined["score_in"]).all()
    # A row labelled mmr sits above a row that the ranker put first; an unlabelled one does not.
    for user, rows in out.group_by("user_id"):
        ranks = dict(cands.filter(pl.col("user_id") == user[0]).select("item_id", "rank").iter_rows())
        listed = rows.sort("rank")
        original = [ranks[i] for i in listed["item_id"]]
        for j, label in enumerate(listed["rerank"].to_list()):
            promoted = original[j] > K or any(o < original[j] for o in original[j + 1:])
            assert (label == "mmr") == promoted


def test_calibration_brings_the_lists_mix_towards_the_history(case) -> None:
    cands, inputs = case
    kl = [calibration_kl(rerank(cands, K, RerankConfig(calibration_lambda=lc), inputs), inputs.history,
                         inputs.items, "tags") for lc in (0.0, 0.3, 0.9)]
    assert kl[0] > kl[1] > kl[2]
    out = rerank(cands, K, RerankConfig(calibration_lambda=0.5, mmr_lambda=0.3), inputs)
    assert set(out["rerank"].drop_nulls().unique().to_list()) == {"mmr", "calibration"}


@pytest.mark.parametrize("share", [0.05, 0.1, 0.25, 0.5])
def test_the_exposure_cap_holds_exactly(case, share: float) -> None:
    cands, inputs = case
    n_users = cands["user_id"].n_unique()
    cap = max(1, math.floor(share * n_users))
    out = rerank(cands, K, RerankConfig(max_item_share=share), inputs)
    counts = out.group_by("item_id").len()
    assert counts["len"].max() <= cap
    # A list shorter than k only when every candidate left out is at the cap.
    full = dict(counts.iter_rows())
    for user, rows in out.group_by("user_id"):
        if rows.height < K:
            left = cands.filter((pl.col("user_id") == user[0]) & ~pl.col("item_id").is_in(rows["item_id"].implode()))
            assert all(full.get(i, 0) >= cap for i in left["item_id"])
    if share >= 0.25:
        assert out.height == n_users * K  # enough room: every list is full


@pytest.mark.parametrize("share", [0.3, 0.6, 1.0])
def test_the_long_tail_share_reaches_its_minimum_whenever_the_candidates_allow(case, share: float) -> None:
    cands, inputs = case
    config = RerankConfig(min_long_tail_share=share)
    out = rerank(cands, K, config, inputs)
    head = set(head_items(item_popularity(inputs.history), inputs.n_items, config.head_share).to_list())
    need = math.ceil(share * K)
    for user, rows in out.group_by("user_id"):
        available = cands.filter((pl.col("user_id") == user[0]) & ~pl.col("item_id").is_in(list(head))).height
        tail = rows.filter(~pl.col("item_id").is_in(list(head))).height
        assert tail >= min(need, available)
        assert rows.height == K
    assert share < 0.5 or "long_tail" in out["rerank"].to_list()
    # The bench's metric counts the head the same way.
    got = popularity_bias(out, inputs.history, n_items=inputs.n_items, head_fraction=config.head_share)
    assert got["long_tail_share"] >= popularity_bias(topk(cands, K), inputs.history, n_items=inputs.n_items,
                                                     head_fraction=config.head_share)["long_tail_share"]


def test_long_tail_and_exposure_cap_together_keep_both(case) -> None:
    cands, inputs = case
    config = RerankConfig(min_long_tail_share=0.5, max_item_share=0.25)
    out = rerank(cands, K, config, inputs)
    assert out.group_by("item_id").len()["len"].max() <= math.floor(0.25 * cands["user_id"].n_unique())
    head = set(head_items(item_popularity(inputs.history), inputs.n_items, config.head_share).to_list())
    tails = out.with_columns(pl.col("item_id").is_in(list(head)).not_().alias("tail")).group_by("user_id") \
        .agg(pl.col("tail").sum())
    assert tails["tail"].min() >= 5


def test_the_attribute_cap_holds_within_each_list(case) -> None:
    cands, inputs = case
    out = rerank(cands, K, RerankConfig(attribute_field="brand", attribute_cap=2), inputs)
    per = out.join(inputs.items.select("item_id", "brand"), on="item_id").group_by("user_id", "brand").len()
    assert per["len"].max() <= 2
    assert "attribute_cap" in out["rerank"].to_list()


def write_rules(path: Path, rows: list[dict]) -> Path:
    pl.DataFrame(rows).write_csv(path)
    return path


def test_business_rules_exclude_pin_and_boost_as_written(case, tmp_path: Path) -> None:
    cands, inputs = case
    top_item = cands.filter(pl.col("rank") == 1)["item_id"][0]
    rules = read_rules(write_rules(tmp_path / "rules.csv", [
        {"item_id": top_item, "action": "exclude", "value": None, "position": None},
        {"item_id": "i079", "action": "pin", "value": None, "position": 3},
        {"item_id": "i078", "action": "pin", "value": None, "position": None},  # position 1
        {"item_id": "i050", "action": "boost", "value": 0.5, "position": None},
    ]))
    history = inputs.history.filter(pl.col("item_id") != "i079")
    seen = pl.DataFrame({"user_id": ["u03"], "item_id": ["i079"]})
    inputs = type(inputs)(items=inputs.items, vectors=inputs.vectors, history=history, n_items=inputs.n_items,
                          rules=rules, seen=seen)
    out = rerank(cands, K, RerankConfig(exclude_field="in_stock", exclude_values=["false"]), inputs)
    out_of_stock = inputs.items.filter(~pl.col("in_stock"))["item_id"].to_list()
    assert top_item not in out["item_id"].to_list()
    assert not set(out_of_stock) & set(out["item_id"].to_list())
    for user, rows in out.group_by("user_id"):
        rows = rows.sort("rank")
        assert rows.height == K
        assert rows["item_id"][0] == "i078" and rows["rerank"][0] == "pinned"
        if user[0] == "u03":  # already has i079: not pinned to them
            assert "i079" not in rows["item_id"].to_list()
        else:
            assert rows["item_id"][2] == "i079" and rows["rerank"][2] == "pinned"
    # The boosted item climbs wherever it was a candidate just below the cut.
    boosted = out.filter(pl.col("item_id") == "i050")
    assert boosted.height >= cands.filter((pl.col("item_id") == "i050") & (pl.col("rank") <= K)).height
    assert set(boosted["rerank"].drop_nulls().to_list()) <= {"boosted"}
    assert "boosted" in boosted["rerank"].to_list()



def test_pins_asking_for_one_position_keep_the_files_order(case, tmp_path: Path) -> None:
    """Before, a second pin at a position already pinned was inserted in front of the first,
    so the row later in the file took the place the earlier row asked for."""
    cands, inputs = case
    had = set(inputs.history["item_id"].to_list())
    free = [i for i in inputs.items["item_id"].sort(descending=True).to_list() if i not in had][:3]
    rules = read_rules(write_rules(tmp_path / "rules.csv", [
        {"item_id": free[0], "action": "pin", "position": 1},
        {"item_id": free[1], "action": "pin", "position": 1},
        {"item_id": free[2], "action": "pin", "position": 2},
    ]))
    inputs = type(inputs)(items=inputs.items, vectors=inputs.vectors, history=inputs.history, n_items=inputs.n_items,
                          rules=rules)
    out = rerank(cands, K, RerankConfig(), inputs)
    for _, rows in out.group_by("user_id"):
        rows = rows.sort("rank")
        assert rows["item_id"].to_list()[:3] == free and rows["rerank"].to_list()[:3] == ["pinned"] * 3
        assert rows.height == K


@pytest.mark.parametrize(("field", "values"), [("in_stock", ["False"]), ("in_stock", ["FALSE "]),
                                               ("stock", ["0"])])
def test_exclude_values_match_a_typed_column_by_value(case, field: str, values: list[str]) -> None:
    """Before, a Parquet true/false column matched only the lower-case 'false' (its cells cast to
    text) and a float column only '0.0': exclude_values = ["False"] (as pandas writes a CSV) or
    ["0"] silently excluded nothing, and out-of-stock items stayed in the lists."""
    cands, inputs = case
    items = inputs.items.with_columns(pl.when(pl.col("in_stock")).then(5.0).otherwise(0.0).alias("stock"))
    inputs = type(inputs)(items=items, vectors=inputs.vectors, history=inputs.history, n_items=inputs.n_items)
    gone = items.filter(~pl.col("in_stock"))["item_id"]
    assert cands.filter(pl.col("rank") <= K)["item_id"].is_in(gone.implode()).any()
    out = rerank(cands, K, RerankConfig(exclude_field=field, exclude_values=values), inputs)
    assert not out["item_id"].is_in(gone.implode()).any()
    assert out.group_by("user_id").len()["len"].to_list() == [K] * cands["user_id"].n_unique()
    # A text column (every CSV column) still matches as written.
    text = type(inputs)(items=items.with_columns(pl.col(field).cast(pl.String)), history=inputs.history,
                        n_items=inputs.n_items)
    as_text = rerank(cands, K, RerankConfig(exclude_field=field, exclude_values=values), text)
    assert as_text["item_id"].is_in(gone.implode()).any()


def test_more_pins_than_the_list_holds_are_named(case, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Before, pins beyond the k-th place vanished from every list without a word when their
    positions were within k (four pins at position 1 for lists of 3)."""
    cands, inputs = case
    had = set(inputs.history["item_id"].to_list())
    free = [i for i in inputs.items["item_id"].sort(descending=True).to_list() if i not in had][:4]
    rules = read_rules(write_rules(tmp_path / "rules.csv", [{"item_id": i, "action": "pin", "position": 1}
                                                             for i in free]))
    inputs = type(inputs)(items=inputs.items, vectors=inputs.vectors, history=inputs.history, n_items=inputs.n_items,
                          rules=rules)
    with caplog.at_level("WARNING", logger="fusionrec.rerank"):
        out = rerank(cands, 3, RerankConfig(), inputs)
    assert (f"4 items are pinned, more than the list's length 3: the ones placed after the first 3 (by position, "
            f"then file order; row 4: '{free[3]}' on) are left out") in " ".join(caplog.messages)
    lists = out.sort("user_id", "rank").group_by("user_id", maintain_order=True).agg("item_id")["item_id"].to_list()
    assert len(lists) == cands["user_id"].n_unique() and all(items == free[:3] for items in lists)

def test_rules_that_cannot_act_as_written_are_named(case, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Before, a rule naming an unknown item (a typo, a deleted item) and a pin past the list's
    end were silently ignored or moved, and a cap below one list silently became one list."""
    cands, inputs = case
    rules = read_rules(write_rules(tmp_path / "rules.csv", [
        {"item_id": "i079", "action": "pin", "value": None, "position": 1},
        {"item_id": "no-such-item", "action": "pin", "value": None, "position": 2},
        {"item_id": "i078", "action": "pin", "value": None, "position": 50},
    ]))
    inputs = type(inputs)(items=inputs.items, vectors=inputs.vectors, history=inputs.history, n_items=inputs.n_items,
                          rules=rules)
    with caplog.at_level("WARNING", logger="fusionrec.rerank"):
        out = rerank(cands, K, RerankConfig(max_item_share=1e-6), inputs)
    text = " ".join(caplog.messages)
    assert "1 row(s) name an item the catalog does not have (row 2: 'no-such-item'); they are ignored" in text
    assert f"1 pin(s) ask for a position past the list's length {K} (row 3: 'i078' at 50)" in text
    assert "max_item_share 1e-06" in text and "less than one list" in text
    assert "no-such-item" not in out["item_id"].to_list()
    last = out.sort("rank").group_by("user_id").agg(pl.col("item_id").last())["item_id"].unique().to_list()
    assert last == ["i078"]


def test_a_bad_rules_file_is_refused_naming_the_row_and_field(tmp_path: Path) -> None:
    path = write_rules(tmp_path / "bad.csv", [{"item_id": "i1", "action": "pin"}, {"item_id": "i2", "action": "drop"}])
    with pytest.raises(InputError, match="row 2, field 'action'"):
        read_rules(path)
    with pytest.raises(InputError, match="no such file"):
        read_rules(tmp_path / "absent.csv")
    # A cell that is not a number is named by its data row; empty cells take the default.
    text = tmp_path / "text.csv"
    text.write_text("item_id,action,position\ni1,pin,2\ni2,pin,\ni3,pin,abc\n")
    with pytest.raises(InputError, match="row 3, field 'position': 'position' must be a number, not 'abc'"):
        read_rules(text)
    text.write_text("item_id,action,position\ni1,pin,2\ni2,pin,\n")
    assert read_rules(text)["position"].to_list() == [2, 1]



def test_a_json_lines_rules_file_names_rows_by_their_line_and_refuses_a_blank_line_before_a_row(
        tmp_path: Path) -> None:
    """Before, a blank line was skipped by the reader and every later row was named one line
    early (a bad action on line 3 was "row 2"). A JSON lines file has no header, so row N is
    line N (a CSV's data row N is line N+1): a blank line before a row is refused, naming its line."""
    from fusionrec.ranker.serving.export import read_pairs

    pin, drop = '{"item_id": "i1", "action": "pin"}', '{"item_id": "i2", "action": "drop"}'
    path = tmp_path / "rules.jsonl"
    path.write_text(f"{pin}\n{pin}\n{drop}\n")
    with pytest.raises(InputError, match=r"rules\.jsonl, row 3, field 'action': unknown action 'drop'"):
        read_rules(path)
    csv = tmp_path / "rules.csv"  # the same rules as CSV: the same data row, one line further down
    csv.write_text("item_id,action\ni1,pin\ni1,pin\ni2,drop\n")
    with pytest.raises(InputError, match=r"rules\.csv, row 3, field 'action': unknown action 'drop'"):
        read_rules(csv)

    for body, line in ((f"{pin}\n\n{drop}\n", 2), (f"\n{pin}\n{drop}\n", 1), (f"{pin}\n{pin}\n \t\n{drop}\n", 3),
                       (f"{pin}\r\n\r\n{drop}\r\n", 2)):
        path.write_bytes(body.encode())
        with pytest.raises(InputError) as caught:
            read_rules(path)
        assert str(caught.value) == (f"{path}, row {line}: a blank line before a row: a JSON lines file holds one JSON "
                                     "object on each line, and errors name a row by its line; delete the blank line")
        assert caught.value.exit_code == 2

    # Blank lines after the last row hold no row and shift none.
    path.write_text(f"{pin}\n{drop}\n\n \n")
    with pytest.raises(InputError, match=r"rules\.jsonl, row 2, field 'action'"):
        read_rules(path)
    path.write_text('{"item_id": "i1", "action": "exclude"}\n\n')
    assert read_rules(path).rows() == [("i1", "exclude", 1.0, 1)]
    path.write_text("\n \n")
    with pytest.raises(InputError, match=r"rules\.jsonl: the file is empty"):
        read_rules(path)
    # The pairs file of `score` is read the same way.
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text('{"user_id": "u1", "item_id": "i1"}\n\n{"user_id": "u1", "item_id": ""}\n')
    with pytest.raises(InputError, match=r"pairs\.jsonl, row 2: a blank line before a row"):
        read_pairs(pairs)
    pairs.write_text('{"user_id": "u1", "item_id": "i1"}\n{"user_id": "u1", "item_id": ""}\n')
    with pytest.raises(InputError, match=r"pairs\.jsonl, row 2, field 'item_id': empty id"):
        read_pairs(pairs)


def test_a_json_lines_file_that_does_not_parse_names_its_row_and_a_byte_order_mark_is_accepted(
        tmp_path: Path) -> None:
    """polars names a character offset of the whole file ("TapeError at character 6"), not a
    row; the error now names the first line that is not one JSON object, and why."""
    from fusionrec.ranker.serving.export import read_pairs

    path = tmp_path / "rules.jsonl"
    good = '{"item_id": "i1", "action": "exclude"}'
    path.write_text(f'{good}\n{{"item_id": "i2", "action": "pin"\n{good}\n')
    with pytest.raises(InputError) as caught:
        read_rules(path)
    assert str(caught.value) == (f"{path}, row 2: cannot read the file: not valid JSON: Expecting ',' delimiter "
                                 "at character 35 of the line")
    assert caught.value.exit_code == 2
    path.write_text(f"{good}\n{good}\n[1, 2]\n")
    with pytest.raises(InputError, match=r"rules\.jsonl, row 3: cannot read the file: a JSON list, not an object"):
        read_rules(path)
    # A UTF-8 byte-order mark, as some editors write, reads as a CSV's does.
    path.write_bytes(b"\xef\xbb\xbf" + f"{good}\n".encode())
    assert read_rules(path).rows() == [("i1", "exclude", 1.0, 1)]
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_bytes(b"\xef\xbb\xbf" + b'{"user_id": "u1", "item_id": "i1"}\n')
    assert read_pairs(pairs)["item_id"].to_list() == ["i1"]


def test_rules_with_a_non_finite_boost_or_a_fractional_pin_are_refused(case, tmp_path: Path) -> None:
    """Before, a boost of NaN silently dropped its item from every list (and labelled another
    row 'boosted'), inf jumped it first, and a pin at position 2.5 was cast to 2."""
    path = tmp_path / "rules.csv"
    for body, field, shown in (("item_id,action,value\ni1,boost,2\ni2,boost,nan\n", "value", "'nan'"),
                               ("item_id,action,value\ni1,boost,inf\n", "value", "'?inf'?"),
                               ("item_id,action,position\ni1,pin,3\ni2,pin,2.5\n", "position", "2.5"),
                               ("item_id,action,position\ni1,pin,99999999999999999999\n", "position", "'?(1e\\+20|9{20})")):
        path.write_text(body)
        row = body.count("\n") - 1
        with pytest.raises(InputError, match=f"rules.csv, row {row}, field '{field}': '{field}' must be a "
                                             f"(finite|whole) number.*not {shown}"):
            read_rules(path)
    path.write_text("item_id,action,value,position\ni1,boost,-0.5,\ni2,pin,,4.0\n")
    rules = read_rules(path)
    assert rules["value"].to_list() == [-0.5, 1.0] and rules["position"].to_list() == [1, 4]
    assert rules.schema["position"] == pl.Int64


def test_a_rules_or_pairs_file_naming_a_column_twice_is_refused(tmp_path: Path) -> None:
    """Before, polars read the second 'action' column as 'action_duplicated_0' and the rule it
    held was silently dropped (the data tables refuse such a header, the rules file did not)."""
    from fusionrec.ranker.serving.export import read_pairs

    path = tmp_path / "rules.csv"
    path.write_text("item_id,action, action\ni1,boost,exclude\n")
    with pytest.raises(InputError, match="rules.csv, field 'action': the header row names column 'action' twice "
                                         r"\(columns 2 and 3"):
        read_rules(path)
    pairs = tmp_path / "pairs.csv"
    pairs.write_text("user_id,item_id,user_id\nu1,i1,u2\n")
    with pytest.raises(InputError, match="field 'user_id': the header row names column 'user_id' twice"):
        read_pairs(pairs)
    path.write_text("\ufeffitem_id,action\ni1,exclude\n")  # Excel's byte order mark is fine
    assert read_rules(path).rows() == [("i1", "exclude", 1.0, 1)]

def test_options_name_what_they_need(case) -> None:
    cands, inputs = case
    with pytest.raises(ConfigError, match="rerank.calibration_field"):
        rerank(cands, K, RerankConfig(calibration_lambda=0.3, calibration_field="nope"), inputs)
    with pytest.raises(ConfigError, match="rerank.attribute_cap"):
        rerank(cands, K, RerankConfig(attribute_cap=2), inputs)
    with pytest.raises(ConfigError, match="mmr_lambda \\+ calibration_lambda"):
        load_config(None, ["rerank.mmr_lambda=0.6", "rerank.calibration_lambda=0.6"])


def test_same_input_same_bytes_whatever_the_row_or_option_order(case, tmp_path: Path) -> None:
    cands, inputs = case
    a = load_config(None, ["rerank.mmr_lambda=0.3", "rerank.calibration_lambda=0.2", "rerank.max_item_share=0.2",
                           "rerank.min_long_tail_share=0.3", "rerank.attribute_field=brand", "rerank.attribute_cap=3"])
    b = load_config(None, ["rerank.attribute_cap=3", "rerank.attribute_field=brand", "rerank.min_long_tail_share=0.3",
                           "rerank.max_item_share=0.2", "rerank.calibration_lambda=0.2", "rerank.mmr_lambda=0.3"])
    first = rerank(cands, K, a.rerank, inputs)
    again = rerank(cands.sample(fraction=1.0, shuffle=True, seed=3), K, b.rerank, inputs)
    assert parquet_bytes(first) == parquet_bytes(again)
    assert set(first["rerank"].drop_nulls().unique().to_list()) >= {"mmr", "exposure_cap"}


# -- served: Recommender.recommend and the recommend stage ----------------------------------

@pytest.fixture(scope="module")
def art(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("rerank")
    data = make_catalog(root / "data", n_users=60)
    out = root / "art"
    run_nightly(data, out, load_config(None, [*QUIET, "ranker.guard=false"]), show_progress=False)
    return out


@pytest.mark.parametrize("use_ranker", [True, False])
def test_with_rerank_off_the_served_lists_are_byte_identical(art: Path, use_ranker: bool) -> None:
    rec = Recommender(art, use_ranker=use_ranker)
    plain = rec.recommend(None, K)
    for off in (RerankConfig(), RerankConfig(mmr_modality="text", calibration_field="genre", candidates=50)):
        assert parquet_bytes(rec.recommend(None, K, rerank=off)) == parquet_bytes(plain)


@pytest.mark.parametrize("use_ranker", [True, False])
def test_served_lists_rerank_and_explain_the_moves(art: Path, use_ranker: bool) -> None:
    rec = Recommender(art, use_ranker=use_ranker)
    config = RerankConfig(mmr_lambda=0.4, calibration_lambda=0.2, calibration_field="genre", max_item_share=0.3)
    out = rec.recommend(None, K, rerank=config)
    assert out.columns == [*TOPK_SCHEMA, "rerank"]
    assert out.group_by("item_id").len()["len"].max() <= math.floor(0.3 * out["user_id"].n_unique())
    assert out["rerank"].drop_nulls().len() > 0
    explained = rec.recommend(None, K, rerank=config, explain=True)
    assert_frame_equal(explained.select(out.columns), out)
    assert "top_features" in explained.columns
    # The score is the shipped order's, unchanged: the same as the candidate row's.
    wide = rec.recommend(None, 100)
    joined = out.join(wide, on=["user_id", "item_id"], suffix="_shipped")
    assert joined.height == out.height and (joined["score"] == joined["score_shipped"]).all()


def test_the_recommend_stage_exports_the_rerank_column_and_ray_is_refused(art: Path, tmp_path: Path) -> None:
    config = load_config(None, ["rerank.mmr_lambda=0.3", "rerank.mmr_modality=text"])
    recs, path = run_recommend(art, tmp_path / "top.csv", config, pseudonymise_ids=False)
    back = read_topk(path)
    assert back.schema["rerank"] == pl.String
    assert_frame_equal(back, read_topk(write_topk(recs, tmp_path / "again.csv")))
    plain, plain_path = run_recommend(art, tmp_path / "plain.parquet", load_config(None, []), pseudonymise_ids=False)
    assert "rerank" not in plain.columns
    with pytest.raises(ConfigError, match="local engine"):
        check_engine(load_config(None, ["engine=ray", "rerank.max_item_share=0.5"]))
    with pytest.raises(ConfigError, match="rerank.mmr_modality"):
        Recommender(art).recommend(None, K, rerank=RerankConfig(mmr_lambda=0.3, mmr_modality="smell"))


def test_pins_skip_users_who_have_the_item(art: Path, tmp_path: Path) -> None:
    rec = Recommender(art)
    log = rec.catalog_.interactions
    item = log.group_by("item_id").len().sort("len", "item_id", descending=[True, False])["item_id"][0]
    rules = write_rules(tmp_path / "rules.csv", [{"item_id": item, "action": "pin", "position": 2}])
    out = rec.recommend(None, K, rerank=RerankConfig(rules_file=str(rules)))
    had = set(log.filter(pl.col("item_id") == item)["user_id"].cast(pl.String).to_list())
    pinned = out.filter(pl.col("item_id") == item)
    assert set(pinned["user_id"].to_list()) == set(out["user_id"].to_list()) - had
    assert (pinned["rank"] == 2).all() and (pinned["rerank"] == "pinned").all()
    assert np.isin(out.group_by("user_id").len()["len"].to_numpy(), [K]).all()


@pytest.mark.parametrize("use_ranker", [True, False])
def test_a_pin_outside_the_candidates_is_not_explained(art: Path, tmp_path: Path, use_ranker: bool) -> None:
    """The pinned row comes from no candidate list (no source, no score): --explain leaves its
    explanation null (before: the ranker's contributions of features it does not have)."""
    rec = Recommender(art, use_ranker=use_ranker)
    assert rec.order_ == ("ranker" if use_ranker else "retrieval")
    users = rec.known_users_[:3]
    deep = rec.sources_.candidates(users).filter(pl.col("retrieval_rank") > 30)["item_id"][0]
    rules = write_rules(tmp_path / "pin.csv", [{"item_id": deep, "action": "pin", "position": 1}])
    out = rec.recommend(users, 5, rerank=RerankConfig(rules_file=str(rules), candidates=5), explain=True)
    first = out.filter(pl.col("rank") == 1)
    assert first["item_id"].to_list() == [deep] * first.height and (first["rerank"] == "pinned").all()
    assert out.group_by("user_id").len()["len"].to_list() == [5] * out["user_id"].n_unique()
    why = [c for c in out.columns if c.startswith(("contrib_", "share_")) or c in ("top_features", "explain_bias")]
    assert "explain_bias" in why and any(c.startswith("share_") for c in why)
    assert first["score"].is_null().all()
    assert all(first[c].is_null().all() for c in why)
    # The other rows explain their score: the shares of each row add up to 1.
    rest = out.filter(pl.col("rank") > 1)
    shares = rest.select(pl.sum_horizontal(c for c in why if c.startswith("share_"))).to_series()
    assert rest["score"].is_not_null().all() and ((shares - 1).abs() < 1e-6).all()


def test_a_user_whose_every_candidate_is_excluded_keeps_their_pins(case, tmp_path: Path) -> None:
    cands, inputs = case
    user = cands["user_id"].unique().sort()[0]
    theirs = cands.filter(pl.col("user_id") == user)["item_id"].to_list()
    had = set(inputs.history.filter(pl.col("user_id") == user)["item_id"].to_list())
    pin = next(i for i in inputs.items["item_id"].sort().to_list() if i not in theirs and i not in had)
    rules = read_rules(write_rules(tmp_path / "rules.csv", [
        *({"item_id": i, "action": "exclude", "value": None, "position": None} for i in theirs),
        {"item_id": pin, "action": "pin", "value": None, "position": 2}]))
    inputs = type(inputs)(items=inputs.items, vectors=inputs.vectors, history=inputs.history,
                          n_items=inputs.n_items, rules=rules)
    out = rerank(cands, K, RerankConfig(), inputs)
    mine = out.filter(pl.col("user_id") == user)
    assert mine["item_id"].to_list() == [pin] and mine["rerank"].to_list() == ["pinned"]
    assert out["user_id"].n_unique() == cands["user_id"].n_unique()


def test_exclusions_that_empty_every_list_are_named(art: Path, tmp_path: Path) -> None:
    """An exclude rule for every item empties the night: the error points at the rules, not only at
    index.n_candidates and export.k."""
    items = Recommender(art).catalog_.items["item_id"].to_list()
    rules = write_rules(tmp_path / "all.csv", [{"item_id": i, "action": "exclude"} for i in items])
    config = load_config(None, [f"rerank.rules_file='{rules}'"])
    with pytest.raises(FusionrecError, match=r"an empty night\): check the \[rerank\] exclusions"):
        run_recommend(art, tmp_path / "top.csv", config, pseudonymise_ids=False)
    assert not (tmp_path / "top.csv").exists()


def test_recommend_in_batches_warns_about_a_rule_once_and_rereads_an_edited_file(
        art: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Before, each `recommend` call read the rules file again and repeated its warnings: a
    caller serving users batch by batch saw the same warning once per batch."""
    rec = Recommender(art)
    users = rec.known_users_[:4]
    rules = write_rules(tmp_path / "rules.csv", [{"item_id": "no-such-item", "action": "pin", "position": 1}])
    config = RerankConfig(rules_file=str(rules))
    with caplog.at_level("WARNING", logger="fusionrec.rerank"):
        for batch in (users[:2], users[2:]):
            rec.recommend(batch, K, rerank=config)
    assert sum("name an item the catalog does not have" in m for m in caplog.messages) == 1
    # The file edited between calls: its new rule acts, and its own warning is given.
    item = rec.catalog_.items["item_id"].cast(pl.String).sort()[0]
    os.utime(write_rules(rules, [{"item_id": item, "action": "pin", "position": 1},
                                 {"item_id": "other-missing", "action": "pin", "position": 2}]), ns=(1, 10**18))
    caplog.clear()
    with caplog.at_level("WARNING", logger="fusionrec.rerank"):
        out = rec.recommend(users[:2], K, rerank=config)
    assert sum("(row 2: 'other-missing')" in m for m in caplog.messages) == 1
    seen = set(rec.catalog_.interactions.filter(pl.col("item_id").cast(pl.String) == item)["user_id"].cast(pl.String))
    first = out.filter(pl.col("rank") == 1)
    assert all(u in seen or i == item for u, i in zip(first["user_id"], first["item_id"], strict=True))
