"""calls.embedder: the id of the embedder that made a call's embedding (issue 13). Searches compare
only the current embedder's embeddings; every row stored before has MiniLM's id (all-MiniLM-L6-v2
made every embedding until then).

The column is added with a default and the default dropped at once: PostgreSQL keeps such a default
in the catalogue for the existing rows (no table rewrite, whatever the table's size); new rows get
their embedder's id from the gateway (NULL when they have no embedding).

Revision ID: 0006_i13_embedder
Revises: 0005_i18_trace
Create Date: 2026-11-27
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006_i13_embedder"
down_revision: str | None = "0005_i18_trace"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

MINILM = "all-minilm-l6-v2"  # gateway.embedders.minilm.ID (a migration does not import the app)


def upgrade() -> None:
    op.add_column("calls", sa.Column("embedder", sa.Text(), server_default=MINILM))
    op.alter_column("calls", "embedder", server_default=None)


def downgrade() -> None:
    op.drop_column("calls", "embedder")
