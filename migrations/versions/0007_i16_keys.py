"""Virtual keys (only a hash of each secret is stored); calls.key_id (the virtual key a call was
made with, its tenant being the key's owner in calls.caller) and an index for a key's spend

Revision ID: 0007_i16_keys
Revises: 0006_i13_embedder
Create Date: 2026-11-23
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0007_i16_keys"
down_revision: str | None = "0006_i13_embedder"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "api_keys",
        sa.Column("id", sa.Text(), primary_key=True),
        sa.Column("key_hash", sa.Text(), nullable=False, unique=True),
        sa.Column("prefix", sa.Text(), nullable=False),
        sa.Column("owner", sa.Text(), nullable=False),
        sa.Column("name", sa.Text()),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.text("now()")),
        sa.Column("expires_at", sa.DateTime(timezone=True)),
        sa.Column("revoked_at", sa.DateTime(timezone=True)),
        sa.Column("models", postgresql.ARRAY(sa.Text())),
        sa.Column("rpm", sa.Integer()),
        sa.Column("tpm", sa.Integer()),
        sa.Column("budget_day_usd", sa.Float()),
        sa.Column("budget_month_usd", sa.Float()),
        sa.Column("budget_total_usd", sa.Float()),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.text("now()")),
    )
    op.create_index("api_keys_owner_idx", "api_keys", ["owner"])
    # Budgets are seeded from, and /v1/keys/{id}/spend reads, a key's calls by time.
    op.add_column("calls", sa.Column("key_id", sa.Text()))
    op.create_index(
        "calls_key_id_created_at_idx",
        "calls",
        ["key_id", "created_at"],
        postgresql_where=sa.text("key_id IS NOT NULL"),
    )


def downgrade() -> None:
    op.drop_index("calls_key_id_created_at_idx", table_name="calls")
    op.drop_column("calls", "key_id")
    op.drop_table("api_keys")
