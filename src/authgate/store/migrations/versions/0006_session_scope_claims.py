"""Sessions granted only ``openid`` before scopes decided the claims shown keep showing the
claims they showed: their grant becomes ``openid profile email phone``.

Until this version a native sign-in asking for no scope was granted ``openid``, and its ID
tokens showed every standard claim whatever the scope. Claims now follow the scope (OIDC Core
§5.4); without this, such sessions would lose them at their next refresh.

Revision ID: 0006
Revises: 0005
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.execute("UPDATE sessions SET scope = 'openid profile email phone' WHERE scope = 'openid'")


def downgrade() -> None:
    # What a session asked for cannot be told from what it was given; the wider grant is
    # what the older version showed anyway.
    pass
