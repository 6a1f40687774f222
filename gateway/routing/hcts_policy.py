"""ROUTER_POLICY=hcts (the default): HCTS (`gateway.routing.hcts`) behind the policies' seam.

- A decision: the request's embedding, its eligible arms and each arm's pre-call cost estimate
  (prompt tokens x input price + the arm's mean completion tokens x output price), and its dial
  (the request's, else ROUTER_DIAL_MODE / ROUTER_DIAL_TARGET). What the decision knew is kept
  under the request's key until its call ends and, a while longer, for its rating.
- Every finished call is observed (the prompt counts for the clusters, the cost for a budget dial);
  every rating, whenever it comes. Ratings of other replicas (and, at start, every rated call in
  the store within RECENCY_DAYS) come in through `sync`, as for `lin_ts`.
- Re-clustering (k-means over the prompts seen) runs in a thread, never on the request path.
- At start, what the gateway had learnt when it last stopped (ROUTER_STATE_KEEP: saved by `keep`)
  is the starting point, unless `llm-router fit` wrote a state (ROUTER_STATE_PATH) since that
  gateway started; else the fitted state; else the catalogue's `quality` hints are the arms'
  prior means and their prices the cost scale.
One model for every tenant (its arm statistics are not split by tenant).
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import ClassVar, TypeVar

import numpy as np
from threadpoolctl import threadpool_limits

from gateway.config import Settings
from gateway.domain import utcnow
from gateway.routing import hcts_state
from gateway.routing.bandit import ArmView, Choice, Posterior
from gateway.routing.hcts import Hcts, Ticket
from gateway.routing.hcts_dial import DialSpec
from gateway.routing.hcts_math import compute_clusters
from gateway.routing.seam import FinishedCall, Observed, PolicyDeps, PolicyRequest, thompson
from gateway.store import Key

T = TypeVar("T")

log = logging.getLogger("gateway.router")

OPEN_TICKETS = 20_000  # decisions whose calls have not ended (the oldest are dropped beyond)
DONE_TICKETS = 50_000  # ended calls whose ratings may still come
ABSORBED = 200_000  # ratings remembered (so that a sync does not apply one twice)


def default_dial(settings: object) -> DialSpec:
    """The gateway's dial (ROUTER_DIAL_MODE / ROUTER_DIAL_TARGET; Settings' defaults if unset)."""
    fields = Settings.model_fields
    return DialSpec(
        getattr(settings, "router_dial_mode", fields["router_dial_mode"].default),
        getattr(settings, "router_dial_target", fields["router_dial_target"].default),
    )


def chat_arms(settings: Settings) -> tuple[list[str], np.ndarray]:
    """The arms (models that chat, in catalogue order) and their prior means (the catalogue's
    `quality` hints; nan: none)."""
    chat = [m for m in settings.models if "chat" in m.capabilities]
    return [m.name for m in chat], np.array([np.nan if m.quality is None else m.quality for m in chat])


def _quietly(fn: Callable[..., T], *args: object) -> T:
    """`fn` on one BLAS thread: a re-clustering in the background must leave the event loop its
    core (OpenBLAS would take every core for k-means's products)."""
    with threadpool_limits(limits=1, user_api="blas"):
        return fn(*args)


class _Propensities:
    """A lazy pick's propensities (`gateway.routing.bandit.Choice.pending`): its ticket fills them
    once; the candidates of the record get theirs then."""

    def __init__(self, ticket: Ticket, names: list[str], idx: np.ndarray, candidates: list[dict]) -> None:
        self.ticket, self.names, self.idx, self.candidates = ticket, names, idx, candidates
        self.done: tuple[dict[str, float], float] | None = None

    def resolve(self) -> tuple[dict[str, float], float]:
        if self.done is None:
            error = self.ticket.resolve()
            props = self.ticket.props
            out = {name: float(props[i]) for name, i in zip(self.names, self.idx, strict=True)}
            for c in self.candidates:
                c["propensity"] = round(out[c["model"]], 6)
            self.done = (out, error)
        return self.done


def core_seed(rng: np.random.Generator) -> int:
    """The core's seed, drawn from the gateway's Generator (its first draw when the policy is made)."""
    return int(rng.integers(2**62))


class HctsPolicy:
    needs_embedding: ClassVar[bool] = True
    layer: ClassVar[str] = "bandit"

    def __init__(self, deps: PolicyDeps, core: Hcts | None = None) -> None:
        self.deps = deps
        s = deps.settings
        self.arms, self.prior = chat_arms(s)
        self.index = {name: i for i, name in enumerate(self.arms)}
        self.dial = default_dial(s)
        self.seed = core_seed(deps.rng)
        self.open: OrderedDict[Key, Ticket] = OrderedDict()
        self.done: OrderedDict[Key, Ticket] = OrderedDict()
        self.absorbed: OrderedDict[Key, float] = OrderedDict()
        self.synced = utcnow() - timedelta(days=s.recency_days)
        self.answers: dict[str, float] = {}  # a fitted state's answer lengths (kept by `keep`)
        self.fitted = hcts_state.signature(hcts_state.state_file(s))  # the fit beside us now
        self.clustering: asyncio.Task[None] | None = None
        self.core = core if core is not None else self._stored()

    def _stored(self) -> Hcts | None:
        """The live state (ROUTER_STATE_KEEP) unless the fitted file is not the one its gateway
        started beside (a fit written since), else the fitted state."""
        s = self.deps.settings
        fitted, live = hcts_state.state_file(s), hcts_state.live_file(s)
        paths = [fitted] if self.fitted is not None else []
        if s.router_state_keep and live.exists():
            paths.insert(0, live)
        for path in paths:
            try:
                core = hcts_state.load(path, self.arms, self.dial, embedder=self.deps.embedder)
                kept = hcts_state.live(path)
                answers = hcts_state.answer_lengths(path)
            except Exception as exc:  # a broken file must not keep the gateway from starting
                log.warning("cannot load the router state %s (%s); starting without it", path, exc)
                continue
            if core is None:
                continue
            if kept is not None and kept.fitted != self.fitted:
                log.info("`llm-router fit` wrote %s since %s was saved: starting from the fit", fitted, path)
                continue
            core.inline = False
            self.answers = {m: n for m, n in answers.items() if m in self.index}
            self.deps.arms.expected_answers.update(self.answers)
            if kept is not None:  # what it had absorbed of the store's ratings: not applied twice
                self.synced = max(self.synced, datetime.fromisoformat(kept.synced))
                self.absorbed.update(kept.absorbed)
            log.info(
                "router state loaded from %s (%d prompts, %d rated)", path, core.model.seen, core.model.rated
            )
            return core
        return None

    async def keep(self) -> None:
        """What HCTS learnt, saved for the next start (ROUTER_STATE_KEEP), when the gateway stops:
        a restart goes on from it (its clusters, its dial's multiplier, its cost corrections, the
        prompts of unrated calls), not from the store's rated calls alone."""
        s, core = self.deps.settings, self.core
        if not s.router_state_keep or core is None or core.model.seen == 0 or self.deps.embedder is None:
            return  # (no embedder: a start that failed to load one must not overwrite a good state)
        path, t0 = hcts_state.live_file(s), time.perf_counter()
        # a snapshot on the event loop (nothing moves it while the thread writes), with its books
        state = copy.deepcopy(core.state())
        kept = hcts_state.Live(self.synced.isoformat(), dict(self.absorbed), self.fitted)
        args = (state, self.arms, path, self.deps.embedder, self.answers, kept, False)
        try:
            await asyncio.to_thread(hcts_state.save, *args)
        except Exception as exc:  # the next start rebuilds from the store, as without it
            log.warning("cannot save the router state to %s: %s", path, exc)
            return
        log.info(
            "router state saved to %s (%d prompts, %d rated) in %.2f s",
            path, core.model.seen, core.model.rated, time.perf_counter() - t0,
        )  # fmt: skip

    def _core(self, dim: int) -> Hcts | None:
        if self.core is None:
            self.core = Hcts(len(self.arms), dim, self.seed, dial=self.dial, prior=self.prior, inline=False)
        return self.core if self.core.dim == dim else None

    # --- deciding
    async def choose(
        self,
        views: list[ArmView],
        embedding: np.ndarray | None,
        timings: dict[str, float],
        tenant: str = "",
        request: PolicyRequest | None = None,
    ) -> Choice:
        core = self._core(len(embedding)) if embedding is not None else None
        elig = [self.index.get(v.name) for v in views]
        if core is None or embedding is None or any(i is None for i in elig):
            return thompson(views, self.deps.knobs, self.deps.rng, timings)
        t = time.perf_counter()
        costs = np.zeros(len(self.arms))
        idx = np.array(elig, dtype=np.int64)
        costs[idx] = [v.cost_usd for v in views]
        pick = core.choose(embedding, idx, costs, request.dial if request else None, lazy=True)
        timings["sample_ms"] = (time.perf_counter() - t) * 1000
        if request is not None:
            self._keep(self.open, (request.tenant, request.request_id), pick.ticket, OPEN_TICKETS)
        for view, i in zip(views, idx, strict=True):
            view.posterior = Posterior("normal", float(pick.means[i]), float(pick.sd[i]))
        order = sorted(range(len(views)), key=lambda j: -float(pick.objective[idx[j]]))
        chosen = next(j for j in order if idx[j] == pick.arm)
        order = [chosen, *(j for j in order if j != chosen)]
        candidates = [
            {
                "model": views[j].name,
                "score": round(float(pick.objective[idx[j]]), 4),
                "quality_sample": round(float(pick.samples[idx[j]]), 4),
                "quality_mean": round(float(pick.means[idx[j]]), 4),
                "cost_estimate_usd": float(f"{pick.costs[idx[j]]:.4g}"),  # as the decision priced it
            }
            for j in order
        ]
        # every eligible arm's propensity, exact (closed form, with the uniform floor), computed
        # while the call is upstream (`Decision.resolve`): the decision does not wait for them
        return Choice(
            arm=self.arms[pick.arm],
            explored=pick.explored,
            propensity=None,
            ranking=[views[j].name for j in order],
            candidates=candidates,
            pending=_Propensities(pick.ticket, [v.name for v in views], idx, candidates),
        )

    # --- learning
    @staticmethod
    def _keep(book: OrderedDict[Key, Ticket], key: Key, ticket: Ticket, cap: int) -> None:
        book[key] = ticket
        while len(book) > cap:
            book.popitem(last=False)

    def observe_call(self, call: FinishedCall) -> None:
        key = (call.caller, call.request_id)
        ticket = self.open.pop(key, None)
        if ticket is None or self.core is None:
            return
        arm = self.index.get(call.model or "", -1)
        self.core.observe_call(ticket, ticket.x, arm, call.cost_usd if call.ok else None)
        if call.ok and arm == ticket.arm:
            self._keep(self.done, key, ticket, DONE_TICKETS)
        self._maybe_recluster()

    def observe(self, rating: Observed) -> None:
        key = (rating.caller, rating.request_id)
        arm = self.index.get(rating.model)
        previous = self.absorbed.get(key)
        if arm is None or previous == rating.score:
            return
        ticket = self.done.get(key)
        x = rating.embedding if rating.embedding is not None else (ticket.x if ticket is not None else None)
        core = self._core(len(x)) if x is not None else None
        if core is None or x is None:
            return
        x = np.asarray(x, dtype=np.float32)
        seq = None
        if previous is None and ticket is None:  # a call this policy did not see: count its prompt
            seq = core.observe_call(None, x, arm, None)
        core.observe_rating(x, arm, rating.score, previous, ticket if previous is None else None, seq)
        self.absorbed[key] = rating.score
        self.absorbed.move_to_end(key)
        while len(self.absorbed) > ABSORBED:
            self.absorbed.popitem(last=False)
        self._maybe_recluster()

    def _maybe_recluster(self) -> None:
        core = self.core
        if (
            core is None
            or not core.model.due()
            or (self.clustering is not None and not self.clustering.done())
        ):
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # no loop (a script): at once
            core.recluster()
            return
        self.clustering = loop.create_task(
            self._recluster(core, core.model.snapshot(), core.recluster_seed())
        )

    async def _recluster(self, core: Hcts, x: np.ndarray, seed: int) -> None:
        try:
            result = await asyncio.to_thread(_quietly, compute_clusters, x, core.kn, seed)
        except Exception as exc:
            log.warning("re-clustering failed: %s", exc)
            return
        core.model.apply(result)

    async def settle(self) -> None:
        """Waits for a re-clustering under way (the lab, tests; the warm-up at start)."""
        while self.clustering is not None and not self.clustering.done():
            await asyncio.shield(self.clustering)

    async def aclose(self) -> None:
        if self.clustering is not None and not self.clustering.done():
            self.clustering.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self.clustering
        await self.keep()

    async def sync(self) -> None:
        """Ratings this replica did not take (other replicas'; at start, the store's), once each."""
        store, embedder = self.deps.store, self.deps.embedder
        if store is None or embedder is None:
            return  # without an embedder, no request has an embedding to use what it would learn
        while True:
            rows = await store.rated_since(self.synced - timedelta(seconds=10), limit=10_000)
            todo = [r for r in rows if self.absorbed.get(r.key) != r.score]
            embeddings = await store.embeddings_of([r.key for r in todo], embedder) if todo else {}
            for r in todo:
                if r.key in embeddings:
                    self.observe(Observed(r.caller, r.request_id, r.model, r.score, None, embeddings[r.key]))
            # the mark moves once the rows are applied (a sync cancelled in between must not
            # leave it past ratings it never applied: a state saved then would skip them)
            self.synced = max([self.synced, *(r.at for r in rows)])
            await self.settle()
            if len(rows) < 10_000 or not todo:
                return
