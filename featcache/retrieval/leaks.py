"""Train/test leaks: the same image in two splits (or twice in one), byte for byte (the content hash
the cache stores per row) or nearly (cosine similarity of the cached features above a threshold).

A val or test row with a near copy in train inflates every probe score measured on it;
:func:`eval_leak_counts` is what ``fit_head`` checks and records.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field

import numpy as np

from ..common.files import clean_json
from ..store.cache import FeatureCache, open_cache
from ..errors import ConfigError
from ..common.validation import check_int

log = logging.getLogger(__name__)

#: Default cosine threshold of a near duplicate, measured with efficientnet_lite0 (pooled, fp32) on
#: the 398 hymenoptera images with 61 copies of train images injected into val
#: (``benchmarks/export.py``, ``threshold_measurement``): the lowest copy scored 0.856 (re-encoded at
#: JPEG quality 70; median 0.969), 0.906 (flipped; median 0.955), 0.948 (resized to 80%; median
#: 0.983), while the most similar pair of distinct images scored 0.806 (median nearest neighbour
#: 0.667). 0.83 sits between the two. It is a floor: by default (``threshold=None``) the threshold is
#: also at least midway between the training split's median nearest-neighbour cosine and 1
#: (:func:`auto_threshold`; 0.834 there), so a feature space where every image is close to others (a
#: randomly initialised network, a collapsed embedding) does not flag every row.
DEFAULT_THRESHOLD = 0.83
#: Training rows whose nearest neighbour is sought to estimate the median nearest-neighbour cosine.
NN_SAMPLE = 512
#: Query rows compared at a time, and reference rows per product (bounds the similarity block).
QUERY_BLOCK, REF_BLOCK = 1024, 16384


@dataclass
class LeakReport:
    """What :func:`find_leaks` found.

    ``exact``: groups of rows with the same content hash (``{"hash", "rows": [{"split", "id"}]}``);
    ``near``: pairs above the threshold that are not exact copies (``{"a", "b", "cosine"}``, at most
    ``max_pairs`` listed); ``summary``: per ordered split pair ``"val/train"`` the rows of the first
    split with an exact or near copy in the second (``exact_rows``, ``near_rows``, ``rows``) and pairs.
    """

    cache: str
    layer: str
    threshold: float
    exact: list[dict] = field(default_factory=list)
    near: list[dict] = field(default_factory=list)
    summary: dict = field(default_factory=dict)
    near_pairs: int = 0
    truncated: bool = False

    def to_dict(self) -> dict:
        return clean_json({"cache": self.cache, "layer": self.layer, "threshold": self.threshold,
                           "summary": self.summary, "exact": self.exact, "near": self.near,
                           "near_pairs": self.near_pairs, "truncated": self.truncated})


def normalised(x: np.ndarray) -> np.ndarray:
    x = np.ascontiguousarray(x.reshape(len(x), -1), dtype=np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.where(norms > 0, norms, 1)


def near_pairs(q: np.ndarray, ref: np.ndarray, threshold: float, *, upper: bool = False):
    """Yield ``(i, j, cosine)`` arrays of pairs with cosine > ``threshold`` between L2-normalised rows
    of ``q`` and ``ref``, block by block (memory bounded by the block sizes); ``upper``: ``q`` is
    ``ref`` and only pairs ``j > i`` count."""
    for i0 in range(0, len(q), QUERY_BLOCK):
        qb = q[i0:i0 + QUERY_BLOCK]
        for j0 in range((i0 if upper else 0), len(ref), REF_BLOCK):
            s = qb @ ref[j0:j0 + REF_BLOCK].T
            ii, jj = np.nonzero(s > threshold)
            if upper:
                keep = jj + j0 > ii + i0
                ii, jj = ii[keep], jj[keep]
            if len(ii):
                yield ii + i0, jj + j0, s[ii, jj]


def median_nn_cosine(ref: np.ndarray, hashes: np.ndarray) -> float | None:
    """The median, over a seeded sample of :data:`NN_SAMPLE` rows of ``ref`` (L2-normalised), of the
    cosine with their nearest other row that is not a byte-identical copy (None below two rows)."""
    n = len(ref)
    if n < 2:
        return None
    idx = np.sort(np.random.default_rng(0).choice(n, size=min(n, NN_SAMPLE), replace=False))
    q, qh = ref[idx], hashes[idx]
    best = np.full(len(idx), -np.inf, dtype=np.float32)
    for j0 in range(0, n, REF_BLOCK):
        s = q @ ref[j0:j0 + REF_BLOCK].T
        s[qh[:, None] == hashes[None, j0:j0 + REF_BLOCK]] = -np.inf  # itself and its exact copies
        best = np.maximum(best, s.max(axis=1))
    best = best[np.isfinite(best)]
    return float(np.median(best)) if len(best) else None


def auto_threshold(ref: np.ndarray, hashes: np.ndarray) -> float:
    """``max(DEFAULT_THRESHOLD, (1 + median nearest-neighbour cosine) / 2)`` of the reference rows: a
    near copy is at most half as far from its original as images typically are from their neighbours."""
    med = median_nn_cosine(ref, hashes)
    return DEFAULT_THRESHOLD if med is None else max(DEFAULT_THRESHOLD, round((1 + med) / 2, 4))


def _check_threshold(threshold) -> None:
    if threshold is None:
        return
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0 < threshold <= 1:
        raise ConfigError(f"The 'threshold' option must be a cosine similarity in (0, 1]. Got {threshold!r}.")


def find_leaks(cache: str | os.PathLike | FeatureCache, *, layer: str | None = None,
               threshold: float | None = None, max_pairs: int = 10_000) -> LeakReport:
    """Exact and near duplicates within and across the splits of a cache.

    Parameters
    ----------
    cache : path or FeatureCache
    layer : str, optional
        The cached layer whose features are compared (default: the first).
    threshold : float, optional
        Cosine similarity above which two rows are near duplicates (in (0, 1]); default
        :func:`auto_threshold` of the ``train`` split (else the first split).
    max_pairs : int
        Near pairs listed at most (counts are always complete).

    Returns
    -------
    LeakReport
    """
    _check_threshold(threshold)
    check_int("max_pairs", max_pairs, minimum=0)
    own = not isinstance(cache, FeatureCache)
    c = open_cache(cache) if own else cache
    try:
        layer = c.resolve_layer(layer)
        splits = list(c.splits)
        ids = {s: c.ids(s) for s in splits}
        hashes = {s: c.hashes(s) for s in splits}
        feats = {s: normalised(c.load(s, layer)[0]) for s in splits}
        if threshold is None and splits:
            ref = "train" if "train" in splits else splits[0]
            threshold = auto_threshold(feats[ref], hashes[ref])
        report = LeakReport(str(c.path), layer, float(threshold or DEFAULT_THRESHOLD))
        threshold = report.threshold
        exact_rows = _exact(report, splits, ids, hashes)
        for a_i, a in enumerate(splits):
            for b in splits[:a_i + 1]:  # later splits against earlier ones, and each split with itself
                _near(report, a, b, feats, ids, hashes, threshold, max_pairs, exact_rows.get((a, b), set()))
        return report
    finally:
        if own:
            c.close()


def _pair_summary(report: LeakReport, a: str, b: str) -> dict:
    return report.summary.setdefault(f"{a}/{b}", {"exact_rows": 0, "near_rows": 0, "rows": 0,
                                                  "exact_pairs": 0, "near_pairs": 0})


def _exact(report: LeakReport, splits, ids, hashes) -> dict[tuple[str, str], set]:
    """Groups of byte-identical rows; returns, per split pair, the rows of the first split flagged."""
    where: dict[bytes, list[tuple[int, int]]] = {}
    for si, s in enumerate(splits):
        for r, h in enumerate(hashes[s]):
            where.setdefault(bytes(h), []).append((si, r))
    flagged: dict[tuple[str, str], set] = {}
    for h, rows in where.items():
        if len(rows) < 2:
            continue
        report.exact.append({"hash": h.decode("ascii", "replace"),
                             "rows": [{"split": splits[si], "id": ids[splits[si]][r]} for si, r in rows]})
        for x, (si, r) in enumerate(rows):
            for sj, q in rows[:x]:  # rows are in split order: sj <= si
                _pair_summary(report, splits[si], splits[sj])["exact_pairs"] += 1
                flagged.setdefault((splits[si], splits[sj]), set()).add(r)
                if si == sj:
                    flagged[(splits[si], splits[sj])].add(q)
    for (a, b), rows in flagged.items():
        _pair_summary(report, a, b)["exact_rows"] = len(rows)
    return flagged


def _near(report: LeakReport, a: str, b: str, feats, ids, hashes, threshold: float, max_pairs: int,
          exact_rows: set) -> None:
    same = a == b
    rows_near: set = set()
    n_pairs = 0
    for ii, jj, ss in near_pairs(feats[a], feats[b], threshold, upper=same):
        distinct = hashes[a][ii] != hashes[b][jj]  # byte-identical copies are reported as exact
        ii, jj, ss = ii[distinct], jj[distinct], ss[distinct]
        n_pairs += len(ii)
        rows_near.update(ii.tolist())
        if same:
            rows_near.update(jj.tolist())
        for i, j, s in zip(ii, jj, ss):
            if len(report.near) >= max_pairs:
                report.truncated = True
                break
            report.near.append({"a": {"split": a, "id": ids[a][i]}, "b": {"split": b, "id": ids[b][j]},
                                "cosine": round(float(s), 6)})
    report.near_pairs += n_pairs
    if n_pairs or exact_rows:
        d = _pair_summary(report, a, b)
        d["near_pairs"] = n_pairs
        d["near_rows"] = len(rows_near)
        d["rows"] = len(rows_near | exact_rows)


def eval_leak_counts(cache: FeatureCache, layer: str, train_split: str, *,
                     threshold: float | None = None) -> tuple[dict[str, int], float]:
    """Per split other than ``train_split``: how many of its rows have an exact or near copy in it,
    and the threshold used (default: :func:`auto_threshold` of the training split)."""
    _check_threshold(threshold)
    if train_split not in cache.splits or not cache.n(train_split):
        return {}, threshold or DEFAULT_THRESHOLD
    train = normalised(cache.load(train_split, layer)[0])
    hashes = cache.hashes(train_split)
    threshold = auto_threshold(train, hashes) if threshold is None else threshold
    train_hashes = set(map(bytes, hashes))
    out = {}
    for s in cache.splits:
        if s == train_split or not cache.n(s):
            continue
        flagged = {r for r, h in enumerate(cache.hashes(s)) if bytes(h) in train_hashes}
        for ii, _, _ in near_pairs(normalised(cache.load(s, layer)[0]), train, threshold):
            flagged.update(ii.tolist())
        out[s] = len(flagged)
    return out, threshold


#: ``fit_head`` checks for leaks when eval rows x train rows x dim is at most this (a few seconds of
#: matrix products on a laptop CPU); above, ``featcache leaks`` does it on demand.
FIT_CHECK_BUDGET = 2e12


def note_eval_leaks(cache: FeatureCache, layer: str, train_split: str, metrics: dict, warn) -> None:
    """What ``fit_head`` does: per scored split, record in ``metrics[split]["near_duplicates_in_train"]``
    how many rows have an exact or near copy in the training split, and warn in one line when any do."""
    scored = [s for s in metrics if s in cache.splits and s != train_split]
    if not scored or train_split not in cache.splits:
        return
    dim = int(np.prod(cache.features(train_split, layer).shape[1:]))
    work = sum(cache.n(s) for s in scored) * cache.n(train_split) * dim
    if work > FIT_CHECK_BUDGET:
        log.info("train/test leak check skipped (%.1e multiply-adds); run 'featcache leaks %s'", work, cache.path)
        return
    counts, threshold = eval_leak_counts(cache, layer, train_split)
    for s in scored:
        metrics[s]["near_duplicates_in_train"] = counts.get(s, 0)
    bad = [f"{counts[s]} of {cache.n(s)} '{s}' rows" for s in scored if counts.get(s)]
    if bad:
        warn(f"{' and '.join(bad)} have an exact or near copy (cosine > {threshold:g}) in '{train_split}': "
             f"their scores are inflated. Run 'featcache leaks {cache.path}' to list them.")
