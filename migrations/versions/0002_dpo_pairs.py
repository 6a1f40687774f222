"""DPO preference pairs; calls.synthetic marks responses no model wrote (replay placeholders);
an index on calls.score_at

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-22
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column(
        "calls", sa.Column("synthetic", sa.Boolean(), nullable=False, server_default=sa.text("false"))
    )
    # Replicas read the ratings given since their last look (linear Thompson sampling stays in sync).
    op.create_index(
        "calls_score_at_idx", "calls", ["score_at"], postgresql_where=sa.text("score_at IS NOT NULL")
    )
    op.create_table(
        "dpo_pairs",
        sa.Column("id", sa.BigInteger(), primary_key=True, autoincrement=True),
        # The two calls, in id order (so a pair exists once, whichever call was rated last).
        sa.Column("call_a", sa.Text(), sa.ForeignKey("calls.id", ondelete="CASCADE"), nullable=False),
        sa.Column("call_b", sa.Text(), sa.ForeignKey("calls.id", ondelete="CASCADE"), nullable=False),
        sa.Column("prompt_hash", sa.Text(), nullable=False),
        sa.Column("messages", postgresql.JSONB(), nullable=False),
        sa.Column("chosen_id", sa.Text(), nullable=False),
        sa.Column("chosen_model", sa.Text(), nullable=False),
        sa.Column("chosen", sa.Text(), nullable=False),
        sa.Column("chosen_score", sa.Float(), nullable=False),
        sa.Column("rejected_id", sa.Text(), nullable=False),
        sa.Column("rejected_model", sa.Text(), nullable=False),
        sa.Column("rejected", sa.Text(), nullable=False),
        sa.Column("rejected_score", sa.Float(), nullable=False),
        sa.Column("margin", sa.Float(), nullable=False),
        sa.Column("similarity", sa.Float(), nullable=False, server_default="1"),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.text("now()")),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.text("now()")),
        sa.UniqueConstraint("call_a", "call_b", name="dpo_pairs_calls_key"),
        sa.CheckConstraint("call_a < call_b", name="dpo_pairs_ordered"),
    )
    op.create_index("dpo_pairs_updated_at_idx", "dpo_pairs", ["updated_at", "id"])


def downgrade() -> None:
    op.drop_table("dpo_pairs")
    op.drop_index("calls_score_at_idx", table_name="calls")
    op.drop_column("calls", "synthetic")
