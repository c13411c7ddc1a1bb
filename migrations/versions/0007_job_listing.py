"""Jobs listed by what is returned, not what is stored: an index on created_at (GET /jobs reads
the newest N), and ended jobs drop their key lists (a cancelled 4,988-key job kept 0.39 MB).

Revision ID: 0007
Revises: 0006
"""
from collections.abc import Sequence

from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_index("ix_job_created", "job", ["created_at"])
    op.execute("UPDATE job SET keys = '[]' WHERE state IN ('done', 'failed', 'cancelled')")


def downgrade() -> None:
    op.drop_index("ix_job_created", table_name="job")
