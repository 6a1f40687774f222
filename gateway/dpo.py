"""The DPO flywheel: preference pairs mined from feedback, duels that make pairs on purpose, a blind
judge that rates duels, routing labels, and the export formats.

A pair is two real, different responses to the same prompt (same normalised conversation hash) or
a near-identical one (cosine >= DPO_SIMILARITY between the routing embedder's vectors, and the same
numbers and content words in the user's text: only function words, punctuation, case and order
may differ), by
different models, whose scores differ by at least DPO_MIN_MARGIN. Placeholder responses (the
replay provider's, when a data set has no text) never join a pair. Re-rating updates the pair (or
removes it when the margin falls below the minimum), so a pair exists at most once.
"""

from __future__ import annotations

import random
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from gateway.catalogue import ModelSpec
from gateway.domain import Comparison, DPOPair, RatedCall, text_of
from gateway.store import ExportStore, PairStore

# --- mining


_NUMBER = re.compile(r"\d+(?:[.,]\d+)*")
_WORD = re.compile(r"[^\W\d_]+")
# English function words: the words two near-identical prompts may differ in ("What is the capital
# of France?" / "What's the capital of France, please?"). Any other word is content.
_FUNCTION_WORDS = """
    a about above after again all also am an and any are as at be been before being below between
    both but by can could did do does doing done down during each either else ever every few for from
    further get give had has have having he her here hers him his how i if in into is it its just kindly
    let me might more most much must my no nor not now of off on once only or other our ours out over
    own please pls quick quickly really s same shall she should so some such t tell than thank thanks
    that the their them then there these they this those through to too under until up us very was we
    were what whats when where which while who whom whose why will with would you your yours"""
FUNCTION_WORDS = frozenset(_FUNCTION_WORDS.split())


def _user_text(messages: list[dict[str, Any]]) -> str:
    return " ".join(text_of(m.get("content")) for m in messages if m.get("role") == "user")


def numbers(messages: list[dict[str, Any]]) -> list[str]:
    return _NUMBER.findall(_user_text(messages))


def content_words(messages: list[dict[str, Any]]) -> list[str]:
    """The user text's words that are not function words, lower-cased, sorted (a multiset)."""
    return sorted(w for w in _WORD.findall(_user_text(messages).lower()) if w not in FUNCTION_WORDS)


def pairable(a: RatedCall, b: RatedCall) -> bool:
    """Beyond the similarity threshold: near-identical prompts must carry the same numbers
    ("What is 2+3?" and "What is 2+4?" embed almost alike but want different answers) and the same
    content words (a static embedding puts "...the capital of France?" and "...the capital of
    Germany?" at cosine 0.98), and two identical answers are no preference."""
    if a.response.strip() == b.response.strip():
        return False
    if a.prompt_hash == b.prompt_hash:
        return True
    return numbers(a.messages) == numbers(b.messages) and content_words(a.messages) == content_words(
        b.messages
    )


async def mine(
    store: PairStore,
    caller: str,
    request_id: str,
    *,
    similarity: float,
    min_margin: float,
    embedder: str | None = None,
) -> int:
    """Pairs created or updated by the (new) score of that tenant's call `request_id` (with other
    calls of the same tenant only). Near-identical prompts are found with `embedder`'s vectors
    (the current routing embedder's); None: identical prompts only."""
    me, others = await store.pair_candidates(caller, request_id, similarity, embedder=embedder)
    if me is None:
        return 0
    changed = 0
    for other in others:
        if abs(me.score - other.score) < min_margin or not pairable(me, other):
            await store.delete_pair(caller, me.id, other.id)  # no longer a preference (after a re-rating)
            continue
        chosen, rejected = (me, other) if me.score > other.score else (other, me)
        changed += await store.save_pair(make_pair(chosen, rejected, other.similarity, caller))
    return changed


def make_pair(chosen: RatedCall, rejected: RatedCall, similarity: float, caller: str = "") -> DPOPair:
    # Near-identical prompts differ a little: the pair carries the chosen answer's prompt.
    return DPOPair(
        prompt_hash=chosen.prompt_hash,
        messages=chosen.messages,
        chosen_id=chosen.id,
        chosen_model=chosen.model,
        chosen=chosen.response,
        chosen_score=chosen.score,
        rejected_id=rejected.id,
        rejected_model=rejected.model,
        rejected=rejected.response,
        rejected_score=rejected.score,
        similarity=similarity,
        caller=caller,
    )


# --- the blind judge

JUDGE_RUBRIC = """You are an impartial judge comparing two answers to the same conversation.

Judge which answer better serves the user's last request. In order of importance:
1. Correctness: facts, reasoning, code and calculations are right.
2. Helpfulness: it does what was asked, completely, and follows the user's instructions and format.
3. Clarity: it is clear and no longer than needed.
Ignore the order in which the answers are shown, their length as such, and any claims the answers
make about their own quality.

<conversation>
{conversation}
</conversation>

<answer_a>
{answer_a}
</answer_a>

<answer_b>
{answer_b}
</answer_b>

Reply with exactly one line and nothing else:
VERDICT: A
or
VERDICT: B
or
VERDICT: TIE"""

_VERDICT = re.compile(r"^\s*VERDICT:\s*(A|B|TIE)\s*$")


def parse_verdict(text: str | None) -> str | None:
    """`A`, `B` or `TIE` from a reply that is exactly one verdict line; anything else is None."""
    if not text:
        return None
    match = _VERDICT.match(text)
    return match.group(1) if match else None


def judge_prompt(messages: list[dict[str, Any]], first: str, second: str) -> list[dict[str, Any]]:
    conversation = "\n".join(f"[{m.get('role')}] {text_of(m.get('content'))}" for m in messages)
    return [
        {
            "role": "user",
            "content": JUDGE_RUBRIC.format(conversation=conversation, answer_a=first, answer_b=second),
        }
    ]


@dataclass(frozen=True)
class JudgeOrder:
    """Which call's answer the judge saw as A."""

    a: str
    b: str

    def scores(self, verdict: str) -> dict[str, float]:
        if verdict == "TIE":
            return {self.a: 0.5, self.b: 0.5}
        winner, loser = (self.a, self.b) if verdict == "A" else (self.b, self.a)
        return {winner: 1.0, loser: 0.0}


def blind_order(first_id: str, second_id: str, rng: random.Random) -> JudgeOrder:
    return JudgeOrder(first_id, second_id) if rng.random() < 0.5 else JudgeOrder(second_id, first_id)


# --- routing labels (the 9-cell matrix of performance-aligned routing)

LABELS = ("standard", "complex", "ambiguous")


def outcome(score: float, correct: float = 0.7, incorrect: float = 0.3) -> str:
    """correct / incorrect / unsure (a score in between: "don't know")."""
    if score >= correct:
        return "correct"
    if score <= incorrect:
        return "incorrect"
    return "unsure"


def route_label(medium: str, large: str) -> str:
    """Medium (cheaper) and large (stronger) outcomes -> the label of the request.

    medium correct -> standard; medium wrong or unsure and large correct -> complex;
    incorrect medium and unsure large -> complex; otherwise (both failed) -> ambiguous: don't escalate.
    """
    if medium == "correct":
        return "standard"
    if large == "correct" or (medium == "incorrect" and large == "unsure"):
        return "complex"
    return "ambiguous"


@dataclass
class RouteSkips:
    """Why comparisons made no routing label: what `export-dpo --kind routes` says when it wrote
    nothing (or less than the user expected)."""

    comparisons: int = 0
    unknown_model: int = 0  # a model no longer in the catalogue: its price is unknown
    same_price: int = 0  # neither model is the cheaper one

    def explain(self) -> str:
        if self.comparisons == 0:
            return (
                "no prompt has rated answers from two different models yet (a routing label needs "
                "the same prompt answered by two models and both answers rated; DUEL_RATE makes such "
                "pairs on purpose)"
            )
        reasons = []
        if self.same_price:
            reasons.append(
                f"{self.same_price} had two models of the same price (a label needs a cheaper and a "
                "dearer model: give the catalogue's models their input_usd_per_mtok and "
                "output_usd_per_mtok)"
            )
        if self.unknown_model:
            reasons.append(f"{self.unknown_model} named a model that is not in the catalogue")
        return f"of {self.comparisons} prompts answered by two models, " + "; ".join(reasons)


def route_record(
    c: Comparison,
    specs: dict[str, ModelSpec],
    correct: float,
    incorrect: float,
    skips: RouteSkips | None = None,
) -> dict[str, Any] | None:
    """{prompt, label, chosen_model, rejected_model} for a prompt answered by a cheaper and a stronger arm."""
    skips = skips if skips is not None else RouteSkips()
    skips.comparisons += 1
    a, b = specs.get(c.model_a), specs.get(c.model_b)
    if a is None or b is None:
        skips.unknown_model += 1
        return None
    price_a = a.input_usd_per_mtok + a.output_usd_per_mtok
    price_b = b.input_usd_per_mtok + b.output_usd_per_mtok
    if price_a == price_b:
        skips.same_price += 1
        return None  # neither is the cheaper arm
    (cheap, cheap_score), (strong, strong_score) = sorted(
        [(c.model_a, c.score_a), (c.model_b, c.score_b)],
        key=lambda m: price_a if m[0] == c.model_a else price_b,
    )
    label = route_label(outcome(cheap_score, correct, incorrect), outcome(strong_score, correct, incorrect))
    chosen, rejected = (strong, cheap) if label == "complex" else (cheap, strong)
    return {
        "prompt": c.messages,
        "label": label,
        "chosen_model": chosen,
        "rejected_model": rejected,
        "cheaper_model": cheap,
        "cheaper_score": cheap_score,
        "stronger_model": strong,
        "stronger_score": strong_score,
    }


# --- export formats

# The formats of each kind, the default first: `trl` is TRL's preference format (pairs only);
# `labels` is {prompt, label, chosen_model, rejected_model}; `jsonl` is everything.
EXPORT_FORMATS: dict[str, tuple[str, ...]] = {"responses": ("trl", "jsonl"), "routes": ("labels", "jsonl")}


def export_format(kind: str, fmt: str | None) -> str:
    """The format to export `kind` in (None: the kind's default); a format the kind does not have
    is a ValueError that says which it has."""
    formats = EXPORT_FORMATS.get(kind)
    if formats is None:
        raise ValueError(f"kind must be one of {', '.join(EXPORT_FORMATS)}, not {kind!r}")
    if fmt is None:
        return formats[0]
    if fmt not in formats:
        raise ValueError(f"format {fmt!r} does not apply to {kind}; its formats: {', '.join(formats)}")
    return fmt


def trl_record(pair: DPOPair) -> dict[str, Any]:
    """TRL's conversational preference format, as DPOTrainer reads it."""
    return {
        "prompt": [{"role": m.get("role"), "content": text_of(m.get("content"))} for m in pair.messages],
        "chosen": [{"role": "assistant", "content": pair.chosen}],
        "rejected": [{"role": "assistant", "content": pair.rejected}],
    }


def jsonl_record(pair: DPOPair) -> dict[str, Any]:
    return {
        "prompt": pair.messages,
        "chosen": pair.chosen,
        "rejected": pair.rejected,
        "chosen_model": pair.chosen_model,
        "rejected_model": pair.rejected_model,
        "chosen_score": pair.chosen_score,
        "rejected_score": pair.rejected_score,
        "margin": round(pair.margin, 6),
        "similarity": round(pair.similarity, 6),
        "chosen_request_id": pair.chosen_id,
        "rejected_request_id": pair.rejected_id,
        "prompt_hash": pair.prompt_hash,
        "caller": pair.caller,
        "created_at": pair.created_at.isoformat(),
        "updated_at": pair.updated_at.isoformat(),
    }


async def export_records(
    store: ExportStore,
    *,
    kind: str,
    fmt: str,
    since: datetime | None,
    min_margin: float,
    specs: dict[str, ModelSpec],
    correct: float = 0.7,
    incorrect: float = 0.3,
    after: tuple[datetime, int] | None = None,
    limit: int | None = None,
    skips: RouteSkips | None = None,
    caller: str | None = None,
) -> AsyncIterator[tuple[dict[str, Any], tuple[datetime, int] | None]]:
    """Records for export (one tenant's, or with `caller=None` every tenant's), each with its
    paging cursor (responses) or None (routes); `skips` counts why comparisons made no routing
    label."""
    fmt = export_format(kind, fmt)
    if kind == "responses":
        async for pair in store.iter_pairs(since, min_margin, after, limit, caller):
            record = trl_record(pair) if fmt == "trl" else jsonl_record(pair)
            yield record, (pair.updated_at, pair.id)
    elif kind == "routes":
        n = 0
        async for comparison in store.iter_comparisons(since, caller):
            labelled = route_record(comparison, specs, correct, incorrect, skips)
            if labelled is None:
                continue
            if fmt == "labels":
                labelled = {k: labelled[k] for k in ("prompt", "label", "chosen_model", "rejected_model")}
            yield labelled, None
            n += 1
            if limit is not None and n >= limit:
                return
