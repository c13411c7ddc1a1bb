"""runtimes: an end-to-end measurement records the runtime the network ran under (eager,
onnxruntime, torch_compile, cuda_graph); rows stored before this revision ran eagerly.

Revision ID: 0005
Revises: 0004
"""
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("e2e_measurement", schema=None) as batch_op:
        batch_op.add_column(sa.Column("runtime", sa.String(16), nullable=False, server_default="eager"))


def downgrade() -> None:
    with op.batch_alter_table("e2e_measurement", schema=None) as batch_op:
        batch_op.drop_column("runtime")
