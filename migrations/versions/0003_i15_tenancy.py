"""Tenancy: a call's key is (id, caller), so that each client key has its own request ids; feedback
and DPO pairs carry the caller; per-tenant rating sums (arm_ratings) so that one tenant's ratings
cannot swing another's arm statistics

Revision ID: 0003_i15_tenancy
Revises: 0002
Create Date: 2026-11-23
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003_i15_tenancy"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # The caller is "" on an open gateway (one tenant). Rows an open gateway wrote before this
    # revision carry the hash of whatever bearer token came with them: their tenant stays that.
    op.execute("UPDATE calls SET caller = '' WHERE caller IS NULL")
    op.alter_column("calls", "caller", nullable=False, server_default="")
    for table in ("feedback", "dpo_pairs"):
        op.add_column(table, sa.Column("caller", sa.Text(), nullable=False, server_default=""))
    op.execute("UPDATE feedback f SET caller = c.caller FROM calls c WHERE c.id = f.request_id")
    op.execute("UPDATE dpo_pairs p SET caller = c.caller FROM calls c WHERE c.id = p.call_a")
    op.drop_constraint("feedback_request_id_fkey", "feedback", type_="foreignkey")
    op.drop_constraint("dpo_pairs_call_a_fkey", "dpo_pairs", type_="foreignkey")
    op.drop_constraint("dpo_pairs_call_b_fkey", "dpo_pairs", type_="foreignkey")
    op.drop_constraint("dpo_pairs_calls_key", "dpo_pairs", type_="unique")
    op.drop_constraint("calls_pkey", "calls", type_="primary")
    op.create_primary_key("calls_pkey", "calls", ["id", "caller"])
    op.create_foreign_key(
        "feedback_call_fkey",
        "feedback",
        "calls",
        ["request_id", "caller"],
        ["id", "caller"],
        ondelete="CASCADE",
    )
    op.create_foreign_key(
        "dpo_pairs_call_a_fkey",
        "dpo_pairs",
        "calls",
        ["call_a", "caller"],
        ["id", "caller"],
        ondelete="CASCADE",
    )
    op.create_foreign_key(
        "dpo_pairs_call_b_fkey",
        "dpo_pairs",
        "calls",
        ["call_b", "caller"],
        ["id", "caller"],
        ondelete="CASCADE",
    )
    op.create_unique_constraint("dpo_pairs_calls_key", "dpo_pairs", ["caller", "call_a", "call_b"])
    op.drop_index("feedback_request_id_idx", table_name="feedback")
    op.create_index("feedback_request_id_idx", "feedback", ["request_id", "caller", "created_at"])
    op.create_table(
        "arm_ratings",
        sa.Column("model", sa.Text(), primary_key=True),
        sa.Column("caller", sa.Text(), primary_key=True),
        sa.Column("rated", sa.BigInteger(), nullable=False, server_default="0"),
        sa.Column("score_sum", sa.Float(), nullable=False, server_default="0"),
    )
    op.execute(
        "INSERT INTO arm_ratings (model, caller, rated, score_sum) "
        "SELECT model, caller, count(*), sum(score) FROM calls "
        "WHERE score IS NOT NULL AND model IS NOT NULL GROUP BY model, caller"
    )


def downgrade() -> None:
    # Fails if two tenants used the same request id (there is no way back to one key then).
    op.drop_table("arm_ratings")
    op.drop_index("feedback_request_id_idx", table_name="feedback")
    op.create_index("feedback_request_id_idx", "feedback", ["request_id", "created_at"])
    op.drop_constraint("dpo_pairs_calls_key", "dpo_pairs", type_="unique")
    op.drop_constraint("dpo_pairs_call_b_fkey", "dpo_pairs", type_="foreignkey")
    op.drop_constraint("dpo_pairs_call_a_fkey", "dpo_pairs", type_="foreignkey")
    op.drop_constraint("feedback_call_fkey", "feedback", type_="foreignkey")
    op.drop_constraint("calls_pkey", "calls", type_="primary")
    op.create_primary_key("calls_pkey", "calls", ["id"])
    op.create_unique_constraint("dpo_pairs_calls_key", "dpo_pairs", ["call_a", "call_b"])
    op.create_foreign_key(
        "feedback_request_id_fkey", "feedback", "calls", ["request_id"], ["id"], ondelete="CASCADE"
    )
    op.create_foreign_key(
        "dpo_pairs_call_a_fkey", "dpo_pairs", "calls", ["call_a"], ["id"], ondelete="CASCADE"
    )
    op.create_foreign_key(
        "dpo_pairs_call_b_fkey", "dpo_pairs", "calls", ["call_b"], ["id"], ondelete="CASCADE"
    )
    for table in ("dpo_pairs", "feedback"):
        op.drop_column(table, "caller")
    op.alter_column("calls", "caller", nullable=True, server_default=None)
