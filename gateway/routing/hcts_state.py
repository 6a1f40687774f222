"""HCTS's state on disk: what `llm-router fit` learnt (ROUTER_STATE_PATH, default
DATA_DIR/router_state.npz), loaded when the gateway starts, and what a gateway had learnt when it
stopped (the `.live.npz` beside it, ROUTER_STATE_KEEP), loaded instead unless a fit was written
since that gateway started (`signature`). A numpy .npz without pickles: the arrays under their
dotted names, everything else as JSON in `meta`, and the arms' names, so that a catalogue listing
the same models in another order maps onto it. A live state also holds which ratings it has
absorbed (`sync.*`): the store's, read again at start, are applied once."""

from __future__ import annotations

import json
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from gateway.routing.hcts import Hcts
from gateway.routing.hcts_dial import DialSpec

log = logging.getLogger("gateway.router")

# the state's arrays with an arm axis, and which axis it is (or axes)
_ARM_AXIS: dict[str, int | tuple[int, int]] = {
    "model.prior": 0, "model.n": 0, "model.s": 0, "model.ss": 0, "model.lq": 1, "model.hs": 1,
    "model.cost_g": 1, "model.cost_seen": 0, "model.cost_c": 2, "ref.cest_sum": 0, "ref.cest_cnt": 0,
    "ref.pbest": 0, "ref.dr": 0, "ref.cover": 0, "ref.spent": 0, "ref.quoted": 0, "ref.rsum": (0, 1),
    "ref.rcnt": 0, "ref.bc": 1,
}  # fmt: skip
_LISTS = ("model.cents", "model.ln", "model.ls", "model.lc")


def state_file(settings: Any) -> Path:
    """Where the state lives: ROUTER_STATE_PATH, else DATA_DIR/router_state.npz."""
    return Path(settings.router_state_path or settings.data_dir / "router_state.npz")


def live_file(settings: Any) -> Path:
    """Where a stopping gateway keeps what it learnt: beside `state_file`, `.live.npz`."""
    fitted = state_file(settings)
    return fitted.with_name(fitted.name.removesuffix(".npz") + ".live.npz")


def signature(path: Path) -> list[int] | None:
    """A fitted state file's identity (size, modification time in ns), None when there is none: a
    live state records the one it started beside, so that a fit written since is seen as new."""
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return [st.st_size, st.st_mtime_ns]


@dataclass(frozen=True)
class Live:
    """What a live state adds to a fitted one's contents."""

    synced: str  # the sync mark (ISO time): the store's ratings since it are read again
    absorbed: dict[tuple[str, str], float]  # (caller, request id) -> score, applied already
    fitted: list[int] | None = None  # the fitted file's `signature` when the gateway started


def save(
    policy: Hcts | dict[str, Any],
    arms: list[str],
    path: Path,
    embedder: str | None = None,
    answers: dict[str, float] | None = None,
    live: Live | None = None,
    compress: bool = True,
) -> None:
    """`policy`: the policy, or its `state()` (a copy taken on the event loop, written from a thread).
    `embedder`: the id of the embedder whose vectors the state was fitted on (its clusters live
    in that embedder's space; another embedder's vectors must never be read against them).
    `answers`: each model's mean completion tokens in the fitted data (see `answer_lengths`).
    `live`: a live state's bookkeeping (see `live`)."""
    state = dict(policy) if isinstance(policy, dict) else policy.state()
    arrays: dict[str, Any] = {}  # (Any: savez's keyword arguments)
    meta: dict[str, Any] = {"arms": arms, "embedder": embedder, "answers": answers or {}}
    if live is not None:
        meta["synced"], meta["fitted"] = live.synced, live.fitted
        keys = list(live.absorbed)
        arrays["sync.caller"] = np.array([k[0] for k in keys], dtype=np.str_)
        arrays["sync.id"] = np.array([k[1] for k in keys], dtype=np.str_)
        arrays["sync.score"] = np.array(list(live.absorbed.values()), dtype=np.float64)
    for part in ("model", "ref"):
        for key, value in state.pop(part).items():
            name = f"{part}.{key}"
            if name in _LISTS:
                meta[f"{name}.len"] = len(value)
                for i, a in enumerate(value):
                    arrays[f"{name}.{i}"] = np.asarray(a)
            elif isinstance(value, np.ndarray):
                arrays[name] = value
            else:
                meta[name] = value.item() if isinstance(value, np.generic) else value
    meta.update(state)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    tmp = Path(name)
    try:
        with os.fdopen(fd, "wb") as f:
            (np.savez_compressed if compress else np.savez)(f, meta=np.array(json.dumps(meta)), **arrays)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


def load(
    path: Path,
    arms: list[str],
    dial: DialSpec | None = None,
    inline: bool = False,
    embedder: str | None = None,
) -> Hcts | None:
    """The stored policy for these arms and this embedder (None, and a warning, when it was fitted
    for others)."""
    with np.load(path, allow_pickle=False) as z:
        meta = json.loads(str(z["meta"]))
        arrays = {key: z[key] for key in z.files if key != "meta" and not key.startswith("sync.")}
    fitted_with = meta.pop("embedder", None)
    for key in ("answers", "synced", "fitted"):
        meta.pop(key, None)
    if embedder is not None and fitted_with != embedder:
        log.warning(
            "router state %s was fitted on embeddings of %s, this gateway's embedder is %s; starting "
            "without it (fit again: llm-router fit)",
            path,
            fitted_with or "an unrecorded embedder",
            embedder,
        )
        return None
    stored: list[str] = meta.pop("arms")
    if sorted(stored) != sorted(arms):
        log.warning(
            "router state %s was fitted for other models (%s); starting without it", path, ", ".join(stored)
        )
        return None
    order = [stored.index(a) for a in arms]
    state: dict[str, Any] = {"model": {}, "ref": {}}
    for name, a in arrays.items():
        if name.rsplit(".", 1)[0] in _LISTS:
            continue
        axis = _ARM_AXIS.get(name)
        part, _, key = name.partition(".")
        axes: tuple[int, ...] = () if axis is None else (axis,) if isinstance(axis, int) else axis
        for ax in axes:
            a = np.take(a, order, axis=ax)
        state[part][key] = a
    if "cost_rows" in state["model"]:  # each call's arm, by its index in this catalogue
        rows = state["model"]["cost_rows"].copy()
        rows[:, 1] = np.asarray(order).argsort()[rows[:, 1].astype(np.int64)]
        state["model"]["cost_rows"] = rows
    for name in _LISTS:
        part, _, key = name.partition(".")
        items = [arrays[f"{name}.{i}"] for i in range(int(meta.pop(f"{name}.len")))]
        if key in ("ln", "ls"):
            items = [np.take(a, order, axis=1) for a in items]
        state[part][key] = items
    for name in list(meta):
        if name.startswith(("model.", "ref.")):
            part, _, key = name.partition(".")
            state[part][key] = meta.pop(name)
    state.update(meta)
    return Hcts.from_state(state, dial, inline=inline)


def answer_lengths(path: Path) -> dict[str, float]:
    """Each model's mean completion tokens in the data the state was fitted on: what the gateway
    prices a model's answer at until it has served that model itself (without them, a default
    length: a warm gateway would misjudge the cost of every model it has not yet served)."""
    with np.load(path, allow_pickle=False) as z:
        meta = json.loads(str(z["meta"]))
    return {str(k): float(v) for k, v in (meta.get("answers") or {}).items()}


def live(path: Path) -> Live | None:
    """A live state's bookkeeping; None for a fitted state (its rows are not the store's ratings)."""
    with np.load(path, allow_pickle=False) as z:
        meta = json.loads(str(z["meta"]))
        if "synced" not in meta:
            return None
        keys = zip(z["sync.caller"].tolist(), z["sync.id"].tolist(), strict=True)
        absorbed = dict(zip(keys, z["sync.score"].tolist(), strict=True))
    return Live(str(meta["synced"]), absorbed, meta.get("fitted"))
