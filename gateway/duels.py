"""Duels and the blind judge: the DPO flywheel's way of making pairs on purpose.

With probability DUEL_RATE, a bandit-routed call also goes, in the background and after the caller
has its answer, to the runner-up arm of the same decision; its answer is stored as
`{request_id}:duel` and costed. With a JUDGE_MODEL, the judge then rates both answers, shown in
random order (see `gateway.dpo` for the rubric and the strict verdict), as feedback with source
`judge`, which never overrides a human's.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable
from typing import Any

from gateway import dpo
from gateway.calls import Meter, Sink, account
from gateway.config import Settings
from gateway.domain import CallRecord, Feedback
from gateway.errors import GatewayError
from gateway.routing import Decision
from gateway.upstreams import Upstreams
from gateway.wire import Completion, estimate_tokens

log = logging.getLogger("gateway.duels")

MAX_BACKGROUND = 64  # duels (and their judging) in flight at once; more are skipped


class Duels:
    def __init__(
        self,
        settings: Settings,
        upstreams: Upstreams,
        recorder: Sink,
        metrics: Meter,
        learn: Callable[[Feedback], Awaitable[Any]],
        *,
        rng: random.Random | None = None,
        redact: Callable[[str], str] = str,
    ) -> None:
        self.settings = settings
        self.upstreams = upstreams
        self.recorder = recorder
        self.metrics = metrics
        self.learn = learn
        self.rng = rng or random.Random()
        # The judge's blind order has a source of its own: which duels run, and when each one's
        # judging starts, must not decide what the judge is shown first (with a seed, the orders
        # are the same however the background tasks interleave).
        self.order_rng = random.Random(self.rng.getrandbits(64))
        self.redact = redact
        self.background: set[asyncio.Task[None]] = set()

    def maybe_start(self, record: CallRecord, decision: Decision, body: dict[str, Any]) -> None:
        if self.settings.duel_rate <= 0 or record.status != "ok" or decision.layer != "bandit":
            return
        if self.rng.random() >= self.settings.duel_rate:
            return
        runner_up = next((m for m in decision.fallbacks if m != record.model), None)
        if runner_up is None or len(self.background) >= MAX_BACKGROUND:
            return
        task = asyncio.get_running_loop().create_task(self._duel(record, runner_up, body))
        self.background.add(task)
        task.add_done_callback(self.background.discard)

    async def drain(self, timeout: float = 10.0) -> None:  # noqa: ASYNC109 - a shutdown bound
        """Let running duels finish (they are still recorded), then cancel what is left."""
        if self.background:
            _, pending = await asyncio.wait(set(self.background), timeout=timeout)
            for task in pending:
                task.cancel()

    async def _call(self, model: str, body: dict[str, Any], rec: CallRecord) -> CallRecord:
        """One call to one model (no fallbacks), filled into `rec`; recording is the caller's."""
        t0 = time.perf_counter()
        try:
            result = await self.upstreams.chat([model], body)
        except GatewayError as exc:
            rec.status, rec.http_status, rec.error = "error", exc.status, self.redact(exc.message)
            rec.upstream_ms = (time.perf_counter() - t0) * 1000
            return rec
        answer = Completion.of(result.data)
        rec.response = answer.text
        account(rec, result.spec, answer.usage, estimate_tokens(rec.messages))
        rec.status, rec.http_status, rec.upstream_ms = "ok", 200, result.attempts[-1].ms
        rec.synthetic = answer.synthetic
        rec.upstream_model = answer.upstream_model
        return rec

    def _keep(self, rec: CallRecord) -> None:
        self.metrics.observe_call(rec)
        try:
            self.recorder.record(rec)
        except GatewayError as exc:  # no room: a duel is extra, the caller's answer is not at stake
            log.warning("duel record %s not kept: %s", rec.id, exc.message)

    async def _duel(self, parent: CallRecord, model: str, body: dict[str, Any]) -> None:
        try:
            body = {k: v for k, v in body.items() if k not in ("stream", "stream_options")}
            duel = CallRecord(
                id=f"{parent.id}:duel",
                messages=parent.messages,
                requested_model=parent.requested_model,
                model=model,
                status="error",
                http_status=500,
                prompt_hash=parent.prompt_hash,
                embedding=parent.embedding,
                embedder=parent.embedder,
                layer="duel",
                kind="duel",
                duel_of=parent.id,
                caller=parent.caller,
            )
            self._keep(await self._call(model, body, duel))
            if self.settings.judge_model and duel.status == "ok" and parent.response and duel.response:
                await self.judge(parent, duel)
        except Exception:
            log.exception("duel for %s failed", parent.id)

    async def judge(self, first: CallRecord, second: CallRecord) -> str | None:
        """Both answers in random order, a strict verdict, feedback with source `judge`.
        Returns the verdict, or None if the judge's reply was not one (then nothing is recorded
        but the judge's own call)."""
        judge_model = self.settings.judge_model
        assert judge_model is not None and first.response and second.response
        order = dpo.blind_order(first.id, second.id, self.order_rng)
        answers = {first.id: first.response, second.id: second.response}
        messages = dpo.judge_prompt(first.messages, answers[order.a], answers[order.b])
        rec = CallRecord(
            id=f"{first.id}:judge",
            messages=messages,
            requested_model=judge_model,
            model=judge_model,
            status="error",
            http_status=500,
            layer="judge",
            kind="judge",
            duel_of=first.id,
            caller=first.caller,
        )
        await self._call(judge_model, {"messages": messages, "temperature": 0, "max_tokens": 16}, rec)
        verdict = dpo.parse_verdict(rec.response) if rec.status == "ok" else None
        rec.decision.update(order=[order.a, order.b], verdict=verdict)
        self._keep(rec)
        if verdict is None:
            log.warning("judge %s gave no strict verdict for %s; nothing recorded", judge_model, first.id)
            return None
        for request_id, score in order.scores(verdict).items():
            await self.learn(
                Feedback(
                    request_id, score, f"judge {judge_model}: {verdict}", source="judge", caller=first.caller
                )
            )
        return verdict
