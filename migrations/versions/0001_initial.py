"""calls, feedback, arm statistics; pgvector with an HNSW index on rated calls' embeddings

Revision ID: 0001
Revises:
Create Date: 2026-11-22
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from pgvector.sqlalchemy import Vector
from sqlalchemy.dialects import postgresql

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.execute("CREATE EXTENSION IF NOT EXISTS vector")
    op.create_table(
        "calls",
        sa.Column("id", sa.Text(), primary_key=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.text("now()")),
        sa.Column("kind", sa.Text(), nullable=False, server_default="call"),
        sa.Column("duel_of", sa.Text()),
        sa.Column("caller", sa.Text()),
        sa.Column("requested_model", sa.Text(), nullable=False),
        sa.Column("model", sa.Text()),
        sa.Column("upstream_model", sa.Text()),
        sa.Column("messages", postgresql.JSONB(), nullable=False),
        sa.Column("prompt_hash", sa.Text(), nullable=False),
        sa.Column("embedding", Vector(384)),
        sa.Column("layer", sa.Text()),
        sa.Column("strategy", sa.Text()),
        sa.Column("policy", sa.Text()),
        sa.Column("propensity", sa.Float()),
        sa.Column("decision", postgresql.JSONB(), nullable=False, server_default=sa.text("'{}'::jsonb")),
        sa.Column("attempts", postgresql.JSONB(), nullable=False, server_default=sa.text("'[]'::jsonb")),
        sa.Column("status", sa.Text(), nullable=False),
        sa.Column("http_status", sa.Integer(), nullable=False),
        sa.Column("error", sa.Text()),
        sa.Column("stream", sa.Boolean(), nullable=False, server_default=sa.text("false")),
        sa.Column("overhead_ms", sa.Float()),
        sa.Column("upstream_ms", sa.Float()),
        sa.Column("ttft_ms", sa.Float()),
        sa.Column("prompt_tokens", sa.Integer()),
        sa.Column("completion_tokens", sa.Integer()),
        sa.Column("cost_usd", sa.Float()),
        sa.Column("response", sa.Text()),
        sa.Column("score", sa.Float()),
        sa.Column("score_source", sa.Text()),
        sa.Column("score_at", sa.DateTime(timezone=True)),
    )
    op.create_index("calls_created_at_idx", "calls", ["created_at"])
    op.create_index("calls_model_created_at_idx", "calls", ["model", "created_at"])
    op.create_index("calls_prompt_hash_idx", "calls", ["prompt_hash"])
    op.create_index(
        "calls_duel_of_idx", "calls", ["duel_of"], postgresql_where=sa.text("duel_of IS NOT NULL")
    )
    # Only rated calls are neighbours worth finding, so only they are in the HNSW index.
    op.create_index(
        "calls_embedding_hnsw_idx",
        "calls",
        ["embedding"],
        postgresql_using="hnsw",
        postgresql_ops={"embedding": "vector_cosine_ops"},
        postgresql_where=sa.text("score IS NOT NULL"),
    )
    op.create_table(
        "feedback",
        sa.Column("id", sa.BigInteger(), primary_key=True, autoincrement=True),
        sa.Column("request_id", sa.Text(), sa.ForeignKey("calls.id", ondelete="CASCADE"), nullable=False),
        sa.Column("score", sa.Float(), nullable=False),
        sa.Column("feedback_text", sa.Text()),
        sa.Column("source", sa.Text(), nullable=False, server_default="user"),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.text("now()")),
        sa.CheckConstraint("score >= 0 AND score <= 1", name="feedback_score_range"),
    )
    op.create_index("feedback_request_id_idx", "feedback", ["request_id", "created_at"])
    op.create_table(
        "arm_stats",
        sa.Column("model", sa.Text(), primary_key=True),
        sa.Column("calls", sa.BigInteger(), nullable=False, server_default="0"),
        sa.Column("ok_calls", sa.BigInteger(), nullable=False, server_default="0"),
        sa.Column("rated", sa.BigInteger(), nullable=False, server_default="0"),
        sa.Column("score_sum", sa.Float(), nullable=False, server_default="0"),
        sa.Column("latency_ms_sum", sa.Float(), nullable=False, server_default="0"),
        sa.Column("cost_usd_sum", sa.Float(), nullable=False, server_default="0"),
        sa.Column("completion_tokens_sum", sa.BigInteger(), nullable=False, server_default="0"),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.text("now()")),
    )


def downgrade() -> None:
    op.drop_table("arm_stats")
    op.drop_table("feedback")
    op.drop_table("calls")
