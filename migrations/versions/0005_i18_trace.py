"""calls.trace_id (the call's OpenTelemetry trace); indexes for the dashboard's reads: calls by key
and time, calls by trace id, a call's DPO pairs (as call_b), pairs by creation time

Revision ID: 0005_i18_trace
Revises: 0003_i15_tenancy
Create Date: 2026-11-27
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005_i18_trace"
down_revision: str | None = "0003_i15_tenancy"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("calls", sa.Column("trace_id", sa.Text()))
    op.create_index(
        "calls_trace_id_idx", "calls", ["trace_id"], postgresql_where=sa.text("trace_id IS NOT NULL")
    )
    # The calls list filtered by key walks this one backwards from the newest.
    op.create_index("calls_caller_created_at_idx", "calls", ["caller", "created_at"])
    # dpo_pairs_calls_key (call_a, call_b) finds a call's pairs as call_a; this one as call_b.
    op.create_index("dpo_pairs_call_b_idx", "dpo_pairs", ["call_b"])
    op.create_index("dpo_pairs_created_at_idx", "dpo_pairs", ["created_at"])


def downgrade() -> None:
    op.drop_index("dpo_pairs_created_at_idx", table_name="dpo_pairs")
    op.drop_index("dpo_pairs_call_b_idx", table_name="dpo_pairs")
    op.drop_index("calls_caller_created_at_idx", table_name="calls")
    op.drop_index("calls_trace_id_idx", table_name="calls")
    op.drop_column("calls", "trace_id")
