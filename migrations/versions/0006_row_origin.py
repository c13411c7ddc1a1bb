"""A measurement row records its origin: measured by a host of this database, or imported from a
file (an import that replaced measured rows used to leave no trace). Rows stored before this
revision are taken as measured, except those of environments created by an import.

Revision ID: 0006
Revises: 0005
"""
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("measurement", schema=None) as batch_op:
        batch_op.add_column(sa.Column("origin", sa.String(16), nullable=False, server_default="measured"))
    op.execute("UPDATE measurement SET origin = 'imported' WHERE environment_id IN "
               "(SELECT id FROM environment WHERE origin = 'imported')")


def downgrade() -> None:
    with op.batch_alter_table("measurement", schema=None) as batch_op:
        batch_op.drop_column("origin")
