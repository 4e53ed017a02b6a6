"""A key's budget period: its spend starts again at 0 when the period ends.

Revision ID: 0002
Revises: 0001
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("api_keys") as table:  # SQLite alters by copying the table
        table.add_column(sa.Column("budget_period", sa.String(8), nullable=True))
        table.add_column(sa.Column("budget_reset_at", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("api_keys") as table:
        table.drop_column("budget_reset_at")
        table.drop_column("budget_period")
