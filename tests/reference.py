"""A deliberately plain, loop-per-group rendering of docs/algorithm.md section 3 with numpy.

The tests compare the vectorised `admm.project` with it; the speed benchmark uses it as the
naive baseline.
"""
import math

import numpy as np


def project_reference(weight, ratio, sparsity_type, block_size=(8, 4)):
    w = np.asarray(weight, dtype=np.float32)
    if ratio == 0:
        return w.copy()
    shape = w.shape
    o, i = shape[0], (shape[1] if w.ndim > 1 else 1)
    k = int(np.prod(shape[2:])) if w.ndim > 2 else 1
    if sparsity_type == 'irregular':
        return _prune(w, [[idx] for idx in np.ndindex(*shape)], ratio)
    w3 = w.reshape(o, i, k)
    if sparsity_type == 'filter':
        groups = [[(f, c, p) for c in range(i) for p in range(k)] for f in range(o)]
        return _prune(w3, groups, ratio, per_nonzero=False).reshape(shape)
    gm, gn = block_size
    ob, ib = math.ceil(o / gm), math.ceil(i / gn)
    if sparsity_type in ('kgr', 'kgc'):
        return _balanced_reference(w3, ratio, sparsity_type, block_size).reshape(shape)
    groups = []
    for bo in range(ob):
        for bi in range(ib):
            rows = range(bo * gm, min((bo + 1) * gm, o))
            cols = range(bi * gn, min((bi + 1) * gn, i))
            if sparsity_type == 'blk-vanilla':
                groups.append([(r, c, p) for r in rows for c in cols for p in range(k)])
            else:
                for p in range(k):
                    groups.append([(r, c, p) for r in rows for c in cols])
    return _prune(w3, groups, ratio).reshape(shape)


def _prune(w, groups, ratio, per_nonzero=True):
    """Groups scoring at or below the ratio's percentile are zeroed. The score is the L2 norm,
    divided by sqrt(non-zeros) for the original's block types (`per_nonzero`), plain for `filter`."""
    scores = []
    for g in groups:
        vals = np.array([w[idx] for idx in g])
        nnz = max(1, int(np.count_nonzero(vals))) if per_nonzero else 1
        scores.append(np.sqrt(np.sum(vals.astype(np.float64) ** 2)) / np.sqrt(nnz))
    threshold = np.percentile(np.array(scores), 100 * ratio)
    out = w.copy()
    for g, s in zip(groups, scores):
        if s <= threshold:
            for idx in g:
                out[idx] = 0
    return out


def _balanced_reference(w, ratio, sparsity_type, block_size):
    """kgr / kgc, one block at a time: each block chooses among its own groups, scored by their
    plain L2 norm (the follow-up's rule: no division by the non-zero count)."""
    o, i, k = w.shape
    gm, gn = block_size
    out = w.copy()
    for bo in range(math.ceil(o / gm)):
        for bi in range(math.ceil(i / gn)):
            rows = range(bo * gm, min((bo + 1) * gm, o))
            cols = range(bi * gn, min((bi + 1) * gn, i))
            if sparsity_type == 'kgr':
                # gM rows per block; rows past the last filter are padding with score 0.
                groups = [[(r, c, p) for c in cols for p in range(k)] for r in rows]
                scores = [_l2(w, g) for g in groups] + [0.0] * (gm - len(groups))
                ranked = sorted(range(gm), key=lambda row: (scores[row], row))
                n_pruned = math.ceil(round(gm * ratio, 9))
                pruned = [groups[row] for row in ranked[:n_pruned] if row < len(groups)]
            else:
                chunk = min(9, k)
                groups = [[(r, c, p) for r in rows for c in cols for p in range(j, k, chunk)] for j in range(chunk)]
                scores = [_l2(w, g) for g in groups]
                threshold = np.percentile(np.array(scores), 100 * ratio)
                pruned = [g for g, s in zip(groups, scores) if s <= threshold]
            for g in pruned:
                for idx in g:
                    out[idx] = 0
    return out


def _l2(w, group):
    vals = np.array([w[idx] for idx in group], dtype=np.float64)
    return np.sqrt(np.sum(vals ** 2))
