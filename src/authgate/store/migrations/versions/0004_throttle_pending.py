"""Throttle counters hold the attempts still being checked, apart from the failures: of many
attempts sent at once, only as many as the free attempts left are checked.

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
    with op.batch_alter_table("throttle_counters") as batch_op:
        batch_op.add_column(sa.Column("pending", sa.Integer(), nullable=False,
                                      server_default="0"))
        batch_op.add_column(sa.Column("pending_until", sa.DateTime(timezone=True),
                                      nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("throttle_counters") as batch_op:
        batch_op.drop_column("pending_until")
        batch_op.drop_column("pending")
