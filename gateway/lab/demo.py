"""`llm-router demo FILE`: the router learning live, with no API key.

A replay gateway (the file's models, served from their recorded answers; as `serve --replay`
builds it) listens on 127.0.0.1; the demo sends the file's prompts in a shuffled order with
`model="auto"`, the way any OpenAI client would (matched by the prompt, not by the record's id),
rates each answer with the score the data set recorded for it, and shows as it goes the router's
running score and cost against the best single model's on the same prompts.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from gateway.config import load_settings
from gateway.lab.baselines import best_single
from gateway.lab.runner import feedback_mask, serving, stream_order
from gateway.providers.replay import ReplayData, load
from gateway.replay_mode import config_file, replay_overrides

WINDOW = 200  # the "lately" figure: the last this many calls


@dataclass
class DemoOptions:
    limit: int | None = 1000
    feedback_rate: float = 1.0
    seed: int = 0
    port: int = 0
    store: str = "memory"  # memory | postgres (the replay gateway's own data directory)
    config: str | None = None
    overrides: dict[str, Any] = field(default_factory=dict)
    models_dir: Path | None = None


@dataclass
class Tally:
    """The router's and the best single model's score and cost, call by call, on the same prompts."""

    best: str
    scores: list[float] = field(default_factory=list)
    costs: list[float] = field(default_factory=list)
    best_scores: list[float] = field(default_factory=list)
    best_costs: list[float] = field(default_factory=list)
    picks: list[str] = field(default_factory=list)

    def add(self, data: ReplayData, record_id: str, model: str) -> None:
        record = data.by_id[record_id]
        self.picks.append(model)
        self.scores.append(record.outcomes[model].score)
        self.costs.append(data.cost(record, model))
        self.best_scores.append(record.outcomes[self.best].score)
        self.best_costs.append(data.cost(record, self.best))

    def share(self, start: int = 0, stop: int | None = None) -> tuple[float, float, float | None]:
        """Mean score, its share of the best model's, and the cost's share (None: no prices)."""
        s, b = np.mean(self.scores[start:stop]), np.mean(self.best_scores[start:stop])
        c, bc = np.mean(self.costs[start:stop]), np.mean(self.best_costs[start:stop])
        return float(s), float(s / b) if b else float("nan"), float(c / bc) if bc else None

    def line(self) -> str:
        score, of_best, cost = self.share()
        lately = self.share(max(0, len(self.scores) - WINDOW))[1]
        costs = f"cost {cost:.0%} of its" if cost is not None else "cost unknown (no prices)"
        return f"score {score:.3f} = {of_best:.0%} of {self.best}'s, {costs}; last {WINDOW}: {lately:.0%}"


def demo(file: str, options: DemoOptions) -> Tally:
    data = load(file)
    profile = config_file(options.config)
    values: dict[str, Any] = {
        **replay_overrides(data, profile),
        "host": "127.0.0.1",
        "log_level": "warning",
        "enable_persistence": options.store == "postgres",
        "router_state_keep": False,  # it learns live, from nothing, every time
        **options.overrides,
    }
    if options.models_dir is not None:
        values["models_dir"] = options.models_dir
    settings = load_settings(profile, **values)
    order = stream_order(len(data.records), "shuffle", options.seed, options.limit or None)
    # A prompt that occurs twice in the file is answered as its first record: send each once.
    first = {r.prompt_hash: n for n, r in reversed(list(enumerate(data.records)))}
    order = [i for i in order if first[data.records[i].prompt_hash] == i]
    mask = feedback_mask(len(order), options.feedback_rate, options.seed)
    tally = Tally(best_single(data))
    with logging_redirect_tqdm():
        asyncio.run(_drive(data, settings, order, mask, options, tally))
    _summary(data, tally, sum(mask))
    return tally


async def _drive(
    data: ReplayData, settings: Any, order: list[int], mask: list[bool], options: DemoOptions, tally: Tally
) -> None:
    async with (
        serving(settings, None, options.seed, options.port) as (url, _),
        aiohttp.ClientSession() as http,
    ):
        print(
            f"a replay gateway of {data.name} ({len(data.models)} models) is answering at {url}/v1 "
            f"(policy {settings.router_policy}); sending {len(order)} of its prompts with model='auto'",
            flush=True,
        )
        with tqdm(total=len(order), desc="auto", unit=" prompt", dynamic_ncols=True) as bar:
            for t, i in enumerate(order):
                body = {"model": "auto", "messages": data.records[i].messages}
                async with http.post(url + "/v1/chat/completions", json=body) as resp:
                    answer = await resp.json()
                    if resp.status != 200:
                        raise RuntimeError(f"the gateway answered {resp.status}: {answer}")
                    request_id, model = resp.headers["x-request-id"], resp.headers["x-router-model"]
                replayed = answer["x_replay"]
                if mask[t]:
                    rating = {"request_id": request_id, "score": replayed["score"]}
                    async with http.post(url + "/feedback", json=rating) as resp:
                        if resp.status != 200:
                            raise RuntimeError(f"feedback failed: {resp.status} {await resp.text()}")
                tally.add(data, replayed["record_id"], model)
                bar.update()
                if t % 10 == 0 or t == len(order) - 1:
                    bar.set_postfix_str(tally.line(), refresh=False)


def _summary(data: ReplayData, tally: Tally, rated: int) -> None:
    n = len(tally.scores)
    mid = n // 2
    print(f"\n{data.name}: {n} prompts, {rated} answers rated; the best single model is {tally.best}")
    for name, (start, stop) in {"first half": (0, mid), "second half": (mid, None), "all": (0, None)}.items():
        score, of_best, cost = tally.share(start, stop)
        costs = f"{cost:6.1%} of its cost" if cost is not None else "cost unknown (the file has no prices)"
        print(f"  {name:<12} auto scored {score:.3f}: {of_best:6.1%} of {tally.best}'s, at {costs}")
    later = tally.picks[mid:]
    top = sorted(set(later), key=later.count, reverse=True)[:4]
    print("  second half, auto picked: " + ", ".join(f"{m} {later.count(m) / len(later):.0%}" for m in top))
