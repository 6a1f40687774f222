"""SQLAlchemy Core tables, for queries. The schema itself is created and changed only by the
Alembic migrations in `migrations/`; a test checks that the two agree."""

from __future__ import annotations

from dataclasses import fields as dataclass_fields
from typing import Any

import numpy as np
import orjson
from pgvector.sqlalchemy import Vector
from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    Column,
    DateTime,
    Float,
    ForeignKeyConstraint,
    Index,
    Integer,
    MetaData,
    Table,
    Text,
    UniqueConstraint,
    text,
)
from sqlalchemy.dialects.postgresql import ARRAY, JSONB

from gateway.domain import ArmStats, CallRecord
from gateway.store.pg import json_dumps


class Embedding(Vector):
    """pgvector's column type, with a numpy vector sent as orjson writes it (7 us for 384 floats
    where pgvector's own text conversion takes 170 us: one per recorded call, on the event loop).
    float32 values print in their shortest exact form, so the stored vector has the same bits."""

    cache_ok = True

    def bind_processor(self, dialect: Any) -> Any:
        fallback = super().bind_processor(dialect)

        def process(value: Any) -> Any:
            if isinstance(value, np.ndarray) and value.dtype == np.float32:
                return orjson.dumps(value, option=orjson.OPT_SERIALIZE_NUMPY).decode()
            return fallback(value)

        return process


EMBEDDING_DIM = 384

metadata = MetaData()

calls = Table(
    "calls",
    metadata,
    Column("id", Text, primary_key=True),
    Column("created_at", DateTime(timezone=True), nullable=False, server_default=text("now()")),
    Column("kind", Text, nullable=False, server_default="call"),  # call | duel | judge
    Column("duel_of", Text),
    # The tenant ("" on an open gateway): the key is (id, caller).
    Column("caller", Text, primary_key=True, server_default=""),
    Column("requested_model", Text, nullable=False),
    Column("model", Text),
    Column("upstream_model", Text),
    Column("messages", JSONB, nullable=False),
    Column("prompt_hash", Text, nullable=False),
    Column("embedding", Embedding(EMBEDDING_DIM)),
    Column("layer", Text),
    Column("strategy", Text),
    Column("policy", Text),
    Column("propensity", Float),
    Column("decision", JSONB, nullable=False, server_default=text("'{}'::jsonb")),
    Column("attempts", JSONB, nullable=False, server_default=text("'[]'::jsonb")),
    Column("status", Text, nullable=False),
    Column("http_status", Integer, nullable=False),
    Column("error", Text),
    Column("stream", Boolean, nullable=False, server_default=text("false")),
    Column("overhead_ms", Float),
    Column("upstream_ms", Float),
    Column("ttft_ms", Float),
    Column("prompt_tokens", Integer),
    Column("completion_tokens", Integer),
    Column("cost_usd", Float),
    Column("response", Text),
    # The effective feedback score (latest human score wins; a judge only fills in where no
    # human rated), denormalised here so that the neighbour search reads one table.
    Column("score", Float),
    Column("score_source", Text),
    Column("score_at", DateTime(timezone=True)),
    # A response no model wrote (the replay provider's placeholder): never part of a DPO pair.
    Column("synthetic", Boolean, nullable=False, server_default=text("false")),
    Column("trace_id", Text),  # the call's OpenTelemetry trace, when traced
    Column("key_id", Text),  # the virtual key it was made with (its tenant is `caller`)
    # The id of the embedder that made `embedding` (gateway/embedders): searches compare only the
    # current embedder's. Migration 0006 gave every earlier row MiniLM's id (they were all its).
    Column("embedder", Text),
    Index("calls_created_at_idx", "created_at"),
    Index("calls_caller_created_at_idx", "caller", "created_at"),
    Index("calls_trace_id_idx", "trace_id", postgresql_where=text("trace_id IS NOT NULL")),
    # A virtual key's spend (budgets, /v1/keys/{id}/spend): migration 0004.
    Index("calls_key_id_created_at_idx", "key_id", "created_at", postgresql_where=text("key_id IS NOT NULL")),
    Index("calls_model_created_at_idx", "model", "created_at"),
    Index("calls_prompt_hash_idx", "prompt_hash"),
    Index("calls_duel_of_idx", "duel_of", postgresql_where=text("duel_of IS NOT NULL")),
    Index("calls_score_at_idx", "score_at", postgresql_where=text("score_at IS NOT NULL")),
    Index(
        "calls_embedding_hnsw_idx",
        "embedding",
        postgresql_using="hnsw",
        postgresql_ops={"embedding": "vector_cosine_ops"},
        postgresql_where=text("score IS NOT NULL"),
    ),
)

feedback = Table(
    "feedback",
    metadata,
    Column("id", BigInteger, primary_key=True, autoincrement=True),
    Column("request_id", Text, nullable=False),
    Column("score", Float, nullable=False),
    Column("feedback_text", Text),
    Column("source", Text, nullable=False, server_default="user"),
    Column("created_at", DateTime(timezone=True), nullable=False, server_default=text("now()")),
    Column("caller", Text, nullable=False, server_default=""),
    CheckConstraint("score >= 0 AND score <= 1", name="feedback_score_range"),
    ForeignKeyConstraint(
        ["request_id", "caller"], ["calls.id", "calls.caller"], name="feedback_call_fkey", ondelete="CASCADE"
    ),
    Index("feedback_request_id_idx", "request_id", "caller", "created_at"),
)

arm_stats = Table(
    "arm_stats",
    metadata,
    Column("model", Text, primary_key=True),
    Column("calls", BigInteger, nullable=False, server_default="0"),
    Column("ok_calls", BigInteger, nullable=False, server_default="0"),
    Column("rated", BigInteger, nullable=False, server_default="0"),
    Column("score_sum", Float, nullable=False, server_default="0"),
    Column("latency_ms_sum", Float, nullable=False, server_default="0"),
    Column("cost_usd_sum", Float, nullable=False, server_default="0"),
    Column("completion_tokens_sum", BigInteger, nullable=False, server_default="0"),
    Column("updated_at", DateTime(timezone=True), nullable=False, server_default=text("now()")),
)

dpo_pairs = Table(
    "dpo_pairs",
    metadata,
    Column("id", BigInteger, primary_key=True, autoincrement=True),
    Column("call_a", Text, nullable=False),
    Column("call_b", Text, nullable=False),
    Column("prompt_hash", Text, nullable=False),
    Column("messages", JSONB, nullable=False),
    Column("chosen_id", Text, nullable=False),
    Column("chosen_model", Text, nullable=False),
    Column("chosen", Text, nullable=False),
    Column("chosen_score", Float, nullable=False),
    Column("rejected_id", Text, nullable=False),
    Column("rejected_model", Text, nullable=False),
    Column("rejected", Text, nullable=False),
    Column("rejected_score", Float, nullable=False),
    Column("margin", Float, nullable=False),
    Column("similarity", Float, nullable=False, server_default="1"),
    Column("created_at", DateTime(timezone=True), nullable=False, server_default=text("now()")),
    Column("updated_at", DateTime(timezone=True), nullable=False, server_default=text("now()")),
    Column("caller", Text, nullable=False, server_default=""),
    ForeignKeyConstraint(
        ["call_a", "caller"], ["calls.id", "calls.caller"], name="dpo_pairs_call_a_fkey", ondelete="CASCADE"
    ),
    ForeignKeyConstraint(
        ["call_b", "caller"], ["calls.id", "calls.caller"], name="dpo_pairs_call_b_fkey", ondelete="CASCADE"
    ),
    UniqueConstraint("caller", "call_a", "call_b", name="dpo_pairs_calls_key"),
    CheckConstraint("call_a < call_b", name="dpo_pairs_ordered"),
    Index("dpo_pairs_updated_at_idx", "updated_at", "id"),
    Index("dpo_pairs_call_b_idx", "call_b"),
    Index("dpo_pairs_created_at_idx", "created_at"),
)

# Each tenant's rating sums per model (arm_stats holds every tenant's together): the router weighs
# tenants so that one cannot swing another's view of an arm.
arm_ratings = Table(
    "arm_ratings",
    metadata,
    Column("model", Text, primary_key=True),
    Column("caller", Text, primary_key=True),
    Column("rated", BigInteger, nullable=False, server_default="0"),
    Column("score_sum", Float, nullable=False, server_default="0"),
)

api_keys = Table(
    "api_keys",
    metadata,
    Column("id", Text, primary_key=True),
    Column("key_hash", Text, nullable=False, unique=True),
    Column("prefix", Text, nullable=False),
    Column("owner", Text, nullable=False),
    Column("name", Text),
    Column("created_at", DateTime(timezone=True), nullable=False, server_default=text("now()")),
    Column("expires_at", DateTime(timezone=True)),
    Column("revoked_at", DateTime(timezone=True)),
    Column("models", ARRAY(Text)),
    Column("rpm", Integer),
    Column("tpm", Integer),
    Column("budget_day_usd", Float),
    Column("budget_month_usd", Float),
    Column("budget_total_usd", Float),
    Column("updated_at", DateTime(timezone=True), nullable=False, server_default=text("now()")),
    Index("api_keys_owner_idx", "owner"),
)


# --- a new call's row and its arm's statistics, written in bulk (PostgresStore.write_calls)


def _embedding_text(value: Any) -> str | None:
    if value is None:
        return None
    return orjson.dumps(np.asarray(value, dtype=np.float32), option=orjson.OPT_SERIALIZE_NUMPY).decode()


def _json_text(value: Any) -> str | None:
    return None if value is None else json_dumps(value)


def _same(value: Any) -> Any:
    return value


_RECORD_FIELDS = {f.name for f in dataclass_fields(CallRecord)}


def _write_plan() -> tuple[list[tuple[str, Any]], str]:
    """The columns a new call's row is written with (the record's fields: its rating comes later),
    how each value is sent (jsonb and vector as text, cast by the server; orjson writes float32
    in its shortest exact form, so the stored vector has the same bits), and the statement."""
    plan, params, selects = [], [], []
    for i, col in enumerate(c for c in calls.columns if c.name in _RECORD_FIELDS):
        if isinstance(col.type, Embedding):
            encode, array, cast = _embedding_text, "text[]", f"::vector({EMBEDDING_DIM})"
        elif isinstance(col.type, JSONB):
            encode, array, cast = _json_text, "text[]", "::jsonb"
        else:
            encode, array, cast = _same, _ARRAY_TYPES[type(col.type)], ""
        plan.append((col.name, encode))
        params.append(f"${i + 1}::{array}")
        selects.append(f"{col.name}{cast}")
    names = ", ".join(name for name, _ in plan)
    sql = (
        f"INSERT INTO calls ({names}) SELECT {', '.join(selects)} FROM unnest({', '.join(params)}) "
        f"AS r({names}) ON CONFLICT (id, caller) DO NOTHING RETURNING caller, id"
    )
    return plan, sql


_ARRAY_TYPES = {
    Text: "text[]",
    DateTime: "timestamptz[]",
    Integer: "int4[]",
    Float: "float8[]",
    Boolean: "bool[]",
}
WRITE_COLUMNS, INSERT_CALLS_SQL = _write_plan()

# An arm's statistics gain the inserted calls' sums (one row per model, in the model's order: two
# writers lock the rows in the same order).
ARM_COLUMNS = [f.name for f in dataclass_fields(ArmStats)]
_ARM_TYPES = {"model": "text[]", "calls": "int8[]", "ok_calls": "int8[]", "rated": "int8[]",
              "completion_tokens_sum": "int8[]"}  # fmt: skip
BUMP_ARMS_SQL = (
    f"INSERT INTO arm_stats ({', '.join(ARM_COLUMNS)}) SELECT * FROM unnest("
    + ", ".join(f"${i + 1}::{_ARM_TYPES.get(c, 'float8[]')}" for i, c in enumerate(ARM_COLUMNS))
    + ") ON CONFLICT (model) DO UPDATE SET "
    + ", ".join(f"{c} = arm_stats.{c} + excluded.{c}" for c in ARM_COLUMNS if c != "model")
    + ", updated_at = now()"
)
