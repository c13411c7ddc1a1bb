"""untrusted imports and bounded queues: an environment records whether a host of this fleet
measured it or it came from an import (the default table of a device prefers a measured one), and
a job records the client that queued it (hashed token or address) so jobs per client are bounded.
Environments stored before this revision count as measured when a job or an end-to-end
measurement of this database ran in them, else as imported; a host re-marks its own environment
as measured when it starts.

Revision ID: 0004
Revises: 0003
"""
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("environment", schema=None) as batch_op:
        batch_op.add_column(sa.Column("origin", sa.String(16), nullable=False, server_default="measured"))
    with op.batch_alter_table("job", schema=None) as batch_op:
        batch_op.add_column(sa.Column("client", sa.String(64), nullable=True))
        batch_op.create_index("ix_job_client_state", ["client", "state"])
    env = sa.table("environment", sa.column("id", sa.Integer), sa.column("origin", sa.String))
    job = sa.table("job", sa.column("environment_id", sa.Integer))
    e2e = sa.table("e2e_measurement", sa.column("environment_id", sa.Integer))
    measured_here = sa.or_(sa.exists().where(job.c.environment_id == env.c.id),
                           sa.exists().where(e2e.c.environment_id == env.c.id))
    op.get_bind().execute(env.update().where(sa.not_(measured_here)).values(origin="imported"))


def downgrade() -> None:
    with op.batch_alter_table("job", schema=None) as batch_op:
        batch_op.drop_index("ix_job_client_state")
        batch_op.drop_column("client")
    with op.batch_alter_table("environment", schema=None) as batch_op:
        batch_op.drop_column("origin")
