"""One user per external id in a realm.

Two first sign-ins with one customer-signed token could otherwise create two users.

Revision ID: 0002
Revises: 0001
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.drop_index("ix_users_realm_external", table_name="users")
    op.create_index("uq_users_realm_external", "users", ["realm_id", "external_id"],
                    unique=True)


def downgrade() -> None:
    op.drop_index("uq_users_realm_external", table_name="users")
    op.create_index("ix_users_realm_external", "users", ["realm_id", "external_id"])
