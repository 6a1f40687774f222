"""The numerical pieces of HCTS (`gateway.routing.hcts`), numpy and scipy: the
probability that each of several independent Gaussians is the largest (the propensities, in closed
form with a guaranteed bracket), the expected maximum, and spherical k-means (a re-clustering:
`compute_clusters`)."""

from __future__ import annotations

from dataclasses import dataclass
from statistics import NormalDist
from typing import Protocol

import numpy as np
from scipy.special import ndtr


def argmax_probs(u: np.ndarray, s: np.ndarray, nodes: np.ndarray) -> tuple[np.ndarray, float]:
    """P(argmax_b (u_b + s_b z_b) = a) for independent z_b ~ N(0, 1), and an error bound.

    P_a = int F_{-a}(t) dPhi_a(t), F_{-a} = prod_{b != a} Phi_b. F_{-a} is non-decreasing, so on any
    grid the left and right Riemann-Stieltjes sums bound P_a from below and above; the grid merges
    every arm's nodes u_b + s_b * nodes. Returns the midpoints (renormalised) and the largest
    half-gap (the guaranteed bound before renormalising)."""
    k = len(u)
    if k == 1:
        return np.ones(1), 0.0
    t = np.sort((u[:, None] + s[:, None] * nodes[None, :]).ravel())
    z = (t[None, :] - u[:, None]) / s[:, None]
    cdf = ndtr(z)  # (k, M): Phi_a(t_j)
    logc = np.log(np.maximum(cdf, 1e-300))
    f_minus = np.exp(logc.sum(axis=0)[None, :] - logc)  # F_{-a}(t_j)
    # Phi_a's mass on (-inf, t0], [t0, t1], ..., [t_M-1, inf)
    d = np.empty((k, cdf.shape[1] + 1))
    d[:, 0] = cdf[:, 0]
    np.subtract(cdf[:, 1:], cdf[:, :-1], out=d[:, 1:-1])
    d[:, -1] = 1.0 - cdf[:, -1]
    lower = (d[:, 1:] * f_minus).sum(axis=1)
    upper = (d[:, :-1] * f_minus).sum(axis=1) + d[:, -1]
    p = 0.5 * (lower + upper)
    return p / p.sum(), float(0.5 * (upper - lower).max())


# The propensities' nodes (per arm, in its own standard deviations): 32 normal quantiles and the
# tails, so that every interval holds about the same mass of the arm's own draw.
PROP_NODES = np.array([-7.0, -5.0, *(NormalDist().inv_cdf((i + 0.5) / 32) for i in range(32)), 5.0, 7.0])


def propensities(u: np.ndarray, s: np.ndarray) -> tuple[np.ndarray, float]:
    """`argmax_probs` on PROP_NODES, and an estimate of its largest error: the difference from the
    same sum on every other node (it falls about fourfold when the nodes are doubled, so the
    difference overstates it)."""
    p, _ = argmax_probs(u, s, PROP_NODES)
    coarse, _ = argmax_probs(u, s, PROP_NODES[::2])
    return p, float(np.abs(p - coarse).max())


def expected_max(u: np.ndarray, s: np.ndarray, nodes: np.ndarray) -> float:
    """E[max_a (u_a + s_a z_a)] for independent z_a ~ N(0, 1): int t dF(t), F = prod Phi_a, on the
    merged grid (midpoint rule in F; the tails at the grid's ends)."""
    t = np.sort((u[:, None] + s[:, None] * nodes[None, :]).ravel())
    f = np.exp(np.log(np.maximum(ndtr((t[None, :] - u[:, None]) / s[:, None]), 1e-300)).sum(axis=0))
    df = np.diff(f, prepend=0.0)
    mid = np.concatenate([[t[0]], 0.5 * (t[1:] + t[:-1])])
    return float((df * mid).sum() + (1.0 - f[-1]) * t[-1])


def onehot(a: np.ndarray, k: int) -> np.ndarray:
    out = np.zeros((len(a), k), dtype=np.float64)
    out[np.arange(len(a)), a] = 1.0
    return out


def spherical_kmeans(x: np.ndarray, k: int, rng: np.random.Generator, iters: int = 12) -> np.ndarray:
    """k-means++ seeding, then Lloyd iterations on cosine similarity: (k, d) unit centroids."""
    n = len(x)
    k = min(k, n)
    cent = np.empty((k, x.shape[1]), dtype=np.float32)
    cent[0] = x[rng.integers(n)]
    best = x @ cent[0]
    for j in range(1, k):
        d2 = np.maximum(2.0 - 2.0 * best, 0.0).astype(np.float64)
        tot = d2.sum()
        i = int(rng.integers(n)) if tot <= 0 else int(np.searchsorted(np.cumsum(d2), rng.random() * tot))
        cent[j] = x[min(i, n - 1)]
        best = np.maximum(best, x @ cent[j])
    for _ in range(iters):
        a = np.argmax(x @ cent.T, axis=1)
        sums = onehot(a, len(cent)).astype(np.float32).T @ x
        norms = np.linalg.norm(sums, axis=1)
        ok = norms > 0
        new = cent.copy()
        new[ok] = (sums[ok] / norms[ok, None]).astype(np.float32)
        if np.allclose(new, cent):
            break
        cent = new
    return cent


def logit(p: np.ndarray) -> np.ndarray:
    p = np.minimum(np.maximum(p, 0.01), 0.99)  # (np.clip is twice as slow on small arrays)
    return np.asarray(np.log(p / (1.0 - p)))


def shifted(lm: np.ndarray, d: np.ndarray | float) -> np.ndarray:
    """Means of logit `lm` (scores in [0, 1]) moved by offsets `d` on the logit scale (a shift
    there never leaves [0, 1]: an arm near the top moves less than one in the middle)."""
    return np.asarray(1.0 / (1.0 + np.exp(-(lm + d))))


class KMeansKnobs(Protocol):
    """What a re-clustering reads of HCTS's knobs (`gateway.routing.hcts_model.HctsKnobs`)."""

    @property
    def levels(self) -> tuple[int, ...]: ...
    @property
    def min_cluster(self) -> int: ...
    @property
    def kmeans_sample(self) -> int: ...
    @property
    def kmeans_iters(self) -> int: ...


@dataclass(frozen=True)
class Clustering:
    """A re-clustering's result: centroids per level and the assignment of the first `rows` rows."""

    cents: list[np.ndarray]
    assigned: list[np.ndarray]
    rows: int


def compute_clusters(x: np.ndarray, knobs: KMeansKnobs, seed: int | np.random.Generator) -> Clustering:
    """The k-means part of a re-clustering (pure; runs in a thread on a copy of the prompts)."""
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    # A uniform sample is as good for 64 centroids and costs a fixed amount however long the
    # history (50,000 prompts: 4 s of CPU on 2 cores instead of 0.5 s).
    fit = x if len(x) <= knobs.kmeans_sample else x[np.sort(rng.choice(len(x), knobs.kmeans_sample, False))]
    cents: list[np.ndarray] = []
    for k in knobs.levels:
        kk = min(k, len(x) // max(1, knobs.min_cluster))
        if kk < 2 or (cents and kk <= len(cents[-1])):
            continue
        cents.append(spherical_kmeans(fit, kk, rng, knobs.kmeans_iters))
    return Clustering(cents, [np.argmax(x @ c.T, axis=1) for c in cents], len(x))
