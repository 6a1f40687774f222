"""Per-caller limits, counted in the shared state (`gateway.shared`) so that they hold across
replicas: requests and tokens a minute (RATE_LIMIT_RPM / RATE_LIMIT_TPM, or a virtual key's own),
and a virtual key's budgets (USD a UTC day, a UTC month, in total).

A request takes one request unit when it arrives (`admit`, which also reads the tokens and budgets
left, for the headers); a call that goes upstream is admitted once its body is read, in the same
operation as its estimated tokens (prompt plus most output) and, for a key with budgets, its
estimated cost (the same tokens at the price of the dearest model it may end on) against every
budget: all or none, one round trip to a shared server. A key without budgets is admitted before
any routing work; a key with budgets once routed (the cost depends on the models chosen). When the
call ends, however it ends (streams included), the reservation is settled with what the call really
used and cost (with the next admission, in its round trip, or 20 ms later at most), so a long
answer leaves a token debt the caller's next calls wait out; a call refused before it went upstream
releases its reservation.

Budgets: the shared counters are the fast path; the store's call records are the ledger. A counter
that does not exist (a new period, a restarted server, a new process without REDIS_URL) starts from
the ledger's sum for its period, so a restart never hands a key its budget again.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from datetime import date, datetime, timedelta, tzinfo
from typing import Protocol

from gateway.domain import VirtualKey, utcnow
from gateway.errors import BudgetExceeded, RateLimited
from gateway.shared import Cell, Op, Outcome, Rate, SharedState, Sum

log = logging.getLogger("gateway.limits")

SETTLE_AFTER_S = 0.02  # a settlement waits at most this long for an admission to ride with
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
    return _bounds(period, now.date(), now.tzinfo)


@functools.lru_cache(maxsize=64)
def _bounds(period: str, day: date, tz: tzinfo | None) -> tuple[str, datetime, datetime | None]:
    now = datetime(day.year, day.month, day.day, tzinfo=tz)
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
        self.unsettled: list[tuple[list[Op], str]] = []
        self.settle_timer: asyncio.TimerHandle | None = None

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
        self, who: str, policy: Policy, tokens: int | None = None, cost_usd: float = 0.0
    ) -> tuple[Reservation | None, list[Quota], RateLimited | None]:
        """Takes one request and, for a call that goes upstream, holds its estimated prompt
        `tokens` and, for a key with budgets, its estimated `cost_usd` against every budget: all or
        none, in one operation (one round trip to a shared server). Reads what is left of the tokens
        and budgets for the headers (a cost of 0 only reads the budgets)."""
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
        nano = max(0, round(cost_usd * NANO)) if policy.budgets else 0
        ops: list[Op] = []
        if policy.rpm:
            ops.append(Rate(self.cell(who, "r"), 1, policy.rpm))
        if policy.tpm:
            ops.append(Rate(self.cell(who, "t"), tokens or 0, policy.tpm, check=bool(tokens)))
        rates = len(ops)
        ops += self._budget_ops(who, policy, nano, now)  # nano 0: peeks (a spend seeds them)
        if self.unsettled:  # the settlements waiting go first, in the same round trip: their tasks
            self._settle()  # take a first step (applied in-process, or sent on the pipelined
            await asyncio.sleep(0)  # connection, answered in order) before this admission is applied
        outcome = await self._apply(ops, who, seed=bool(nano))
        quotas = self._quotas(policy, ops, outcome.cells, now)
        if outcome.applied:
            held_tokens = (tokens or 0) if policy.tpm else 0
            if not (held_tokens or nano):
                return None, quotas, None
            periods = tuple(op.key.rsplit(":", 1)[1] for op in ops[rates:]) if nano else ()
            return Reservation(self, who, policy, held_tokens, nano, periods), quotas, None
        cell = outcome.cells[0]
        if policy.rpm and not cell.ok:
            wait = cell.retry_s or 0.0
            message = f"rate limit reached: {policy.rpm} requests per minute; try again in {wait:.1f} s"
            return None, quotas, RateLimited(message, "requests", wait)
        cell = outcome.cells[rates - 1] if policy.tpm else cell
        if policy.tpm and not cell.ok:
            wait = cell.retry_s or 0.0
            message = f"rate limit reached: {policy.tpm} tokens per minute; try again in {wait:.1f} s"
            return None, quotas, RateLimited(message, "tokens", wait)
        return None, quotas, self._over_budget(policy, cost_usd, outcome.cells[rates:], now)

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
        """Applies `ops` in the background (settling: the call's answer is already on its way), with
        the next admission (one round trip to a shared server carries both) or after
        SETTLE_AFTER_S, whichever comes first."""
        self.unsettled.append((ops, who))
        if self.settle_timer is None:
            self.settle_timer = asyncio.get_running_loop().call_later(SETTLE_AFTER_S, self._settle)

    def _settle(self) -> None:
        if self.settle_timer is not None:
            self.settle_timer.cancel()
            self.settle_timer = None
        batch, self.unsettled = self.unsettled, []
        for ops, who in batch:
            task = asyncio.get_running_loop().create_task(self._settle_one(ops, who))
            self.pending.add(task)
            task.add_done_callback(self.pending.discard)

    async def _settle_one(self, ops: list[Op], who: str) -> None:
        try:
            await self._apply(ops, who)
        except Exception as exc:
            log.warning("could not settle a reservation of %s: %s", who, exc)

    async def drain(self) -> None:
        """Waits for the settlements in flight (at shutdown)."""
        self._settle()
        if self.pending:
            await asyncio.wait(list(self.pending), timeout=5)
