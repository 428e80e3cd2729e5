"""Candidate-source choices judged on validation only: settings and blend weights chosen on one
half of the validation users, scored on the other half.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/sources_study.py --dataset movielens|lastfm [--repeats 3]

Needs a `bench/peers.py` run of the same data set first: it reads that run's train part
(`bench/results/work_<dataset>/train`) and item embeddings (`.../art/embeddings`), and never
the test part.

1. **Validation split**: the one `fusionrec run` uses on that train part (`ranker.labels = auto`:
   MovieLens each user's latest 20%, Last.fm label 1 after label 0), the fused retriever
   fitted on its feature part with its weights searched on its labels, as in the index stage.
2. **Scores**: every source at every setting of its grid (ALS: the wider grid, six seeds each)
   for every validation user, kept in memory.
3. **Variants** (`VARIANTS`): which ALS grid, how many seeds, which blend steps; and two
   leads that are not sources of the product (a popularity penalty on the blend, collective
   EASE with the content cosines in its Gram). For each of
   `--repeats` random halvings of the users, and each half in turn, every source's setting
   and the blend weights are chosen on one half and NDCG@10 is scored on the other; each
   user's score is the mean over the times they were scored.
4. **Report**: each variant's mean NDCG@10 and its paired difference from `previous` with a
   95% bootstrap interval over users (1,000 resamples).

Results: bench/results/sources_study_<dataset>.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp
from scipy.special import ndtri

sys.path.insert(0, str(Path(__file__).resolve().parent))
from peers import RESULTS, SETS  # noqa: E402

from fusionrec.pipeline.config import Config  # noqa: E402
from fusionrec.pipeline.retrieval import candidates as C  # noqa: E402
from fusionrec.pipeline.retrieval import stage  # noqa: E402
from fusionrec.pipeline.retrieval.source_base import with_tags as tagged_matrix  # noqa: E402
from fusionrec.pipeline.retrieval.sources import SEARCH_GRID, make_source, tag_matrix  # noqa: E402

# What the sources used before this study: five ALS settings, three seeds, seven blend steps.
PREVIOUS_ALS = [{"factors": f, "regularization": r, "alpha": a} for f, r, a in
                ((32, 0.05, 1.0), (32, 5.0, 1.0), (32, 5.0, 10.0), (64, 20.0, 10.0), (32, 50.0, 20.0))]
PREVIOUS_STEPS = (0.0, 0.125, 0.25, 0.5, 1.0, 2.0, 4.0)
MAX_SEEDS = 6
MORE_SEEDS = 12  # the shipped ALS grid's settings are fitted on this many seeds, for the seed leads

ITEM_ITEM = ("ease", "recent_ease", "itemknn", "recent_itemknn", "rp3beta")  # the co-occurrence sources besides ALS
VARIANTS: dict[str, dict[str, Any]] = {
    "previous": {"als_grid": "previous", "seeds": 3, "steps": PREVIOUS_STEPS, "rounds": 3},
    "six seeds": {"als_grid": "previous", "seeds": 6, "steps": PREVIOUS_STEPS, "rounds": 3},
    "wide grid, six seeds": {"als_grid": "wide", "seeds": 6, "steps": PREVIOUS_STEPS, "rounds": 3},
    "wide grid, six seeds, fine steps (shipped before the tag settings)": {
        "als_grid": "wide", "seeds": 6, "steps": C.BLEND_STEPS, "rounds": 4},
    # The ALS grid's four settings that fit the items' tags as extra users (`sources.ALS`).
    "wide grid and the tag settings, the best of all 14": {"als_grid": "tags_any", "seeds": 6,
                                                           "steps": C.BLEND_STEPS, "rounds": 4},
    # The best tag setting replaces the best without tags only if it wins on the choosing half
    # with a paired interval above 0 (`candidates.tags_win`): ALS only (the first step) ...
    "the tag settings in ALS only, under the rule": {"als_grid": "tags", "seeds": 6, "steps": C.BLEND_STEPS,
                                                     "rounds": 4},
    # ... and shipped: the item-item sources too (EASE, item-kNN, their recent forms, RP3beta).
    "shipped: the tag settings in every source that learns from co-occurrence": {
        "als_grid": "tags", "seeds": 6, "steps": C.BLEND_STEPS, "rounds": 4,
        "tag_sources": ITEM_ITEM},
    "shipped + ALS at 256 factors with tags (past the grid's edge)": {
        "als_grid": "tags_wider", "seeds": 6, "steps": C.BLEND_STEPS, "rounds": 4,
        "tag_sources": ITEM_ITEM},
    # The leads below were judged against the wide grid without the tag settings (the shipped
    # one then); their "shipped" means that grid.
    "shipped + the second-best ALS setting as one more source": {"als_grid": "wide", "seeds": 6,
                                                                 "steps": C.BLEND_STEPS, "rounds": 4, "second": True},
    # The index stage's cost: 60 ALS fits to search ten settings with six seeds each. Choosing
    # the setting on one seed's fit, then averaging six seeds of that setting, is 16 fits.
    "shipped, ALS setting chosen on one seed": {"als_grid": "wide", "seeds": 6, "choose_seeds": 1,
                                                "steps": C.BLEND_STEPS, "rounds": 4},
    "shipped, ALS setting chosen on three seeds": {"als_grid": "wide", "seeds": 6, "choose_seeds": 3,
                                                   "steps": C.BLEND_STEPS, "rounds": 4},
    # 10 + 3 x 5 = 25 fits: the best three settings on one seed, then those three on six seeds.
    "shipped, ALS shortlist of three on one seed": {"als_grid": "wide", "seeds": 6, "choose_seeds": 1,
                                                    "shortlist": 3, "steps": C.BLEND_STEPS, "rounds": 4},
    # The screen the index stage runs since 6a72027 (`candidates.finalists`): every ALS setting
    # on two seeds, each group's best 30% (at least two; with and without tags) on six, then
    # the tags rule between the two groups' best: 14 x 2 + 5 x 4 = 48 fits instead of 84.
    "shipped, ALS screened on two seeds, each group's best 30% on six": {
        "als_grid": "tags", "seeds": 6, "screen_seeds": C.SCREEN_SEEDS, "steps": C.BLEND_STEPS, "rounds": 4,
        "tag_sources": ITEM_ITEM},
    # Leads judged before building them (not sources of the product): a popularity penalty on
    # the blend (Last.fm's validation labels are less popular than random hold-outs), and
    # collective EASE, whose Gram adds the content cosines (`CEASE_GRID`), as one more source.
    "shipped + a popularity penalty": {"als_grid": "wide", "seeds": 6, "steps": C.BLEND_STEPS, "rounds": 4,
                                       "penalty": True},
    "shipped + collective EASE (content in the Gram)": {"als_grid": "wide", "seeds": 6, "steps": C.BLEND_STEPS,
                                                        "rounds": 4, "cease": True},
    # A lead: user-based neighbours (cosine of users' positive rows, each user's k nearest),
    # a classic strong model on music logs, which no source covers (`USERKNN_GRID`).
    "shipped + user-kNN as one more source": {"als_grid": "wide", "seeds": 6, "steps": C.BLEND_STEPS,
                                              "rounds": 4, "userknn": True},
    # A lead: EDLAE (Steck 2020), EASE whose penalty on each item grows with its popularity
    # (lambda + p / (1 - p) x the item's Gram diagonal, the closed form of dropout at rate p),
    # its settings (`EDLAE_GRID`) added to the grids of `ease` and `recent_ease`.
    "shipped + EDLAE settings in the EASE grids": {"als_grid": "tags", "seeds": 6, "steps": C.BLEND_STEPS,
                                                   "rounds": 4, "tag_sources": ITEM_ITEM, "edlae": True},
    # A lead: ALS on BM25-weighted positives (implicit's Last.fm recipe, K1 100, B 0.8), its
    # settings (`BM25_ALS`) added to the ALS grid, under the same rule for the tag settings.
    "shipped + BM25-weighted ALS settings": {"als_grid": "bm25", "seeds": 6, "steps": C.BLEND_STEPS,
                                             "rounds": 4, "tag_sources": ITEM_ITEM},
    # A lead: Mult-VAE (Liang et al. 2018), a non-linear autoencoder over each user's positives,
    # as one more source (`sources.SEARCH_GRID["vae"]`; three seeds averaged, as ALS averages its seeds).
    "shipped + Mult-VAE as one more source": {"als_grid": "tags", "seeds": 6, "steps": C.BLEND_STEPS,
                                              "rounds": 4, "tag_sources": (*ITEM_ITEM, "vae"), "vae": True},
    # ... and kept only where the blend with it beats the blend without it on the choosing half,
    # with a paired interval above 0 (the rule `candidates.tags_win` applies to the tag settings).
    "shipped + Mult-VAE under the clear-gain rule": {"als_grid": "tags", "seeds": 6, "steps": C.BLEND_STEPS,
                                                     "rounds": 4, "tag_sources": (*ITEM_ITEM, "vae"), "vae": True,
                                                     "vae_rule": True},
    # ... or kept only where, within the choosing half, weights searched on one quarter with and
    # without it and scored on the other (both ways) favour it: by the mean, or by an interval above 0.
    "shipped + Mult-VAE if it wins out of fold (mean)": {"als_grid": "tags", "seeds": 6, "steps": C.BLEND_STEPS,
                                                         "rounds": 4, "tag_sources": (*ITEM_ITEM, "vae"), "vae": True,
                                                         "vae_cross": "mean"},
    # A lead: more seeds averaged. The shipped ALS averages six seeded fits per setting; an
    # ensemble of six ALS fits gained 0.003 on Last.fm's test part over one fit (benchmarks).
    # Twelve seeds for the chosen setting only (six more fits in the refit), or for every setting.
    "shipped, the chosen ALS setting averaged over twelve seeds": {
        "als_grid": "tags", "seeds": MORE_SEEDS, "choose_seeds": MAX_SEEDS, "steps": C.BLEND_STEPS, "rounds": 4,
        "tag_sources": ITEM_ITEM},
    "shipped, every ALS setting on twelve seeds": {
        "als_grid": "tags", "seeds": MORE_SEEDS, "steps": C.BLEND_STEPS, "rounds": 4, "tag_sources": ITEM_ITEM},
    # A lead: the blend weights are chosen by coordinate ascent on one set of validation users,
    # so they carry that set's noise. Bagged: searched on five bootstrap resamples of the users
    # (each weight vector scaled to sum 1) and averaged, which smooths the choice.
    "shipped, blend weights bagged over five bootstrap searches": {
        "als_grid": "tags", "seeds": 6, "steps": C.BLEND_STEPS, "rounds": 4, "tag_sources": ITEM_ITEM, "bagged": 5},
    # A lead: GF-CF (Shen et al. 2021, `gfcf`), a closed-form graph filter: the degree-normalised
    # item-item matrix plus a low-pass filter of its top singular vectors (`GFCF_GRID`, the tag
    # settings under the nightly rule), as one more source.
    "shipped + GF-CF as one more source": {"als_grid": "tags", "seeds": 6, "steps": C.BLEND_STEPS, "rounds": 4,
                                           "tag_sources": (*ITEM_ITEM, "gfcf"), "gfcf": True},
    # A lead: the blend adds each source's per-user z-scores, which follow the shape of its raw
    # scores; a transform of the user's ranks instead gives every source the same shape.
    "shipped, the blend over -log(rank) of each source": {
        "als_grid": "tags", "seeds": 6, "steps": C.BLEND_STEPS, "rounds": 4, "tag_sources": ITEM_ITEM,
        "transform": "log_rank"},
    "shipped, the blend over normal quantiles of each source's ranks": {
        "als_grid": "tags", "seeds": 6, "steps": C.BLEND_STEPS, "rounds": 4, "tag_sources": ITEM_ITEM,
        "transform": "normal_rank"},
    "shipped + Mult-VAE if it wins out of fold (interval)": {"als_grid": "tags", "seeds": 6, "steps": C.BLEND_STEPS,
                                                             "rounds": 4, "tag_sources": (*ITEM_ITEM, "vae"),
                                                             "vae": True, "vae_cross": "interval"},
}
PENALTIES = (0.0, -0.125, -0.25, -0.375, -0.5, -0.75, -1.0, -1.5)  # weight on the popularity z-score
CEASE_GRID = [{"lam": lam, "beta": beta} for lam in (50.0, 100.0, 200.0, 500.0) for beta in (10.0, 30.0, 100.0, 300.0)]
# A lead: the shipped grid chose ALS's largest tag setting on Last.fm (128 factors, tag weight
# 1, both the grid's edge); one more setting past that edge.
WIDER_TAGGED_ALS = [{"factors": 256, "regularization": 100.0, "alpha": 40.0, "tag_weight": 1.0}]
# The screen's best (`--screen --only gfcf`): alpha 0.3 at 128 or 256 singular vectors.
GFCF_GRID = [{"k": k, "alpha": 0.3, **({"tag_weight": w} if w else {})} for k in (128, 256) for w in (0.0, 0.5, 1.0)]
USERKNN_GRID = [{"neighbours": k, "shrink": 10.0} for k in (20, 50, 100, 200, 400)]
EDLAE_GRID = [{"lam": lam, "dropout": p} for lam in (10.0, 100.0) for p in (0.1, 0.25, 0.5)]
BM25_ALS = [{"factors": f, "regularization": r, "alpha": a, "bm25": True} for f, r, a in
            ((64, 50.0, 20.0), (128, 100.0, 40.0), (64, 50.0, 5.0), (128, 100.0, 10.0), (32, 5.0, 1.0))] + [
    {"factors": 128, "regularization": 100.0, "alpha": a, "tag_weight": 1.0, "bm25": True} for a in (10.0, 40.0)]
# `--screen`: single sources scored alone on the whole validation split (no blend, no halves),
# a first look before a lead earns a variant. The tag weights past each grid's edge (every
# co-occurrence source chose the grid's largest tag weight on Last.fm), and iALS with
# frequency-scaled regularisation (Rendle et al. 2021: each row's penalty lambda x (its
# positives + a0 x the other side's size) ** nu; nu 0 is implicit's ALS) beside implicit's ALS.
SCREEN: list[tuple[str, dict[str, Any]]] = [
    *[("ease", {"lam": 100.0, "tag_weight": w}) for w in (0.0, 0.5, 1.0, 1.5, 2.0, 3.0)],
    *[("itemknn", {"neighbours": 200, "shrink": 10.0, "tag_weight": w}) for w in (0.0, 1.0, 2.0, 4.0)],
    *[("rp3beta", {"alpha": 0.8, "beta": 0.5, "tag_weight": w}) for w in (0.0, 1.0, 2.0, 4.0)],
    *[("als", {"factors": 128, "regularization": 100.0, "alpha": 40.0, "tag_weight": w, "seeds": 1, "seed": k})
      for w in (0.5, 1.0, 2.0) for k in range(3)],
    *[("ials", {"factors": 128, "a0": 0.025, "lam": lam, "nu": nu, "tag_weight": w})
      for nu, lam, w in ((0.0, 2.4, 0.5), (1.0, 0.02, 0.5), (1.0, 0.02, 1.0), (1.0, 0.05, 0.5), (1.0, 0.01, 0.5),
                         (0.5, 0.15, 0.5), (0.5, 0.3, 0.5), (0.5, 0.5, 0.5), (0.5, 0.25, 1.0), (0.5, 0.3, 1.0),
                         (0.5, 0.35, 1.0), (0.5, 0.4, 1.0))],
    # Fewer ALS iterations (speed, issue 15 item 4: ALS is most of the index stage), the chosen
    # setting of each set (Last.fm: tags at 0.5; MovieLens: 128 factors without), three seeds.
    *[("als_iterations", {"factors": 128, "regularization": r, "alpha": a, "iterations": it, "seed": k,
                          **({"tag_weight": 0.5} if tw else {})})
      for r, a, tw in ((100.0, 40.0, True), (50.0, 20.0, False)) for it in (5, 8, 10, 15) for k in range(3)],
    # GF-CF (Shen et al. 2021): the degree-normalised item-item filter plus alpha x an ideal
    # low-pass filter (the normalised matrix's top-k right singular vectors); closed form.
    *[("gfcf", {"k": k, "alpha": a, "tag_weight": w}) for w in (0.0, 0.5, 1.0) for k in (0, 64, 128, 256)
      for a in ((0.0,) if k == 0 else (0.1, 0.3, 1.0, 3.0))],
    # ALS's chosen setting with each tag's row scaled by (median tag size / its size) ** gamma
    # (a large tag weighs less), or only tags on at least `min_items` artists; three seeds each.
    *[("als_tags_scaled", {"factors": 128, "regularization": 100.0, "alpha": 40.0, "tag_weight": w, "gamma": g,
                           "min_items": m, "seed": k})
      for w in (0.5, 1.0) for g, m in ((0.0, 0), (0.25, 0), (0.5, 0), (1.0, 0), (0.0, 10), (0.0, 20))
      for k in range(3)],
]
LEADS = ("cease", "userknn", "vae", "gfcf")  # scores of leads, used only by the variants that name them
SHIPPED = "shipped: the tag settings in every source that learns from co-occurrence"

Key = tuple[str, str, int]  # source, setting, seed


def validation_setup(dataset: str) -> tuple[Any, ...]:
    """The validation split `fusionrec run` uses on the benchmark's train part, its candidate
    model fitted on the split's feature part: (config, catalog, fused retriever, item ids,
    content vectors, tag matrix, candidate model, labelled users, their log rows, truth)."""
    work = RESULTS / f"work_{dataset}"
    if not (work / "train").is_dir() or not (work / "art" / "embeddings").is_dir():
        raise SystemExit(f"no {work}/train or {work}/art/embeddings: run bench/peers.py --dataset {dataset} first")
    config = Config()
    catalog = stage.load_catalog(work / "train")
    item_mods, user_mods = stage.embeddings(work / "art")
    split, threshold = stage.candidate_split(catalog.interactions, config)
    if split is None:
        raise SystemExit("the train part is too short for a validation split")
    print(f"{dataset}: validation protocol {split.protocol}, {split.users} labelled users", file=sys.stderr)
    fused = stage.retriever_from_config(config).fit(item_mods, split.fit, user_mods, held_out=split.held)
    item_ids = fused.item_ids_
    content = C.content_vectors(item_mods, item_ids)
    tags = tag_matrix(catalog.items, item_ids, config.sources.tag_min_items, interactions=catalog.interactions,
                      threshold=threshold)  # as the index stage builds them
    truth_frame = C.truth_pairs(split.fit, split.held, threshold)
    users = sorted(truth_frame["user_id"].unique().to_list())
    base = C.CandidateModel(config.index.n_candidates, threshold, config.sources.recent_items,
                            config.sources.recent_half_life, 0, params={}, content=content).fit(
        split.fit, item_ids, catalog.users, fused)
    rows = base.user_rows(users)
    col = {str(i): j for j, i in enumerate(item_ids)}
    row = {u: j for j, u in enumerate(users)}
    truth = np.zeros((len(users), len(item_ids)), bool)
    truth[[row[u] for u in truth_frame["user_id"].to_list()], [col[i] for i in truth_frame["item_id"].to_list()]] = True
    return config, catalog, fused, item_ids, content, tags, base, users, rows, truth


def source_scores(dataset: str, variants: dict[str, dict[str, Any]]
                  ) -> tuple[dict[Key, np.ndarray], np.ndarray, np.ndarray]:
    """(source, setting, seed) -> validation scores, the truth matrix and the blocked (seen) matrix.

    Only what `variants` use: the leads' scores (Mult-VAE's twelve fits, collective EASE,
    EDLAE, user-kNN), the extra ALS grids and seeds are computed where a variant names them.
    """
    uses = {flag for v in variants.values() for flag in ("cease", "userknn", "vae", "edlae", "gfcf") if v.get(flag)}
    als_grids = {v["als_grid"] for v in variants.values()}
    als_seeds = max(v["seeds"] for v in variants.values())
    config, catalog, fused, item_ids, content, tags, base, users, rows, truth = validation_setup(dataset)
    scores: dict[Key, np.ndarray] = {}
    extra_als = (PREVIOUS_ALS + (WIDER_TAGGED_ALS if "tags_wider" in als_grids else [])
                 + (BM25_ALS if "bm25" in als_grids else []))
    grids = {**SEARCH_GRID, "als": SEARCH_GRID["als"] + [s for s in extra_als if s not in SEARCH_GRID["als"]]}
    for name in stage.source_names(config, len(item_ids)):
        if name in (C.FUSED, "gru") or (name == "segment_popular" and base.segments_.shape[1] == 0):
            continue
        for setting in grids[name]:
            if setting.get("tag_weight") and tags is None:
                continue
            seeds = range(1) if name != "als" else range(
                max(als_seeds, MAX_SEEDS) if setting in SEARCH_GRID["als"] else MAX_SEEDS)
            for seed in seeds:
                params = {**setting, "seeds": 1} if name == "als" else setting
                source = make_source(name, params, segments=base.segments_, seed=seed, content=content,
                                     tags=tags).fit(base.log_)
                scores[(name, json.dumps(setting, sort_keys=True), seed)] = source.score(base.log_, rows)
        print(f"  {name}: {len(grids[name])} settings", file=sys.stderr, flush=True)
    scores[(C.FUSED, "{}", 0)] = C.fused_scores(fused, users, np.asarray(item_ids, dtype=object),
                                                config.index.n_candidates)
    if content is not None and "cease" in uses:
        for setting in CEASE_GRID:
            scores[("cease", json.dumps(setting, sort_keys=True), 0)] = collective_ease(
                base.log_.matrix, content, **setting)[rows]
        print(f"  collective EASE: {len(CEASE_GRID)} settings", file=sys.stderr, flush=True)
    for setting in EDLAE_GRID if "edlae" in uses else []:
        b = edlae(base.log_.matrix, **setting)
        scores[("ease", json.dumps(setting, sort_keys=True), 0)] = np.asarray(base.log_.matrix[rows] @ b, np.float32)
        scores[("recent_ease", json.dumps(setting, sort_keys=True), 0)] = np.asarray(base.log_.recent[rows] @ b,
                                                                                      np.float32)
    for setting in SEARCH_GRID["vae"] if "vae" in uses else []:  # an opt-in source (not in `auto`): scored here as a lead
        if setting.get("tag_weight") and tags is None:
            continue
        vae = make_source("vae", setting, tags=tags).fit(base.log_).score(base.log_, rows)
        scores[("vae", json.dumps(setting, sort_keys=True), 0)] = vae
        mean = float(C.ndcg_at(np.where(base.blocked(rows), -np.inf, vae), truth).mean())
        print(f"  Mult-VAE {setting}: validation NDCG@10 {mean:.4f} alone", file=sys.stderr, flush=True)
    for setting in GFCF_GRID if "gfcf" in uses else []:
        if setting.get("tag_weight") and tags is None:
            continue
        x = tagged_matrix(base.log_.matrix, tags, setting.get("tag_weight", 0.0))
        scores[("gfcf", json.dumps(setting, sort_keys=True), 0)] = gfcf(x, rows, setting["k"], setting["alpha"])
    for setting in USERKNN_GRID if "userknn" in uses else []:
        scores[("userknn", json.dumps(setting, sort_keys=True), 0)] = user_knn(base.log_.matrix, rows, **setting)
    print(f"  leads scored: {sorted(uses) or 'none'}", file=sys.stderr, flush=True)
    return scores, truth, base.blocked(rows)


def ials(x: Any, factors: int, a0: float, lam: float, nu: float, iterations: int = 10, seed: int = 0
         ) -> tuple[np.ndarray, np.ndarray]:
    """iALS with frequency-scaled regularisation (Rendle et al. 2021): squared loss on every
    positive (weighted by its value) and a0 x on every cell, each row's penalty lambda x (its
    positives + a0 x the other side's size) ** nu; exact alternating solves (numpy)."""
    def side(m: Any, fixed: np.ndarray) -> np.ndarray:
        k = fixed.shape[1]
        gram = a0 * (fixed.T @ fixed)
        penalty = lam * (np.diff(m.indptr) + a0 * fixed.shape[0]) ** nu
        out = np.zeros((m.shape[0], k))
        for start in range(0, m.shape[0], 512):
            stop = min(start + 512, m.shape[0])
            a = np.broadcast_to(gram, (stop - start, k, k)).copy()
            b = np.zeros((stop - start, k))
            for r in range(start, stop):
                cols, w = m.indices[m.indptr[r]:m.indptr[r + 1]], m.data[m.indptr[r]:m.indptr[r + 1]]
                a[r - start] += (fixed[cols] * w[:, None]).T @ fixed[cols]
                b[r - start] = w @ fixed[cols]
            a[:, np.arange(k), np.arange(k)] += penalty[start:stop, None]
            out[start:stop] = np.linalg.solve(a, b[..., None])[..., 0]
        return out

    rng = np.random.default_rng(seed)
    x = sp.csr_matrix(x, dtype=np.float64)
    xt = x.T.tocsr()
    users = rng.normal(0, 0.1 / np.sqrt(factors), (x.shape[0], factors))
    items = rng.normal(0, 0.1 / np.sqrt(factors), (x.shape[1], factors))
    for _ in range(iterations):
        users = side(x, items)
        items = side(xt, users)
    return users, items


def gfcf(x: Any, rows: Any, k: int, alpha: float) -> np.ndarray:
    """GF-CF's scores of the users `rows` (their rows of `x`, whose further rows may be tags):
    r P + alpha r D^-1/2 V_k V_k' D^1/2, with R~ = Du^-1/2 X Di^-1/2, P = R~'R~ and V_k R~'s top-k
    right singular vectors (k 0: the linear filter alone)."""
    x = sp.csr_matrix(x, dtype=np.float64)
    du, di = np.asarray(x.sum(axis=1)).ravel(), np.asarray(x.sum(axis=0)).ravel()
    di_inv = np.where(di > 0, 1 / np.sqrt(np.maximum(di, 1e-12)), 0.0)
    norm = sp.diags(np.where(du > 0, 1 / np.sqrt(np.maximum(du, 1e-12)), 0.0)) @ x @ sp.diags(di_inv)
    r = x[rows]
    score = np.asarray(r @ (norm.T @ norm).toarray())
    if k:
        v = np.linalg.svd(norm.toarray(), full_matrices=False)[2][:k].T
        score += alpha * np.asarray((r @ sp.diags(di_inv)) @ v @ (v.T * np.sqrt(di)[None, :]))
    return score.astype(np.float32)


def scaled_tags(tags: Any, gamma: float, min_items: int) -> Any:
    """`tags` with each tag's row times (median size / its size) ** gamma, tags under `min_items` dropped."""
    sizes = np.asarray(tags.sum(axis=1)).ravel()
    scale = np.where(sizes >= min_items, (np.median(sizes) / np.maximum(sizes, 1)) ** gamma, 0.0)
    out = sp.csr_matrix(sp.diags(scale) @ tags)
    out.eliminate_zeros()
    return out


def screen(dataset: str, report: Callable[[str], None], only: str = "") -> None:
    """`SCREEN`'s settings whose source's name holds `only`, each alone: validation NDCG@10 on every labelled user."""
    _, _, _, _, content, tags, base, _, rows, truth = validation_setup(dataset)
    blocked = base.blocked(rows)
    report(f"{dataset}: single sources on the validation split ({len(rows)} users)\n"
           "| source | setting | validation NDCG@10 | seconds |\n|---|---|---:|---:|")
    for name, setting in SCREEN:
        if (setting.get("tag_weight") and tags is None) or only not in name:
            continue
        started = time.perf_counter()
        if name == "ials":
            params = {k: v for k, v in setting.items() if k != "tag_weight"}
            users, items = ials(tagged_matrix(base.log_.matrix, tags, setting["tag_weight"]), **params)
            score = users[rows] @ items.T  # the tags' rows sit below the log's users
        elif name == "gfcf":
            score = gfcf(tagged_matrix(base.log_.matrix, tags, setting["tag_weight"]), rows, setting["k"],
                         setting["alpha"])
        elif name == "als_tags_scaled":
            params = {k: v for k, v in setting.items() if k not in ("seed", "gamma", "min_items")}
            score = make_source("als", {**params, "seeds": 1}, seed=setting["seed"],
                                tags=scaled_tags(tags, setting["gamma"], setting["min_items"])
                                ).fit(base.log_).score(base.log_, rows)
        else:
            params = {k: v for k, v in setting.items() if k != "seed"}
            if name == "als_iterations":
                name, params = "als", {**params, "seeds": 1}
            score = make_source(name, params, segments=base.segments_, seed=setting.get("seed", 0), content=content,
                                tags=tags).fit(base.log_).score(base.log_, rows)
        mean = float(C.ndcg_at(np.where(blocked, -np.inf, score), truth).mean())
        report(f"| {name} | {json.dumps(setting, sort_keys=True)} | {mean:.4f} | {time.perf_counter() - started:.1f} |")


def collective_ease(x: Any, content: np.ndarray, lam: float, beta: float) -> np.ndarray:
    """EASE whose Gram adds beta x the items' content cosines (centred vectors): X B for all users."""
    v = content.astype(np.float64)
    present = np.abs(v).sum(axis=1) > 0
    v = np.where(present[:, None], v - v[present].mean(axis=0), 0.0)
    v /= np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12)
    gram = (x.T @ x).toarray().astype(np.float64) + beta * (v @ v.T)
    gram[np.diag_indices_from(gram)] += lam
    return np.asarray(x @ ease_weights(gram), dtype=np.float32)


def ease_weights(gram: np.ndarray) -> np.ndarray:
    """EASE's closed form from a regularised Gram: B = -P / diag(P) with a zero diagonal, P its inverse."""
    p = np.linalg.inv(gram)
    b = -p / np.diag(p)
    np.fill_diagonal(b, 0.0)
    return b


def edlae(x: Any, lam: float, dropout: float) -> np.ndarray:
    """EDLAE's weights (Steck 2020): EASE with lambda + p / (1 - p) x diag(X'X) on each item's diagonal."""
    gram = (x.T @ x).toarray().astype(np.float64)
    gram[np.diag_indices_from(gram)] += lam + dropout / (1.0 - dropout) * np.diag(gram)
    return ease_weights(gram).astype(np.float32)


def user_knn(x: Any, rows: np.ndarray, neighbours: int, shrink: float) -> np.ndarray:
    """User-based neighbours: each scored user's `neighbours` most similar users (cosine of
    positive rows, shrunk by `shrink`), their rows summed by similarity: (len(rows), items)."""
    x = x.astype(np.float32).tocsr()
    norms = np.sqrt(np.asarray(x.multiply(x).sum(axis=1)).ravel())
    sim = np.asarray((x[rows] @ x.T).toarray(), dtype=np.float32)
    sim /= np.outer(norms[rows], norms) + shrink + 1e-9
    sim[np.arange(len(rows)), rows] = 0.0  # not one's own neighbour
    if neighbours < sim.shape[1]:
        cut = np.partition(sim, sim.shape[1] - neighbours, axis=1)[:, sim.shape[1] - neighbours]
        sim[sim < cut[:, None]] = 0.0
    return np.asarray(x.T.dot(sim.T).T, dtype=np.float32)


class Study:
    def __init__(self, scores: dict[Key, np.ndarray], truth: np.ndarray, blocked: np.ndarray) -> None:
        self.scores, self.truth, self.blocked = scores, truth, blocked

    def ndcg(self, s: np.ndarray, rows: np.ndarray) -> np.ndarray:
        return C.ndcg_at(np.where(self.blocked[rows], -np.inf, s[rows]), self.truth[rows])

    def ranked(self, options: dict[str, np.ndarray], rows: np.ndarray) -> list[np.ndarray]:
        """The options' scores, best validation NDCG@10 on `rows` first."""
        order = sorted(options, key=lambda k: -float(self.ndcg(options[k], rows).mean()))
        return [options[k] for k in order]

    def best(self, options: dict[str, np.ndarray], rows: np.ndarray) -> np.ndarray:
        return self.ranked(options, rows)[0]

    def normalise(self, score: np.ndarray, variant: dict[str, Any]) -> np.ndarray:
        """A source's scores as the blend adds them: per-user z-scores over unseen items (shipped),
        or a lead's transform of the user's ranks (`transform`): "log_rank" is -log(rank), "normal_rank"
        the standard normal quantile of 1 - (rank - 0.5) / unseen items (a z-score of the ranks)."""
        transform = variant.get("transform")
        if not transform:
            return C.zscore(score, self.blocked)
        # Tied scores share a rank (1 + the unseen items scored strictly higher), so no order
        # among ties (item ids, which carry the catalogue's history on Last.fm) reaches the blend.
        masked = np.where(self.blocked, -np.inf, score.astype(np.float64))
        desc = -np.sort(-masked, axis=1)
        ranks = np.stack([np.searchsorted(-desc[r], -masked[r], side="left") + 1 for r in range(score.shape[0])])
        if transform == "log_rank":
            out = -np.log(ranks.astype(np.float64))
        else:
            unseen = np.maximum((~self.blocked).sum(axis=1, keepdims=True), 1)
            out = ndtri(np.clip(1 - (ranks - 0.5) / unseen, 1e-6, 1 - 1e-6))
        return np.where(self.blocked, 0.0, out).astype(np.float32)

    def blend_score(self, variant: dict[str, Any], choose: np.ndarray, score: np.ndarray) -> np.ndarray:
        """Per-user NDCG@10 on `score` of the blend whose settings and weights `choose` picked."""
        z: dict[str, np.ndarray] = {}
        leads = {lead for lead in LEADS if variant.get(lead)}
        for name in sorted({k[0] for k in self.scores} - {"als", *LEADS} | leads):
            options = {k[1]: v for k, v in self.scores.items() if k[0] == name and "tag_weight" not in k[1]
                       and ("dropout" not in k[1] or variant.get("edlae"))}
            tagged = {k[1]: v for k, v in self.scores.items() if k[0] == name and "tag_weight" in k[1]}
            best = self.best(options, choose)
            if tagged and name in variant.get("tag_sources", ()):  # the nightly rule, as for ALS
                best_tagged = self.best(tagged, choose)
                if C.tags_win(self.ndcg(best_tagged, choose), self.ndcg(best, choose))[0]:
                    best = best_tagged
            z[name] = self.normalise(best, variant)
        plain = [g for g in SEARCH_GRID["als"] if not g.get("tag_weight")]
        # The whole grid, tag settings included where the items had tags (they were scored).
        with_tags = [g for g in SEARCH_GRID["als"] if ("als", json.dumps(g, sort_keys=True), 0) in self.scores]
        wider = with_tags + [g for g in WIDER_TAGGED_ALS if ("als", json.dumps(g, sort_keys=True), 0) in self.scores]
        bm25 = with_tags + [g for g in BM25_ALS if ("als", json.dumps(g, sort_keys=True), 0) in self.scores]
        grid = {"previous": PREVIOUS_ALS, "wide": plain, "tags": with_tags, "tags_any": with_tags,
                "tags_wider": wider, "bm25": bm25}[variant["als_grid"]]
        def als(g: dict[str, Any], seeds: int) -> np.ndarray:
            return np.mean([self.scores[("als", json.dumps(g, sort_keys=True), k)] for k in range(seeds)], axis=0)

        choose_seeds = variant.get("choose_seeds", variant["seeds"])
        if variant.get("screen_seeds"):  # the nightly screen: finalists on the screen's seeds, ranked on all
            look = variant["screen_seeds"]
            grid = [g for g, _ in C.finalists(grid, lambda g: (None, float(self.ndcg(als(g, look), choose).mean())))]
        ranked_grid = sorted(grid, key=lambda g: -float(self.ndcg(als(g, choose_seeds), choose).mean()))
        if variant["als_grid"] in ("tags", "tags_wider", "bm25"):  # the nightly rule: tags only with a clear gain
            best_plain = next(g for g in ranked_grid if not g.get("tag_weight"))
            best_tagged = next((g for g in ranked_grid if g.get("tag_weight")), None)
            if best_tagged is None or not C.tags_win(self.ndcg(als(best_tagged, choose_seeds), choose),
                                                     self.ndcg(als(best_plain, choose_seeds), choose))[0]:
                ranked_grid = [g for g in ranked_grid if not g.get("tag_weight")]
        if variant.get("shortlist"):
            ranked_grid = sorted(ranked_grid[:variant["shortlist"]],
                                 key=lambda g: -float(self.ndcg(als(g, variant["seeds"]), choose).mean()))
        ranked = [als(g, variant["seeds"]) for g in ranked_grid[:2]]
        z["als"] = self.normalise(ranked[0], variant)
        if variant.get("second"):
            z["als_second"] = C.zscore(ranked[1], self.blocked)
        weights = C.search_weights({k: v[choose] for k, v in z.items()}, self.truth[choose], self.blocked[choose],
                                   steps=variant["steps"], rounds=variant["rounds"])
        total = np.asarray(sum(weights[k] * z[k] for k in z if weights[k]))
        if variant.get("bagged"):  # weights searched on bootstrap resamples of `choose`, each scaled to sum 1, averaged
            rng = np.random.default_rng(len(choose))
            mean_w = dict.fromkeys(z, 0.0)
            for _ in range(variant["bagged"]):
                rows_b = np.sort(rng.choice(choose, len(choose), replace=True))
                w = C.search_weights({k: v[rows_b] for k, v in z.items()}, self.truth[rows_b], self.blocked[rows_b],
                                     steps=variant["steps"], rounds=variant["rounds"])
                norm = sum(abs(x) for x in w.values()) or 1.0
                for k in z:
                    mean_w[k] += w[k] / norm / variant["bagged"]
            total = np.asarray(sum(mean_w[k] * z[k] for k in z if mean_w[k]))
        if variant.get("vae_cross") and weights.get("vae"):  # kept only if it wins out of fold within `choose`
            without = {k: v for k, v in z.items() if k != "vae"}
            rng = np.random.default_rng(len(choose))
            perm = rng.permutation(choose)
            folds = (np.sort(perm[: len(perm) // 2]), np.sort(perm[len(perm) // 2:]))
            diff = []
            for a, b in (folds, folds[::-1]):
                per = []
                for zz in (z, without):
                    w = C.search_weights({k: v[a] for k, v in zz.items()}, self.truth[a], self.blocked[a],
                                         steps=variant["steps"], rounds=variant["rounds"])
                    per.append(self.ndcg(np.asarray(sum(w[k] * zz[k] for k in zz if w[k])), b))
                diff.append(per[0] - per[1])
            d = np.concatenate(diff)
            lo = paired(d)[1]
            if not (d.mean() > 0 if variant["vae_cross"] == "mean" else lo > 0):
                w0 = C.search_weights({k: v[choose] for k, v in without.items()}, self.truth[choose],
                                      self.blocked[choose], steps=variant["steps"], rounds=variant["rounds"])
                total = np.asarray(sum(w0[k] * without[k] for k in without if w0[k]))
        if variant.get("vae_rule") and weights.get("vae"):  # the nightly rule: kept only with a clear gain
            weights, _ = C.gate_source("vae", weights, {k: v[choose] for k, v in z.items()}, self.truth[choose],
                                       self.blocked[choose], seed=0)
            total = np.asarray(sum(weights[k] * z[k] for k in z if weights[k]))
        if variant.get("penalty") and "popular" in z:
            best = max(PENALTIES, key=lambda p: float(self.ndcg(total + p * z["popular"], choose).mean()))
            total = total + best * z["popular"]
        return self.ndcg(total, score)


def cross_fit(study: Study, variants: dict[str, dict[str, Any]], repeats: int, seed: int = 1
              ) -> dict[str, np.ndarray]:
    n = study.truth.shape[0]
    rng = np.random.default_rng(seed)
    sums = {v: np.zeros(n) for v in variants}
    times = np.zeros(n)
    for _ in range(repeats):
        perm = rng.permutation(n)
        halves = (np.sort(perm[: n // 2]), np.sort(perm[n // 2:]))
        for choose, score in (halves, halves[::-1]):
            times[score] += 1
            for name, variant in variants.items():
                sums[name][score] += study.blend_score(variant, choose, score)
    return {name: s / np.maximum(times, 1) for name, s in sums.items()}


def paired(diff: np.ndarray, seed: int = 0) -> tuple[float, float, float]:
    rng = np.random.default_rng(seed)
    boots = np.array([diff[rng.integers(0, len(diff), len(diff))].mean() for _ in range(1000)])
    return float(diff.mean()), float(np.percentile(boots, 2.5)), float(np.percentile(boots, 97.5))


def main(argv: list[str] | None = None, report: Callable[[str], None] = print) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dataset", choices=sorted(SETS), required=True)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--only", default="", help="run only the variants whose name holds this text "
                    "(with `previous` and the shipped one)")
    ap.add_argument("--screen", action="store_true", help="score `SCREEN`'s single sources alone and stop "
                    "(with --only: the sources whose name holds it)")
    args = ap.parse_args(argv)
    if args.screen:
        screen(args.dataset, report, args.only)
        return
    variants = {name: v for name, v in VARIANTS.items() if name in ("previous", SHIPPED) or args.only in name}
    study = Study(*source_scores(args.dataset, variants))
    per_user = cross_fit(study, variants, args.repeats)
    base = per_user["previous"]
    out: dict[str, Any] = {"dataset": args.dataset, "users": int(len(base)), "repeats": args.repeats, "variants": {}}
    report(f"{args.dataset}: {len(base)} validation users, {args.repeats} x 2 user halves")
    report("| variant | validation NDCG@10 | minus previous (95% CI) | minus shipped (95% CI) |\n|---|---:|---|---|")
    for name, scores in per_user.items():
        mean, lo, hi = paired(scores - base)
        s_mean, s_lo, s_hi = paired(scores - per_user[SHIPPED])
        out["variants"][name] = {"ndcg@10": float(scores.mean()), "diff": mean, "ci": [lo, hi],
                                 "diff_shipped": s_mean, "ci_shipped": [s_lo, s_hi]}
        report(f"| {name} | {scores.mean():.4f} | {mean:+.4f} ({lo:+.4f}, {hi:+.4f}) "
               f"| {s_mean:+.4f} ({s_lo:+.4f}, {s_hi:+.4f}) |")
    RESULTS.mkdir(parents=True, exist_ok=True)
    suffix = "" if len(variants) == len(VARIANTS) else "_only_" + "".join(ch if ch.isalnum() else "_" for ch in args.only)
    (RESULTS / f"sources_study_{args.dataset}{suffix}.json").write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
