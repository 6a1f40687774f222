"""Per-caller limits, counted in the shared state (`gateway.shared`) so that they hold across
replicas: requests and tokens a minute (RATE_LIMIT_RPM / RATE_LIMIT_TPM, or a virtual key's own),
and a virtual key's budgets (USD a UTC day, a UTC month, in total).

A request takes one request unit when it arrives (`admit`, which also reads the tokens and budgets
left, for the headers); a chat call is admitted once its body is read, in the same operation as its
estimated prompt tokens (one round trip to a shared server, and still before any routing work).
Once routed, a call of a key with a budget holds its estimated cost (prompt plus maximum output at
the price of the dearest model it may end on) against every budget, all or none (`spend`). When the
call ends, however it ends (streams included), the reservation is settled with what the call really
used and cost, so a long answer leaves a token debt the caller's next calls wait out; a call refused
before it went upstream releases its reservation.

Budgets: the shared counters are the fast path; the store's call records are the ledger. A counter
that does not exist (a new period, a restarted server, a new process without REDIS_URL) starts from
the ledger's sum for its period, so a restart never hands a key its budget again.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import Protocol

from gateway.domain import VirtualKey, utcnow
from gateway.errors import BudgetExceeded, RateLimited
from gateway.shared import Cell, Op, Outcome, Rate, SharedState, Sum

log = logging.getLogger("gateway.limits")

NANO = 1_000_000_000  # spend is counted in nano-USD: integers, exact, and a call of one token counts


@dataclass(frozen=True, slots=True)
class Budget:
    period: str  # day | month | total
    usd: float


@dataclass(frozen=True, slots=True)
class Policy:
    """What limits one caller: 0 (and no budget) means none."""

    rpm: int = 0
    tpm: int = 0
    budgets: tuple[Budget, ...] = ()

    @property
    def limited(self) -> bool:
        return bool(self.rpm or self.tpm or self.budgets)


@dataclass(frozen=True, slots=True)
class Quota:
    """One family of x-ratelimit-* headers: requests, tokens, usd-day, usd-month, usd-total."""

    name: str
    limit: float
    remaining: float
    reset_s: float | None  # None: it never resets (a total budget)


class Ledger(Protocol):
    async def spent(self, key_id: str, since: datetime) -> float:
        """USD spent with the virtual key `key_id` on calls since `since`."""
        ...


def period_bounds(period: str, now: datetime) -> tuple[str, datetime, datetime | None]:
    """A budget period's id, start and end (UTC; a total budget never ends)."""
    if period == "day":
        start = now.replace(hour=0, minute=0, second=0, microsecond=0)
        return start.strftime("%Y%m%d"), start, start + timedelta(days=1)
    if period == "month":
        start = now.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
        end = (start + timedelta(days=32)).replace(day=1)
        return start.strftime("%Y%m"), start, end
    return "all", datetime(1970, 1, 1, tzinfo=now.tzinfo), None


def duration(seconds: float) -> str:
    """As OpenAI writes x-ratelimit-reset-*: 20ms, 1.5s, 6m0s, 13h2m5s."""
    if seconds < 1:
        return f"{max(0, math.ceil(seconds * 1000))}ms"
    if seconds < 60:
        return f"{seconds:.3g}s"
    whole = math.ceil(seconds)
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes}m{secs}s" if hours else f"{minutes}m{secs}s"


def _usd(value: float) -> bytes:
    return f"{value:.6f}".rstrip("0").rstrip(".").encode() if value else b"0"


def headers(quotas: Sequence[Quota]) -> list[tuple[bytes, bytes]]:
    """OpenAI's x-ratelimit-limit-*, -remaining-* and -reset-* headers (money in USD)."""
    out: list[tuple[bytes, bytes]] = []
    for q in quotas:
        name = q.name.encode()
        money = q.name.startswith("usd")
        out.append((b"x-ratelimit-limit-" + name, _usd(q.limit) if money else str(int(q.limit)).encode()))
        remaining = _usd(max(0.0, q.remaining)) if money else str(max(0, int(q.remaining))).encode()
        out.append((b"x-ratelimit-remaining-" + name, remaining))
        if q.reset_s is not None:
            out.append((b"x-ratelimit-reset-" + name, duration(q.reset_s).encode()))
    return out


class Reservation:
    """Tokens and spend held for one call; settled (or released) exactly once."""

    def __init__(
        self, limits: RateLimits, who: str, policy: Policy, tokens: int, nano: int, periods: tuple[str, ...]
    ) -> None:
        self.limits, self.who, self.policy = limits, who, policy
        self.tokens, self.nano, self.periods = tokens, nano, periods
        self.done = False

    def settle(self, used_tokens: int, cost_usd: float = 0.0) -> None:
        """The call used `used_tokens` and cost `cost_usd`: the differences are charged (in the
        background: the response does not wait for it)."""
        if self.done:
            return
        self.done = True
        ops: list[Op] = []
        if self.policy.tpm and used_tokens != self.tokens:
            ops.append(
                Rate(self.limits.cell(self.who, "t"), used_tokens - self.tokens, self.policy.tpm, check=False)
            )
        delta = round(cost_usd * NANO) - self.nano
        if delta:
            ops += [Sum(self.limits.cell(self.who, "usd", p), delta) for p in self.periods]
        if ops:
            self.limits.later(ops, self.who)

    def release(self) -> None:
        """The call never went upstream: everything goes back."""
        self.settle(0, 0.0)


class RateLimits:
    def __init__(
        self,
        shared: SharedState,
        *,
        rpm: int = 0,
        tpm: int = 0,
        ledger: Ledger | None = None,
        now: Callable[[], datetime] = utcnow,
    ) -> None:
        self.shared = shared
        self.rpm, self.tpm = rpm, tpm
        self.ledger = ledger
        self.now = now
        self.pending: set[asyncio.Task[None]] = set()

    @staticmethod
    def cell(who: str, kind: str, period: str = "") -> str:
        # The caller in a hash tag: every key of one operation in one cluster slot.
        return f"{{{who}}}:{kind}" + (f":{period}" if period else "")

    def policy(self, key: VirtualKey | None) -> Policy:
        """A virtual key's own limits (None: the gateway's) and budgets; the gateway's otherwise."""
        if key is None:
            return Policy(self.rpm, self.tpm)
        budgets = tuple(
            Budget(p, usd)
            for p, usd in (
                ("day", key.budget_day_usd),
                ("month", key.budget_month_usd),
                ("total", key.budget_total_usd),
            )
            if usd is not None
        )
        return Policy(
            self.rpm if key.rpm is None else key.rpm, self.tpm if key.tpm is None else key.tpm, budgets
        )

    def _budget_ops(self, who: str, policy: Policy, nano: int, now: datetime) -> list[Sum]:
        ops = []
        for b in policy.budgets:
            pid, _, end = period_bounds(b.period, now)
            ttl = None if end is None else int((end - now).total_seconds()) + 86_400
            ops.append(
                Sum(self.cell(who, "usd", pid), nano, cap=round(b.usd * NANO) if nano else None, ttl_s=ttl)
            )
        return ops

    async def _apply(self, ops: list[Op], who: str, *, seed: bool = True) -> Outcome:
        """`ops`, with any missing spend counter seeded from the ledger first (`seed`)."""
        outcome = await self.shared.apply(ops)
        missing = [i for i, c in enumerate(outcome.cells) if c.missing]
        if not missing or not seed:
            return outcome
        now = self.now()
        for i in missing:
            op = ops[i]
            assert isinstance(op, Sum)
            pid = op.key.rsplit(":", 1)[1]
            period = "total" if pid == "all" else "day" if len(pid) == 8 else "month"
            _, start, _ = period_bounds(period, now)
            spent = await self.ledger.spent(who, start) if self.ledger is not None else 0.0
            ops[i] = replace(op, seed=round(spent * NANO))
        return await self.shared.apply(ops)

    def _quotas(self, policy: Policy, ops: Sequence[Op], cells: Sequence[Cell], now: datetime) -> list[Quota]:
        out: list[Quota] = []
        sums = [cell for op, cell in zip(ops, cells, strict=True) if isinstance(op, Sum)]
        for op, cell in zip(ops, cells, strict=True):
            if isinstance(op, Rate):
                name = "requests" if op.key.endswith(":r") else "tokens"
                out.append(Quota(name, op.limit, cell.value, cell.reset_s))
        for b, cell in zip(policy.budgets, sums, strict=True):
            if not cell.missing:
                _, _, end = period_bounds(b.period, now)
                reset = None if end is None else (end - now).total_seconds()
                out.append(Quota(f"usd-{b.period}", b.usd, b.usd - cell.value / NANO, reset))
        return out

    async def admit(
        self, who: str, policy: Policy, tokens: int | None = None
    ) -> tuple[Reservation | None, list[Quota], RateLimited | None]:
        """Takes one request and, for a chat call, holds its estimated prompt `tokens` (both or
        neither, in one operation); reads what is left of the tokens and budgets for the headers."""
        if tokens is not None and policy.tpm and tokens > policy.tpm:
            return (
                None,
                [],
                RateLimited(
                    f"this request (about {tokens} tokens) is larger than the limit of {policy.tpm} "
                    "tokens per minute",
                    "tokens",
                    None,
                ),
            )
        now = self.now()
        ops: list[Op] = []
        if policy.rpm:
            ops.append(Rate(self.cell(who, "r"), 1, policy.rpm))
        if policy.tpm:
            ops.append(Rate(self.cell(who, "t"), tokens or 0, policy.tpm, check=bool(tokens)))
        ops += self._budget_ops(who, policy, 0, now)  # peeks; the spend op seeds them
        outcome = await self._apply(ops, who, seed=False)
        quotas = self._quotas(policy, ops, outcome.cells, now)
        if outcome.applied:
            held = Reservation(self, who, policy, tokens or 0, 0, ()) if tokens and policy.tpm else None
            return held, quotas, None
        cell = outcome.cells[0]
        wait = cell.retry_s or 0.0
        if policy.rpm and not cell.ok:
            message = f"rate limit reached: {policy.rpm} requests per minute; try again in {wait:.1f} s"
            return None, quotas, RateLimited(message, "requests", wait)
        wait = outcome.cells[1 if policy.rpm else 0].retry_s or 0.0
        message = f"rate limit reached: {policy.tpm} tokens per minute; try again in {wait:.1f} s"
        return None, quotas, RateLimited(message, "tokens", wait)

    async def spend(
        self, who: str, policy: Policy, cost_usd: float, held: Reservation | None
    ) -> tuple[Reservation | None, list[Quota], RateLimited | None]:
        """Holds a routed call's estimated cost against every budget (all or none), beside the
        tokens `held` at admission (the reservation returned holds both)."""
        if not policy.budgets:
            return held, [], None
        now = self.now()
        nano = max(0, round(cost_usd * NANO))
        ops = self._budget_ops(who, policy, nano, now)
        outcome = await self._apply(list(ops), who)
        quotas = self._quotas(policy, ops, outcome.cells, now)
        if not outcome.applied:
            return held, quotas, self._over_budget(policy, cost_usd, outcome.cells, now)
        periods = tuple(op.key.rsplit(":", 1)[1] for op in ops)
        if held is None:
            held = Reservation(self, who, policy, 0, 0, ())
        held.nano, held.periods = nano, periods
        return held, quotas, None

    def _over_budget(
        self, policy: Policy, cost_usd: float, cells: Sequence[Cell], now: datetime
    ) -> RateLimited:
        for b, cell in zip(policy.budgets, cells, strict=True):
            if cell.ok:
                continue
            _, _, end = period_bounds(b.period, now)
            spent = cell.value / NANO
            when = "it never resets (a total budget)" if end is None else f"it resets at {end.isoformat()}"
            return BudgetExceeded(
                f"budget exceeded: this key has spent ${spent:.6f} of its ${b.usd:g} {b.period} budget "
                f"and this call is estimated at up to ${cost_usd:.6f}; {when}",
                b.period,
                None if end is None else (end - now).total_seconds(),
                resets_at=None if end is None else end,
            )
        raise AssertionError("a refused operation without a refused cell")  # pragma: no cover

    def later(self, ops: list[Op], who: str) -> None:
        """Applies `ops` in the background (settling): the call's answer is already on its way."""

        async def run() -> None:
            try:
                await self._apply(ops, who)
            except Exception as exc:
                log.warning("could not settle a reservation of %s: %s", who, exc)

        task = asyncio.get_running_loop().create_task(run())
        self.pending.add(task)
        task.add_done_callback(self.pending.discard)

    async def drain(self) -> None:
        """Waits for the settlements in flight (at shutdown)."""
        if self.pending:
            await asyncio.wait(list(self.pending), timeout=5)
