"""The post-ranking step (`rerank`): diversity, calibration, exposure and business rules.

It takes each user's ranked candidates (the shipped order: the ranker's or the blend's, more
than k per user, `rerank.candidates` of them) and returns k rows per user that keep the
ranker's `score` and gain `rerank`, the rule that moved the row (null: unmoved). The steps
run in a fixed order, each on the order the step before left:

1. **exclude**: the rules file's `exclude` items and the items whose `exclude_field` value
   is one of `exclude_values` vanish.
2. **boost**: a `boost` item's relevance gains the rule's `value` (relevance: the score
   min-max scaled to [0, 1] over the user's candidates); the list is re-sorted by it.
3. **mmr, calibration** (one greedy objective per list): at each position the candidate
   maximising ``(1 - lm - lc) rel(i) - lm max_j cos(i, j) - lc KL(p || q~(S + i))``, S the
   items listed so far (maximal marginal relevance, Carbonell and Goldstein 1998; calibration,
   Steck 2018: p the genre/tag mix of the user's history, q the list's, each item's labels
   weighing 1/|labels|, q~ = (1 - a) q + a p with a = 0.01). lm = lc = 0 keeps the order.
4. **attribute_cap**: walking the list, an item whose `attribute_field` value already has
   `attribute_cap` items is dropped (from the whole candidate list, so later fills keep the cap).
5. **long_tail**: a list with fewer than ceil(min_long_tail_share x k) long-tail items
   swaps its lowest head items for the best-placed tail items beyond the cut (the head: the
   ceil(head_share x catalog) items with the most distinct users, ties by item id, as
   `evaluation.metrics.popularity_bias` counts it; every other item is tail).
6. **exposure_cap**: lists are filled position by position, users in a snake order by id
   (1..n, then n..1, ...), each taking their best remaining candidate that has been listed
   fewer than floor(max_item_share x lists) times (and a tail item while the list still
   needs one to reach its minimum). The cap holds exactly; a user who runs out of
   candidates gets a shorter list rather than a broken cap.
7. **pinned**: the rules file's `pin` items are placed at their `position` (1-based) in every
   list, except for users who already have the item; they take the place of the last rows and
   are exempt from the caps; pins asking for one position follow the file's order from there.
   A pinned item outside the user's candidates has a null score.

A row's `rerank` names the last step that placed it above a row the order before that step
put ahead of it, or brought it into the first k (pins: "pinned"). Rows only pushed down keep
null. Everything is deterministic: ties go to the earlier row, users are taken sorted by id.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from fusionrec.evaluation.metrics import head_items, item_popularity
from fusionrec.pipeline.config import RerankConfig
from fusionrec.pipeline.errors import ConfigError, InputError
from fusionrec.ranker.serving.export import read_id_table

log = logging.getLogger("fusionrec.rerank")

RULES = ("boosted", "mmr", "calibration", "attribute_cap", "long_tail", "exposure_cap", "pinned")
ACTIONS = ("exclude", "pin", "boost")
CALIBRATION_ALPHA = 0.01
MAX_POSITION = 2**31 - 1  # a pin's position: past the list's length it takes the last place


@dataclass
class RerankInputs:
    """What the steps read beside the candidates.

    items: the items table (item_id and attribute columns); vectors: (item ids, matrix) for
    MMR; history: user_id, item_id of the log (calibration's p and the head); n_items: the
    catalog size (the head is a share of it); rules: the rules file as `read_rules` returns
    it; seen: user_id, item_id pairs never pinned to that user; rules_checked: the rules were
    already checked against the catalog and this k (`rerank` warns about rules that cannot act
    as written only where they were not: a caller serving users in batches warns once).
    """

    items: pl.DataFrame | None = None
    vectors: tuple[Any, np.ndarray] | None = None
    history: pl.DataFrame | None = None
    n_items: int | None = None
    rules: pl.DataFrame | None = None
    seen: pl.DataFrame | None = None
    rules_checked: bool = False


def read_rules(path: Path | str) -> pl.DataFrame:
    """The rules file (.csv, .parquet or .jsonl): item_id, action (exclude | pin | boost),
    optional value (a boost, default 1.0) and position (a pin, 1-based, default 1)."""
    frame = read_id_table(path, ("item_id", "action"))
    frame = frame.with_columns(pl.col("item_id").cast(pl.String).str.strip_chars(),
                               pl.col("action").cast(pl.String).str.strip_chars().str.to_lowercase())
    for column in ("item_id", "action"):
        bad = frame[column].is_null() | (frame[column] == "")
        if bad.any():
            raise InputError("empty value", file=str(path), row=int(bad.arg_true()[0]) + 1, field=column)
    bad = ~frame["action"].is_in(ACTIONS)
    if bad.any():
        row = int(bad.arg_true()[0])
        raise InputError(f"unknown action {frame['action'][row]!r} (use exclude, pin or boost)", file=str(path),
                         row=row + 1, field="action")
    for column, default, dtype in (("value", 1.0, pl.Float64), ("position", 1, pl.Int64)):
        if column not in frame.columns:
            frame = frame.with_columns(pl.lit(default, dtype).alias(column))
        number = frame[column].cast(pl.Float64, strict=False)
        bad = number.is_null() & frame[column].is_not_null()
        if bad.any():  # the first cell that is not a number, by its data row
            row = int(bad.arg_true()[0])
            raise InputError(f"'{column}' must be a number, not {frame[column][row]!r}", file=str(path), row=row + 1,
                             field=column)
        # inf and NaN would reorder silently (a NaN boost drops its item), and a pin at 2.5
        # would be cast to 2: both are refused, as the data tables refuse them.
        bad = number.is_not_null() & ~number.is_finite().fill_null(True)
        what = "a finite number"
        if column == "position":
            bad = bad | (number.is_not_null() & ((number != number.floor()) | (number.abs() > MAX_POSITION)))
            what = f"a whole number up to {MAX_POSITION}"
        if bad.any():
            row = int(bad.arg_true()[0])
            raise InputError(f"'{column}' must be {what}, not {frame[column][row]!r}", file=str(path), row=row + 1,
                             field=column)
        frame = frame.with_columns(number.cast(dtype).fill_null(default).alias(column))
    bad = (frame["action"] == "pin") & (frame["position"] < 1)
    if bad.any():
        raise InputError("a pin's position must be at least 1", file=str(path), row=int(bad.arg_true()[0]) + 1,
                         field="position")
    return frame.select("item_id", "action", "value", "position")


def label_rows(items: pl.DataFrame, field: str, ids: list[str]) -> list[list[str]]:
    """The |-separated labels of `field` for `ids` (empty for unknown items or null cells)."""
    table = dict(zip(items["item_id"].cast(pl.String).to_list(),
                     items[field].cast(pl.String).to_list(), strict=True))
    out = []
    for i in ids:
        text = table.get(i)
        out.append(sorted({t.strip() for t in text.split("|") if t.strip()}) if text else [])
    return out


def _check_field(items: pl.DataFrame | None, field: str, key: str) -> pl.DataFrame:
    if items is None or field not in items.columns:
        have = ", ".join(items.columns) if items is not None else "no items table"
        raise ConfigError(f"config key 'rerank.{key}' names items column '{field}', which the items table "
                          f"lacks ({have})")
    return items


def rerank(candidates: pl.DataFrame, k: int, config: RerankConfig, inputs: RerankInputs | None = None
           ) -> pl.DataFrame:
    """At most `k` rows per user from ranked `candidates` (user_id, item_id, score; `rank` or the
    topk order), the steps of `config` applied; columns of `candidates` kept, plus `rerank`."""
    inputs = inputs or RerankInputs()
    if k < 1:
        raise InputError(f"k must be at least 1, not {k}", field="k")
    ordered = _ordered(candidates)
    # Users are taken before exclusion: one whose every candidate is excluded keeps a list
    # (their pins, or an empty list), never vanishes from the export.
    users = ordered["user_id"].unique().sort().to_list()
    cands = _exclude(ordered, config, inputs)
    pins = _pins(users, config, inputs)
    if not inputs.rules_checked:
        _warn_unplaceable_rules(inputs, k)
    item_ids = sorted(set(cands["item_id"].to_list()) | {i for pinned in pins.values() for i, _ in pinned})
    code = {i: j for j, i in enumerate(item_ids)}
    grouped = cands.group_by("user_id", maintain_order=True).agg(
        pl.col("item_id").replace_strict(code, return_dtype=pl.Int64), pl.col("score").cast(pl.Float64))
    state = _State(k, users, item_ids)
    for user, idx, score in grouped.iter_rows():
        order = np.asarray(idx, np.int64)
        s = np.array([np.nan if v is None else v for v in score], np.float64)
        finite = np.isfinite(s)
        lo, hi = (s[finite].min(), s[finite].max()) if finite.any() else (0.0, 0.0)
        r = np.where(finite, (s - lo) / (hi - lo), 0.0) if hi > lo else np.where(finite, 1.0, 0.0)
        pinned = {code[i] for i, _ in pins.get(user, [])}
        keep = np.array([i not in pinned for i in order], bool)
        state.order[user], state.rel[user] = order[keep], r[keep]
        state.target[user] = max(0, k - len(pins.get(user, [])))
    for user in set(users) - set(state.order):
        state.order[user], state.rel[user] = np.zeros(0, np.int64), np.zeros(0, np.float64)
        state.target[user] = 0
    _steps(state, config, inputs)
    return _frame(state, cands, pins, code, config)


# -- the steps ------------------------------------------------------------------------------

@dataclass
class _State:
    """Each user's candidate order (item codes), relevance along it, list length and labels."""

    k: int
    users: list[str]
    item_ids: list[str]

    def __post_init__(self) -> None:
        self.order: dict[str, np.ndarray] = {}
        self.rel: dict[str, np.ndarray] = {}
        self.target: dict[str, int] = {}
        self.labels: dict[str, dict[int, str]] = {u: {} for u in self.users}

    def relabel(self, user: str, before: np.ndarray, after: np.ndarray, rule: str,
                reasons: dict[int, str] | None = None, n: int | None = None) -> None:
        """Label the rows of `after`'s first n (default: the list length) that a step placed
        above a row `before` put ahead of them, or brought into the first n."""
        n = self.target[user] if n is None else n
        top = after[:n]
        if len(top) == 0:
            return
        pos_in = {int(i): p for p, i in enumerate(before)}
        in_pos = np.array([pos_in[int(i)] for i in top], np.int64)
        # The smallest input position among the rows listed after each row.
        later = np.minimum.accumulate(in_pos[::-1])[::-1]
        later = np.concatenate([later[1:], [np.iinfo(np.int64).max]])
        for j in np.flatnonzero((in_pos >= n) | (later < in_pos)):
            item = int(top[j])
            self.labels[user][item] = (reasons or {}).get(item, rule)


def _ordered(candidates: pl.DataFrame) -> pl.DataFrame:
    """Candidates with string ids, sorted by user then the shipped order (`rank`, else topk's order)."""
    for column in ("user_id", "item_id", "score"):
        if column not in candidates.columns:
            raise InputError(f"cannot rerank: the candidates have no '{column}' column", field=column)
    frame = candidates.with_columns(pl.col("user_id").cast(pl.String), pl.col("item_id").cast(pl.String))
    if "rank" in frame.columns:
        return frame.sort(["user_id", "rank"])
    keys = ["score", "retrieval_score"] if "retrieval_score" in frame.columns else ["score"]
    return frame.sort(["user_id", *keys, "item_id"], descending=[False, *[True] * len(keys), False], nulls_last=True)


def _exclude(cands: pl.DataFrame, config: RerankConfig, inputs: RerankInputs) -> pl.DataFrame:
    if inputs.rules is not None:
        gone = inputs.rules.filter(pl.col("action") == "exclude")["item_id"]
        if gone.len():
            cands = cands.filter(~pl.col("item_id").is_in(gone.implode()))
    if config.exclude_values:
        if not config.exclude_field:
            raise ConfigError("config key 'rerank.exclude_values' needs rerank.exclude_field (the items column "
                              "they match)")
        items = _check_field(inputs.items, config.exclude_field, "exclude_field")
        gone = excluded_by_value(items, config.exclude_field, config.exclude_values)
        cands = cands.filter(~pl.col("item_id").is_in(gone.implode()))
    return cands


def excluded_by_value(items: pl.DataFrame, field: str, values: list[str]) -> pl.Series:
    """The ids of the items whose `field` is one of `values` (text). A CSV column is text and
    matches as written; a typed (Parquet) column matches by value: a true/false column
    whatever the case ("False" as "false"), a number column by number ("0" as 0.0)."""
    column = items[field]
    wanted = [str(v) for v in values]
    if column.dtype == pl.Boolean:
        words = {v.strip().lower() for v in wanted}
        match = column.cast(pl.String).is_in(list(words))
    elif column.dtype.is_numeric():
        numbers = pl.Series(wanted, dtype=pl.String).str.strip_chars().cast(pl.Float64, strict=False).drop_nulls()
        match = column.cast(pl.Float64).is_in(numbers.implode()) | column.cast(pl.String).is_in(wanted)
    else:
        match = column.cast(pl.String).is_in(wanted)
    return items.filter(match.fill_null(False))["item_id"].cast(pl.String)


def _warn_unplaceable_rules(inputs: RerankInputs, k: int) -> None:
    """Say which rules cannot act as written: an item the catalog lacks (a typo, or deleted) is
    ignored, and a pin past the list's length lands at its last place."""
    if inputs.rules is None:
        return
    rules = inputs.rules.with_row_index("row", offset=1)
    if inputs.items is not None:
        unknown = rules.filter(~pl.col("item_id").is_in(inputs.items["item_id"].cast(pl.String).implode()))
        if unknown.height:
            log.warning("rerank rules: %d row(s) name an item the catalog does not have (row %d: %r); they are "
                        "ignored", unknown.height, unknown["row"][0], unknown["item_id"][0])
    pins = rules.filter(pl.col("action") == "pin")
    if inputs.items is not None:
        pins = pins.filter(pl.col("item_id").is_in(inputs.items["item_id"].cast(pl.String).implode()))
    pins = pins.sort(["position", "row"]).unique("item_id", keep="first", maintain_order=True)
    if pins.height > k:  # the pins past the k-th place leave every list (a user who has one of them aside)
        log.warning("rerank rules: %d items are pinned, more than the list's length %d: the ones placed after the "
                    "first %d (by position, then file order; row %d: %r on) are left out of the lists",
                    pins.height, k, k, pins["row"][k], pins["item_id"][k])
    late = rules.filter((pl.col("action") == "pin") & (pl.col("position") > k))
    if late.height:
        log.warning("rerank rules: %d pin(s) ask for a position past the list's length %d (row %d: %r at %d); "
                    "they take the last places", late.height, k, late["row"][0], late["item_id"][0],
                    late["position"][0])


def _pins(users: list[str], config: RerankConfig, inputs: RerankInputs) -> dict[str, list[tuple[str, int]]]:
    """Per user: (item_id, 1-based position) of the pinned items, by position then file order."""
    if inputs.rules is None:
        return {}
    rules = inputs.rules.with_row_index("__row")
    pinned = rules.filter(pl.col("action") == "pin").sort(["position", "__row"])
    excluded = set(rules.filter(pl.col("action") == "exclude")["item_id"].to_list())
    if config.exclude_values and inputs.items is not None and config.exclude_field in inputs.items.columns:
        excluded |= set(excluded_by_value(inputs.items, config.exclude_field, config.exclude_values).to_list())
    if inputs.items is not None:
        known = set(inputs.items["item_id"].cast(pl.String).to_list())
        pinned = pinned.filter(pl.col("item_id").is_in(list(known)))
    pairs = [(i, int(p)) for i, p in zip(pinned["item_id"].to_list(), pinned["position"].to_list(), strict=True)
             if i not in excluded]
    pairs = list(dict.fromkeys(pairs))  # a pin written twice counts once
    seen_items = {i for i, _ in pairs}
    seen: dict[str, set[str]] = {}
    if inputs.seen is not None and pairs:
        had = inputs.seen.select(pl.col("user_id").cast(pl.String), pl.col("item_id").cast(pl.String)) \
            .filter(pl.col("item_id").is_in(list(seen_items)) & pl.col("user_id").is_in(users)).unique()
        for u, i in had.iter_rows():
            seen.setdefault(u, set()).add(i)
    out: dict[str, list[tuple[str, int]]] = {}
    for u in users:
        mine: list[tuple[str, int]] = []
        for i, p in pairs:
            if i not in seen.get(u, set()) and all(i != j for j, _ in mine):
                mine.append((i, p))
        if mine:
            out[u] = mine
    return out


def _steps(state: _State, config: RerankConfig, inputs: RerankInputs) -> None:
    code = {i: j for j, i in enumerate(state.item_ids)}
    boosts: dict[int, float] = {}
    if inputs.rules is not None:
        for i, v in inputs.rules.filter(pl.col("action") == "boost").select("item_id", "value").iter_rows():
            if i in code:
                boosts[code[i]] = boosts.get(code[i], 0.0) + float(v)
    if boosts:
        for u in state.users:
            order, rel = state.order[u], state.rel[u]
            boosted = rel + np.array([boosts.get(int(i), 0.0) for i in order])
            new = np.argsort(-boosted, kind="stable")
            state.order[u], state.rel[u] = order[new], boosted[new]
            state.relabel(u, order, state.order[u], "boosted")
    if config.mmr_lambda or config.calibration_lambda:
        _greedy(state, config, inputs)
    if config.attribute_cap:
        _attribute_cap(state, config, inputs)
    tail = np.ones(len(state.item_ids), bool)
    need: dict[str, int] = {}
    if config.min_long_tail_share:
        if inputs.history is None or inputs.n_items is None:
            raise ConfigError("config key 'rerank.min_long_tail_share' needs the interaction log and the catalog size")
        head = set(head_items(item_popularity(inputs.history), inputs.n_items, config.head_share).to_list())
        tail = np.array([i not in head for i in state.item_ids], bool)
        want = math.ceil(config.min_long_tail_share * state.k - 1e-9)
        for u in state.users:
            need[u] = max(0, min(want, state.target[u]))
        _long_tail(state, tail, need)
    if config.max_item_share < 1:
        _exposure_cap(state, config, tail, need)


def _greedy(state: _State, config: RerankConfig, inputs: RerankInputs) -> None:
    """MMR and calibration as one greedy objective, over each list's first 2k positions (the
    rest follow in the order they had: later steps rarely reach that far)."""
    lm, lc = config.mmr_lambda, config.calibration_lambda
    vectors = _item_vectors(state.item_ids, inputs.vectors) if lm else None
    item_labels: list[list[int]] = []
    history: dict[str, np.ndarray] = {}
    if lc:
        items = _check_field(inputs.items, config.calibration_field, "calibration_field")
        if inputs.history is None:
            raise ConfigError("config key 'rerank.calibration_lambda' needs the interaction log")
        hist = inputs.history.select(pl.col("user_id").cast(pl.String), pl.col("item_id").cast(pl.String)) \
            .filter(pl.col("user_id").is_in(state.users))
        known = sorted(set(hist["item_id"].to_list()) | set(state.item_ids))
        rows = label_rows(items, config.calibration_field, known)
        vocab = {t: j for j, t in enumerate(sorted({t for row in rows for t in row}))}
        label_of = {i: [vocab[t] for t in row] for i, row in zip(known, rows, strict=True)}
        item_labels = [label_of[i] for i in state.item_ids]
        mixes = hist.group_by("user_id").agg("item_id")
        for u, had in mixes.iter_rows():
            p = _history_mix(had, label_of, len(vocab))
            if p is not None:
                history[u] = p
    for u in state.users:
        order, rel = state.order[u], state.rel[u]
        depth = min(len(order), 2 * state.target[u])
        if depth < 1 or len(order) < 2:
            continue
        state.order[u], state.rel[u], reasons = _greedy_list(order, rel, depth, lm, lc, vectors,
                                                             history.get(u), item_labels)
        state.relabel(u, order, state.order[u], "mmr", reasons)


def _greedy_list(order: np.ndarray, rel: np.ndarray, depth: int, lm: float, lc: float, vectors: np.ndarray | None,
                 p: np.ndarray | None, item_labels: list[list[int]]) -> tuple[np.ndarray, np.ndarray, dict[int, str]]:
    n = len(order)
    sim = vectors[order] @ vectors[order].T if vectors is not None else None
    calibrate = p is not None and lc > 0
    if calibrate:
        assert p is not None
        cols = np.flatnonzero(p > 0)
        p_u = p[cols]
        entropy = float((p_u * np.log(p_u)).sum())
        col_of = {int(c): j for j, c in enumerate(cols)}
        # The candidates' label weights on the user's labels, as (row, column, weight) entries.
        e_row, e_col, e_w = [], [], []
        has = np.zeros(n, bool)
        for r, i in enumerate(order):
            lab = item_labels[int(i)]
            has[r] = bool(lab)
            for t in lab:
                if t in col_of:
                    e_row.append(r)
                    e_col.append(col_of[t])
                    e_w.append(1.0 / len(lab))
        rows_e, cols_e, w_e = np.array(e_row, np.int64), np.array(e_col, np.int64), np.array(e_w)
        acc, n_lab = np.zeros(len(cols)), 0
    remaining = np.ones(n, bool)
    maxsim = np.zeros(n)
    kl = np.zeros(n)
    picked: list[int] = []
    reasons: dict[int, str] = {}
    a = CALIBRATION_ALPHA
    for _ in range(depth):
        obj = (1.0 - lm - lc) * rel
        if sim is not None and picked:
            obj = obj - lm * maxsim
        if calibrate:
            # KL(p || q~) of the list plus each candidate, from the terms its labels change.
            m = n_lab + 1
            base = p_u * np.log((1 - a) * acc / m + a * p_u)
            changed = p_u[cols_e] * np.log((1 - a) * (acc[cols_e] + w_e) / m + a * p_u[cols_e]) - base[cols_e]
            with_labels = entropy - (base.sum() + np.bincount(rows_e, changed, minlength=n))
            without = entropy - (p_u * np.log((1 - a) * acc / max(n_lab, 1) + a * p_u)).sum()
            kl = np.where(has, with_labels, without)
            obj = obj - lc * kl
        pick = int(np.argmax(np.where(remaining, obj, -np.inf)))
        first = int(np.argmax(remaining))
        if pick != first:
            d_mmr = lm * (maxsim[first] - maxsim[pick])
            d_cal = lc * (kl[first] - kl[pick])
            reasons[int(order[pick])] = "mmr" if lm and (not lc or d_mmr >= d_cal) else "calibration"
        picked.append(pick)
        remaining[pick] = False
        if sim is not None:
            maxsim = np.maximum(maxsim, sim[pick])
        if calibrate:
            np.add.at(acc, cols_e[rows_e == pick], w_e[rows_e == pick])
            n_lab += int(has[pick])
    new = np.concatenate([np.array(picked, np.int64), np.flatnonzero(remaining)])
    return order[new], rel[new], reasons


def _history_mix(items: list[str], label_of: dict[str, list[int]], size: int) -> np.ndarray | None:
    """p(g | u): the mean over the user's labelled history items of 1/|labels| per label."""
    p = np.zeros(size)
    n = 0
    for i in items:
        lab = label_of.get(i, [])
        if lab:
            n += 1
            for t in lab:
                p[t] += 1.0 / len(lab)
    return p / n if n else None


def _item_vectors(item_ids: list[str], vectors: tuple[Any, np.ndarray] | None) -> np.ndarray:
    """Unit vectors aligned to `item_ids` (zero rows for items without one)."""
    if vectors is None:
        raise ConfigError("config key 'rerank.mmr_lambda' needs item vectors (the content embeddings)")
    ids, matrix = vectors
    index = {str(i): j for j, i in enumerate(ids)}
    matrix = np.asarray(matrix, np.float64)
    out = np.zeros((len(item_ids), matrix.shape[1]))
    rows = np.array([index.get(i, -1) for i in item_ids], np.int64)
    out[rows >= 0] = matrix[rows[rows >= 0]]
    norms = np.linalg.norm(out, axis=1, keepdims=True)
    return out / np.where(norms > 0, norms, 1.0)


def _attribute_cap(state: _State, config: RerankConfig, inputs: RerankInputs) -> None:
    if not config.attribute_field:
        raise ConfigError("config key 'rerank.attribute_cap' needs rerank.attribute_field (the items column capped)")
    items = _check_field(inputs.items, config.attribute_field, "attribute_field")
    table = dict(zip(items["item_id"].cast(pl.String).to_list(),
                     items[config.attribute_field].cast(pl.String).to_list(), strict=True))
    value = [table.get(i) for i in state.item_ids]
    for u in state.users:
        order = state.order[u]
        counts: dict[str, int] = {}
        keep = np.ones(len(order), bool)
        for r, i in enumerate(order):
            v = value[int(i)]
            if v is None or v == "":
                continue
            if counts.get(v, 0) >= config.attribute_cap:
                keep[r] = False
            else:
                counts[v] = counts.get(v, 0) + 1
        state.order[u], state.rel[u] = order[keep], state.rel[u][keep]
        state.relabel(u, order, state.order[u], "attribute_cap")


def _long_tail(state: _State, tail: np.ndarray, need: dict[str, int]) -> None:
    for u in state.users:
        order, n = state.order[u], state.target[u]
        top, rest = order[:n], order[n:]
        missing = need[u] - int(tail[top].sum())
        if missing <= 0:
            continue
        incoming = rest[tail[rest]][:missing]
        heads = np.flatnonzero(~tail[top])[::-1][:len(incoming)]
        outgoing = top[heads]
        new_top = np.concatenate([np.delete(top, heads), incoming])
        leftover = np.array([i for i in rest if i not in set(incoming.tolist())], np.int64)
        new = np.concatenate([new_top, outgoing, leftover]).astype(np.int64)
        rel_of = dict(zip(order.tolist(), state.rel[u].tolist(), strict=True))
        state.order[u], state.rel[u] = new, np.array([rel_of[int(i)] for i in new])
        state.relabel(u, order, new, "long_tail")


def _exposure_cap(state: _State, config: RerankConfig, tail: np.ndarray, need: dict[str, int]) -> None:
    lists = state.users
    allowed = math.floor(config.max_item_share * len(lists) + 1e-9)
    cap = max(1, allowed)
    if not allowed:
        log.warning("rerank.max_item_share %g of %d lists is less than one list: each item may still appear in "
                    "one list", config.max_item_share, len(lists))
    count = np.zeros(len(state.item_ids), np.int64)
    chosen: dict[str, list[int]] = {u: [] for u in lists}
    used = {u: np.zeros(len(state.order[u]), bool) for u in lists}
    rounds = max((state.target[u] for u in lists), default=0)
    for r in range(rounds):
        for u in (lists if r % 2 == 0 else lists[::-1]):
            if len(chosen[u]) >= state.target[u]:
                continue
            order = state.order[u]
            free = ~used[u] & (count[order] < cap)
            tails = sum(bool(tail[i]) for i in chosen[u])
            if need.get(u, 0) - tails >= state.target[u] - len(chosen[u]) and (free & tail[order]).any():
                free &= tail[order]
            if not free.any():
                continue
            j = int(np.argmax(free))
            used[u][j] = True
            chosen[u].append(int(order[j]))
            count[order[j]] += 1
    for u in lists:
        order = state.order[u]
        new = np.concatenate([np.array(chosen[u], np.int64), order[~used[u]]]).astype(np.int64)
        rel_of = dict(zip(order.tolist(), state.rel[u].tolist(), strict=True))
        state.order[u], state.rel[u] = new, np.array([rel_of[int(i)] for i in new])
        state.relabel(u, order, new[:len(chosen[u])], "exposure_cap")
        state.target[u] = len(chosen[u])  # out of candidates: a shorter list rather than a broken cap


def _frame(state: _State, cands: pl.DataFrame, pins: dict[str, list[tuple[str, int]]], code: dict[str, int],
           config: RerankConfig) -> pl.DataFrame:
    users, items, labels = [], [], []
    for u in state.users:
        top = [state.item_ids[int(i)] for i in state.order[u][:state.target[u]]]
        lab: list[str | None] = [state.labels[u].get(int(i)) for i in state.order[u][:state.target[u]]]
        at = -1
        for item, position in pins.get(u, []):  # by position, then file order
            # Two pins asking for one position: the first in the file takes it, the next one
            # the place after (inserting both at it would hand the first's place to the second).
            at = min(max(position - 1, at + 1), len(top))
            top.insert(at, item)
            lab.insert(at, "pinned")
        top, lab = top[:state.k], lab[:state.k]
        users += [u] * len(top)
        items += top
        labels += lab
    out = pl.DataFrame({"user_id": users, "item_id": items, "rerank": labels},
                       schema={"user_id": pl.String, "item_id": pl.String, "rerank": pl.String})
    out = out.with_columns((pl.int_range(pl.len()).over("user_id") + 1).cast(pl.Int32).alias("rank"))
    extra = [c for c in cands.columns if c not in ("user_id", "item_id", "rank", "rerank")]
    joined = out.join(cands.select("user_id", "item_id", *extra), on=["user_id", "item_id"], how="left",
                      maintain_order="left")
    front = [c for c in ("user_id", "rank", "item_id") if c in joined.columns]
    return joined.select(*front, *[c for c in cands.columns if c not in front and c != "rerank"], "rerank")
