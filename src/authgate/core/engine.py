"""The composition root of the identity core: one object that holds every core service.

Surfaces (``api/``, ``dialects/``, the CLI) receive a ``Core`` and call its services. Nothing in
``core/`` imports a web framework or a database driver: storage arrives as a ``Store``.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime

from authgate.config import Settings
from authgate.core.api_keys import ApiKeys
from authgate.core.audit import Audit
from authgate.core.challenges import Challenges
from authgate.core.devices import Devices
from authgate.core.housekeeping import Housekeeping
from authgate.core.introspection import Introspection
from authgate.core.keys import Keys
from authgate.core.mail import Mail
from authgate.core.models import utcnow
from authgate.core.org_policy import OrgPolicies
from authgate.core.org_access import OrganisationAccess
from authgate.core.organisations import Organisations
from authgate.core.ports import Store
from authgate.core.realms import Realms
from authgate.core.sessions import Sessions
from authgate.core.signin import SignIn
from authgate.core.throttle import Throttle
from authgate.core.totp import Totp
from authgate.core.users import Users
from authgate.core.verification import Verification
from authgate.crypto.passwords import PasswordHasher
from authgate.crypto.secretbox import SecretBox


class Core:
    def __init__(self, settings: Settings, store: Store, master_secret: bytes, *,
                 clock: Callable[[], datetime] = utcnow,
                 hasher: PasswordHasher | None = None) -> None:
        self.settings = settings
        self.store = store
        self.box = SecretBox(master_secret)
        self.now = clock
        self.hasher = hasher or PasswordHasher(
            memory_kib=settings.argon2_memory_kib, time_cost=settings.argon2_time_cost,
            parallelism=settings.argon2_parallelism, workers=settings.hash_workers)
        self.audit = Audit(self)
        self.housekeeping = Housekeeping(self)
        self.realms = Realms(self)
        self.keys = Keys(self)
        self.throttle = Throttle(self)
        self.users = Users(self)
        self.sessions = Sessions(self)
        self.signin = SignIn(self)
        self.organisations = Organisations(self)
        self.mail = Mail(self)
        self.org_policy = OrgPolicies(self)
        self.challenges = Challenges(self)
        self.verification = Verification(self)
        self.org_access = OrganisationAccess(self)
        self.devices = Devices(self)
        self.api_keys = ApiKeys(self)
        self.introspection = Introspection(self)
        self.totp = Totp(self)

    async def close(self) -> None:
        self.hasher.close()
        await self.store.close()
