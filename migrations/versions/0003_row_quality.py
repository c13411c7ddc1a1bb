"""trust in the figures: every row carries a quality verdict computed from its own samples and a
flag, a job counts the keys it flagged or re-timed and records the host's reference workload.
Rows stored before this revision get their verdict from their stored samples, so nothing is lost.

Revision ID: 0003
Revises: 0002
"""
from array import array
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from gas_core.quality import assess

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("measurement", schema=None) as batch_op:
        batch_op.add_column(sa.Column("flagged", sa.Boolean(), nullable=False, server_default=sa.false()))
        batch_op.add_column(sa.Column("quality", sa.JSON(), nullable=True))
    with op.batch_alter_table("job", schema=None) as batch_op:
        batch_op.add_column(sa.Column("flagged", sa.Integer(), nullable=False, server_default="0"))
        batch_op.add_column(sa.Column("retimed", sa.Integer(), nullable=False, server_default="0"))
        batch_op.add_column(sa.Column("host_noise", sa.JSON(), nullable=True))
    _assess_stored_rows()


def _assess_stored_rows() -> None:
    """The default policy's verdict on every stored row, from its raw samples (float32 blob)."""
    m = sa.table("measurement", sa.column("id", sa.Integer), sa.column("samples", sa.LargeBinary),
                 sa.column("flagged", sa.Boolean), sa.column("quality", sa.JSON))
    conn = op.get_bind()
    for row_id, blob in conn.execute(sa.select(m.c.id, m.c.samples)).all():
        samples = array("f")
        samples.frombytes(blob)
        if not samples:
            continue
        q = assess(samples.tolist())
        conn.execute(m.update().where(m.c.id == row_id).values(flagged=q.flagged, quality=q.model_dump(mode="json")))


def downgrade() -> None:
    with op.batch_alter_table("job", schema=None) as batch_op:
        batch_op.drop_column("host_noise")
        batch_op.drop_column("retimed")
        batch_op.drop_column("flagged")
    with op.batch_alter_table("measurement", schema=None) as batch_op:
        batch_op.drop_column("quality")
        batch_op.drop_column("flagged")
