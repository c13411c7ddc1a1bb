"""Each environment keeps the host's quiet calibration: the reference workload's medians at
points timed while no other process competed (gas_core.quality.Calibration), so a job that
starts on a busy host is judged against the host's quiet speed, not only its own points.

Revision ID: 0008
Revises: 0007
"""
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("environment") as batch:
        batch.add_column(sa.Column("calibration", sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("environment") as batch:
        batch.drop_column("calibration")
