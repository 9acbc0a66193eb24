"""Users carry a security stamp, changed with the password, the status or a sign-out
everywhere: a sign-in still in flight when it changes opens no session.

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
    # Existing users start with the empty stamp; the first change gives them a random one.
    with op.batch_alter_table("users") as batch_op:
        batch_op.add_column(sa.Column("security_stamp", sa.String(32), nullable=False,
                                      server_default=""))


def downgrade() -> None:
    with op.batch_alter_table("users") as batch_op:
        batch_op.drop_column("security_stamp")
