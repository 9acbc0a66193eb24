"""First start: the default realm and a first administrator."""

from __future__ import annotations

import secrets
from typing import TYPE_CHECKING

from authgate.core.realms import DEFAULT_REALM
from authgate.core.users import NewUser

if TYPE_CHECKING:
    from authgate.core.engine import Core

ADMIN_USERNAME = "admin"


async def ensure_admin(core: Core) -> str | None:
    """Create the ``admin`` user of the default realm if it does not exist.

    Returns the generated password (to be shown once), or None when the admin already exists.
    """
    realm = await core.realms.require(DEFAULT_REALM)
    if await core.users.find(realm, ADMIN_USERNAME) is not None:
        return None
    password = secrets.token_urlsafe(18)
    await core.users.create(realm, NewUser(username=ADMIN_USERNAME, password=password,
                                           name="Administrator", roles=["admin"]),
                            event="admin.bootstrap")
    return password
