"""Thompson-sampling propensities, computed rather than resampled: the probability that each arm
is picked, and an estimate of its numerical error, so that off-policy evaluation can weight the
logged calls by them.

The bandit picks with probability EXPLORATION_RATE an arm uniformly, else the argmax over the arms
of S_i = weight * q_i + c_i, q_i drawn from arm i's posterior (Beta, or Normal clipped to [0, 1],
which puts atoms at 0 and 1) and c_i its fixed terms (speed, cost, bonus). So

    P(pick i) = eps / K + (1 - eps) * P(i is the argmax)
    P(i is the argmax) = ∫ prod_{j != i} P(S_j <= s) dP(S_i <= s)

a one-dimensional Stieltjes integral over the score s, computed on a grid that resolves every arm
that can win (the union of their quantile points): arm i's mass on each grid interval is a
difference of its CDF, and the product of the others' CDFs is taken as the mean of its values at
the interval's ends (a second-order rule; the left limit at the right end, where an atom may
jump). An atom wins with the product at its point, ties going to the first arm as `np.argmax`
does. Normal CDFs are exact (`ndtr`); a Beta's is exact (`betainc`, slow) at the arm's own points
and interpolated between them by cubic Hermite with the density as slope.

The error is estimated by the same sum on every other grid point: a second-order rule's error
falls by about 4 when the grid is halved, so the difference overstates the error; the tests and
bench/propensity.py check the result against millions of draws. An arm whose range (mean +- 7
deviations) lies below another arm's floor never wins (probability under 1e-11). A posterior of
another kind falls back to resampling, with a binomial error bound. Written for few numpy calls:
it runs on every routed request.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
from scipy.special import betainc, betaln, ndtr, ndtri

POINTS = 24  # quantile levels per contending arm
TAIL_Z = 7.0  # an arm's range: mean +- 7 deviations
_Q = ndtri((np.arange(POINTS) + 0.5) / POINTS)
_LEVELS = np.concatenate([[-TAIL_Z, -4.0, -3.0], _Q, [3.0, 4.0, TAIL_Z]])
# a Beta may pile up at 0 or 1
_EDGES = np.array([0.0, 1e-4, 1e-3, 0.01, 0.05, 0.95, 0.99, 0.999, 0.9999, 1.0])
_RANGE = np.array([[-TAIL_Z], [TAIL_Z]])
POINT_SD = 1e-9  # a Normal narrower than this is a point
ATOM = 1e-7  # lighter atoms are left out (an error of at most half their mass)

BETA, NORMAL, POINT = 0.0, 1.0, 2.0


@dataclass(frozen=True)
class Propensities:
    probs: np.ndarray  # per arm; sums to 1
    error: float  # estimated largest error of any arm's probability
    exact: bool  # computed (True) or resampled (False)


class Resolvable(Protocol):
    """Propensities left pending by a pick: every arm's, and their numerical error."""

    def resolve(self) -> tuple[dict[str, float], float]: ...


class Pending:
    """What a Thompson pick's propensities are computed from, computed when first asked for:
    the decision does not wait for them (the call's record asks once the answer is sent)."""

    __slots__ = ("done", "eps", "fixed", "names", "posteriors", "samples", "weight")

    def __init__(
        self,
        names: Sequence[str],
        posteriors: Sequence[Any],
        fixed: np.ndarray,
        weight: float,
        exploration_rate: float,
        samples: int = 4096,
    ) -> None:
        self.names, self.posteriors, self.fixed = list(names), list(posteriors), fixed
        self.weight, self.eps, self.samples = weight, exploration_rate, samples
        self.done: tuple[dict[str, float], float] | None = None

    def resolve(self) -> tuple[dict[str, float], float]:
        """Every arm's propensity, and the numerical error of each."""
        if self.done is None:
            p = propensities(self.posteriors, self.fixed, self.weight, self.eps, samples=self.samples)
            if not np.isfinite(p.probs).all():  # a posterior the grid cannot hold: draw instead
                p = propensities(
                    self.posteriors, self.fixed, self.weight, self.eps, samples=self.samples, computed=False
                )
            self.done = ({n: float(v) for n, v in zip(self.names, p.probs, strict=True)}, p.error)
        return self.done


def _beta_cdf(a: np.ndarray, b: np.ndarray, own: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Beta CDFs (rows) at qualities q in [0, 1]: exact at the rows' own sorted points `own`,
    cubic Hermite between them (the density is the slope; the secant where it is infinite)."""
    rows, n = q.shape
    width = own.shape[1]
    f_own = betainc(a[:, None], b[:, None], own)
    with np.errstate(divide="ignore", invalid="ignore"):
        log_dens = (a[:, None] - 1) * np.log(own) + (b[:, None] - 1) * np.log1p(-own)
        dens = np.exp(log_dens - betaln(a, b)[:, None])
    offset = 2.0 * np.arange(rows)[:, None]  # one sorted sequence: row r lives in [2r, 2r + 1]
    at = np.searchsorted((own + offset).ravel(), (q + offset).ravel(), side="right")
    base = np.repeat(np.arange(rows) * width, n)
    i0 = np.clip(at - 1, base, base + width - 2)
    flat_x, flat_y, flat_d = own.ravel(), f_own.ravel(), dens.ravel()
    x0, x1, y0, y1 = flat_x[i0], flat_x[i0 + 1], flat_y[i0], flat_y[i0 + 1]
    h = x1 - x0
    with np.errstate(divide="ignore", invalid="ignore"):
        secant = np.where(h > 0, (y1 - y0) / h, 0.0)
        d0, d1 = flat_d[i0], flat_d[i0 + 1]
        d0 = np.where(np.isfinite(d0), d0, secant) * h
        d1 = np.where(np.isfinite(d1), d1, secant) * h
        u = np.where(h > 0, (q.ravel() - x0) / h, 0.0)
    u2 = u * u
    u3 = u2 * u
    out = (2 * u3 - 3 * u2 + 1) * y0 + (u3 - 2 * u2 + u) * d0 + (3 * u2 - 2 * u3) * y1 + (u3 - u2) * d1
    return np.clip(out, y0, y1).reshape(rows, n)


def _integrate(g: np.ndarray, atoms: np.ndarray | None) -> tuple[np.ndarray, float]:
    """Each arm's probability of winning from its CDF on the grid (rows), with the error
    estimate: the difference from the same sum on every other grid point."""
    k, n = g.shape
    zeros, ones = np.zeros((k, 1)), np.ones((k, 1))
    left = g if atoms is None else g - atoms
    stack = np.stack([g, left]) if atoms is not None else g[None]
    one_row = np.ones((len(stack), 1, n))
    pre = np.concatenate([one_row, stack[:, :-1]], axis=1).cumprod(axis=1)  # arms j < i
    suf = np.concatenate([one_row, stack[:, :0:-1]], axis=1).cumprod(axis=1)[:, ::-1]  # arms j > i
    h = pre[0] * suf[0]
    h_left = h if atoms is None else pre[1] * suf[1]
    cont = g if atoms is None else g - np.cumsum(atoms, axis=1)
    total = ones if atoms is None else 1.0 - atoms.sum(axis=1, keepdims=True)
    cdf = np.concatenate([zeros, cont, total], axis=1)
    lo = np.concatenate([zeros, h], axis=1)  # the products at each interval's left end
    hi = np.concatenate([h_left, ones], axis=1)  # and at its right end (left limits)
    fine = ((cdf[:, 1:] - cdf[:, :-1]) * (lo + hi)).sum(axis=1) / 2
    cols = np.arange(0, n + 2, 2)
    if cols[-1] != n + 1:
        cols = np.append(cols, n + 1)
    if atoms is not None:  # keep every atom's point in the coarse grid
        cols = np.union1d(cols, 1 + np.flatnonzero(atoms.any(axis=0)))
    coarse_cdf = cdf[:, cols]
    ends = lo[:, cols[:-1]] + hi[:, cols[1:] - 1]
    coarse = ((coarse_cdf[:, 1:] - coarse_cdf[:, :-1]) * ends).sum(axis=1) / 2
    if atoms is not None:
        tie = pre[1] * suf[0]  # j < i strictly below the atom, j > i not above it
        won = (atoms * tie).sum(axis=1)
        fine, coarse = fine + won, coarse + won
    fine, coarse = fine / fine.sum(), coarse / coarse.sum()
    return fine, float(np.abs(fine - coarse).max())


def win_probabilities(
    posteriors: Sequence[Any], fixed: np.ndarray, weight: float
) -> tuple[np.ndarray, float] | None:
    """P(arm i is the argmax of weight * q + fixed) for each arm, and the estimated error; None
    when a posterior is of a kind without a computation here."""
    kinds = [BETA if p.kind == "beta" else NORMAL if p.kind == "normal" else -1.0 for p in posteriors]
    if -1.0 in kinds:
        return None
    kind, a, b = np.array([kinds, [p.a for p in posteriors], [p.b for p in posteriors]])
    k = len(kinds)
    c = np.asarray(fixed, dtype=np.float64)
    if not (np.isfinite(a).all() and np.isfinite(b).all() and np.isfinite(c).all()):
        return None  # what np.argmax makes of a NaN is for draws to say
    any_beta = BETA in kinds
    if weight < 0:  # w q + c = |w| (1 - q) + (c + w): reflect each posterior
        if any_beta:
            a, b = np.where(kind == BETA, b, 1.0 - a), np.where(kind == BETA, a, b)
        else:
            a = 1.0 - a
        c, weight = c + weight, -weight
    if weight == 0 or k == 1:
        one = np.zeros(k)
        one[int(np.argmax(c))] = 1.0
        return one, 0.0
    if any_beta:
        s = a + b
        mean = np.where(kind == BETA, a / s, a)
        sd = np.where(kind == BETA, np.sqrt(a * b / (s * s * (s + 1))), b)
    else:
        mean, sd = a, b
    kind = np.where((kind == NORMAL) & (sd <= POINT_SD), POINT, kind)
    bounds = weight * np.clip(mean + sd * _RANGE, 0.0, 1.0) + c  # floors, tops
    start, end = bounds[0].max(), bounds[1].max()
    # Normal arms that beat the best-looking arm less than once in 1e10 are left out too (their
    # chance, at most that, goes into the error)
    score_mean, score_sd = weight * mean + c, weight * sd
    best = int(np.argmax(score_mean))
    with np.errstate(divide="ignore", invalid="ignore"):
        beats = ndtr((score_mean - score_mean[best]) / np.hypot(score_sd, score_sd[best]))
    beats = np.where(kind == BETA, 1.0, np.nan_to_num(beats, nan=1.0))
    beats[best] = 1.0
    keep = (bounds[1] >= start) & (beats > 1e-10)
    contend = np.flatnonzero(keep)
    left_out = float(beats[~keep & (bounds[1] >= start)].sum())
    if len(contend) == 1:
        one = np.zeros(k)
        one[contend[0]] = 1.0
        return one, left_out
    kc, ac, bc, cc, mc, sc = kind[contend], a[contend], b[contend], c[contend], mean[contend], sd[contend]
    own = np.clip(mc[:, None] + sc[:, None] * _LEVELS, 0.0, 1.0)
    normal, point = kc == NORMAL, kc == POINT
    # a clipped Normal's atoms at 0 and 1, and points: heavier than ATOM, they are grid points
    with np.errstate(divide="ignore", invalid="ignore"):
        tails = ndtr(np.array([-ac, ac - 1.0]) / bc)
    tails = np.where(normal, tails, 0.0)
    heavy = tails > ATOM
    spots_list = [np.where(heavy[0], cc, np.nan), np.where(heavy[1], weight + cc, np.nan)]
    if point.any():
        spots_list.append(np.where(point, weight * np.clip(ac, 0.0, 1.0) + cc, np.nan))
    spots = np.array(spots_list)  # (atom kinds, arms), nan where none
    has_atoms = bool(heavy.any() or point.any())
    pts = [(weight * own + cc[:, None]).ravel(), [start, end]]
    if has_atoms:
        pts.append(spots[~np.isnan(spots)])
    any_beta = bool((kc == BETA).any())
    if any_beta:
        pts.append((weight * _EDGES + cc[kc == BETA, None]).ravel())
    grid = np.sort(np.concatenate(pts))
    grid = grid[(grid >= start) & (grid <= end)]
    q = (grid - cc[:, None]) / weight  # >= 0: every grid point is at or above each arm's floor
    with np.errstate(divide="ignore", invalid="ignore"):
        g = np.where(q >= 1.0, 1.0, ndtr((q - ac[:, None]) / bc[:, None]))
    if point.any():
        g[point] = np.where(q[point] >= np.clip(ac[point, None], 0.0, 1.0), 1.0, 0.0)
    if any_beta:
        beta = kc == BETA
        edges = np.broadcast_to(_EDGES, (int(beta.sum()), len(_EDGES)))
        own_beta = np.sort(np.concatenate([own[beta], edges], axis=1))
        g[beta] = _beta_cdf(ac[beta], bc[beta], own_beta, np.minimum(q[beta], 1.0))
    atoms = None
    if has_atoms:
        masses = np.vstack([tails, point.astype(float)])[: len(spots)]
        found = ~np.isnan(spots)
        atoms = np.zeros_like(g)
        kinds_at, arms_at = np.nonzero(found)
        atoms[arms_at, np.searchsorted(grid, np.clip(spots[found], start, end))] = masses[kinds_at, arms_at]
    wins, error = _integrate(g, atoms)
    out = np.zeros(k)
    out[contend] = wins
    return out, error + left_out


def propensities(
    posteriors: Sequence[Any],
    fixed: np.ndarray,
    weight: float,
    exploration_rate: float,
    rng: np.random.Generator | None = None,
    samples: int = 4096,
    computed: bool = True,
) -> Propensities:
    """Each arm's probability of being picked (EXPLORATION_RATE mixed in), and its error."""
    k = len(posteriors)
    eps = exploration_rate
    found = win_probabilities(posteriors, fixed, weight) if computed else None
    if found is not None:
        wins, error = found
        return Propensities(eps / k + (1 - eps) * wins, (1 - eps) * error, True)
    # resampling, for a posterior of another kind: a bound of 4 binomial standard errors
    rng = rng if rng is not None else np.random.default_rng()
    draws = np.stack([p.sample(rng, samples) for p in posteriors], axis=1)
    wins = np.bincount(np.argmax(weight * draws + fixed, axis=1), minlength=k) / samples
    error = 4 * float(np.sqrt(np.max(np.maximum(wins * (1 - wins), 1 / samples)) / samples))
    return Propensities(eps / k + (1 - eps) * wins, (1 - eps) * error, False)
