"""Devices a user signs in from, and their re-authentication tokens.

A device is recognised by its *device key* (Cognito's ``newDeviceMetadata``): the first sign-in
from a device not seen before issues a device key and the user's device group key; a client that
presents the key later is on a *remembered* device. A remembered device moves the per-login
throttle key to a per-device key (see ``core/signin.py``), so a stranger who only knows the login
id cannot lock the owner out of it.

A device may also hold one *re-authentication token* (the web API's 30-day token): it signs the
user in without the password, once; each use consumes it and issues its successor. Tokens are
stored as SHA-256 digests. Revoking a device revokes its token and ends its sessions.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING

from authgate.core.errors import AuthError, ErrorCode
from authgate.core.models import ClientInfo, Device, Realm, ReauthToken, User
from authgate.crypto.tokens import digest, new_id, new_token

if TYPE_CHECKING:
    from authgate.core.engine import Core
    from authgate.core.ports import Tx

# Audit event types (stable names).
DEVICE_REGISTERED = "device.registered"
DEVICE_REVOKED = "device.revoked"
REAUTH_TOKEN_ISSUED = "device.reauth_token_issued"
REAUTH_TOKEN_USED = "device.reauth_token_used"
REAUTH_TOKEN_REFUSED = "device.reauth_token_refused"
REAUTH_TOKENS_REVOKED = "device.reauth_tokens_revoked"

MAX_DEVICE_NAME = 200
MAX_PRESENTED_KEY = 128


@dataclass(slots=True)
class DeviceSighting:
    """The device a sign-in came from; ``is_new`` when its key was issued just now."""

    device: Device
    is_new: bool


@dataclass(slots=True)
class Reauthentication:
    """A successful use of a re-authentication token: who, from which device, and the
    token that replaces the one just used."""

    user: User
    device: Device
    token: str


def _clean_name(name: str | None) -> str | None:
    if name is None:
        return None
    name = name.strip()[:MAX_DEVICE_NAME]
    return name or None


class Devices:
    def __init__(self, core: Core) -> None:
        self.core = core

    # Recognising devices.

    async def remembered(self, user: User, device_key: str | None) -> Device | None:
        """The user's live device with this key, or None."""
        if not device_key or len(device_key) > MAX_PRESENTED_KEY:
            return None
        async with self.core.store.transaction() as tx:
            device = await tx.devices.by_key(device_key)
        if device is None or device.user_id != user.id or device.revoked_at is not None:
            return None
        return device

    async def sighting(self, realm: Realm, user: User, device_key: str | None, *,
                       name: str | None = None,
                       client: ClientInfo | None = None) -> DeviceSighting:
        """The device of a successful sign-in: the remembered one the presented key names, or a
        new one with a new device key. An unknown, revoked or someone else's key gets a new
        device: a key is never moved between users."""
        device = await self.remembered(user, device_key)
        now = self.core.now()
        if device is not None:
            async with self.core.store.transaction(write=True) as tx:
                await tx.devices.touch(device.id, now, _clean_name(name))
            device.last_seen_at = now
            device.name = _clean_name(name) or device.name
            return DeviceSighting(device, is_new=False)
        async with self.core.store.transaction(write=True) as tx:
            device = await self._register(tx, realm, user, _clean_name(name), client)
        return DeviceSighting(device, is_new=True)

    async def named(self, realm: Realm, user: User, name: str, *,
                    client: ClientInfo | None = None) -> Device:
        """The user's live device of this name (the web API names devices, it has no keys),
        created on first use."""
        clean = _clean_name(name)
        if clean is None:
            raise AuthError(ErrorCode.INVALID_REQUEST, "A device name is required.",
                            details={"field": "deviceName"})
        now = self.core.now()
        async with self.core.store.transaction(write=True) as tx:
            for device in await tx.devices.for_user(user.id):
                if device.revoked_at is None and device.name == clean:
                    await tx.devices.touch(device.id, now)
                    device.last_seen_at = now
                    return device
            return await self._register(tx, realm, user, clean, client)

    async def _register(self, tx: Tx, realm: Realm, user: User, name: str | None,
                        client: ClientInfo | None) -> Device:
        existing = await tx.devices.for_user(user.id)
        # One device group per user: all of a user's devices share its group key.
        group_key = existing[0].device_group_key if existing else "-" + new_token(24)
        now = self.core.now()
        device = Device(id=new_id(), realm_id=realm.id, user_id=user.id,
                        device_key=f"{realm.name[:40]}_{new_id()}", device_group_key=group_key,
                        name=name, created_at=now, last_seen_at=now,
                        user_agent=((client.user_agent or "")[:512] or None) if client else None)
        await tx.devices.add(device)
        await self.core.audit.record(tx, DEVICE_REGISTERED, realm_id=realm.id, user_id=user.id,
                                     client=client, device_id=device.id)
        return device

    async def list_for_user(self, realm: Realm, user_id: str, *,
                            include_revoked: bool = False) -> list[Device]:
        async with self.core.store.transaction() as tx:
            devices = await tx.devices.for_user(user_id)
        return [d for d in devices if d.realm_id == realm.id
                and (include_revoked or d.revoked_at is None)]

    async def get(self, realm: Realm, device_id: str, *, user_id: str | None = None) -> Device:
        async with self.core.store.transaction() as tx:
            device = await tx.devices.get(device_id[:64])
        if device is None or device.realm_id != realm.id or (
                user_id is not None and device.user_id != user_id):
            raise AuthError(ErrorCode.DEVICE_NOT_FOUND)
        return device

    # Revoking.

    async def revoke(self, realm: Realm, device_id: str, *, user_id: str | None = None,
                     client: ClientInfo | None = None) -> Device:
        """Forget a device: its re-authentication token and its sessions end with it.
        ``user_id`` restricts this to that user's own devices."""
        device = await self.get(realm, device_id, user_id=user_id)
        if device.revoked_at is not None:
            raise AuthError(ErrorCode.DEVICE_NOT_FOUND)
        now = self.core.now()
        async with self.core.store.transaction(write=True) as tx:
            await tx.devices.revoke(device.id, now)
            tokens = await tx.reauth_tokens.revoke_for_device(device.id, now)
            sessions = await tx.sessions.revoke_for_device(device.id, now, "device_revoked")
            await self.core.audit.record(tx, DEVICE_REVOKED, realm_id=realm.id,
                                         user_id=device.user_id, client=client,
                                         device_id=device.id, reauth_tokens=tokens,
                                         sessions=len(sessions))
        device.revoked_at = now
        return device

    async def revoke_reauth_token(self, realm: Realm, device_id: str, *,
                                  user_id: str | None = None,
                                  client: ClientInfo | None = None) -> int:
        """Revoke one device's re-authentication token; the device stays remembered."""
        device = await self.get(realm, device_id, user_id=user_id)
        async with self.core.store.transaction(write=True) as tx:
            count = await tx.reauth_tokens.revoke_for_device(device.id, self.core.now())
            await self.core.audit.record(tx, REAUTH_TOKENS_REVOKED, realm_id=realm.id,
                                         user_id=device.user_id, client=client,
                                         device_id=device.id, count=count)
        return count

    async def revoke_all_reauth_tokens(self, realm: Realm, user_id: str, *,
                                       client: ClientInfo | None = None) -> int:
        """Revoke the re-authentication tokens of every device of the user."""
        now = self.core.now()
        async with self.core.store.transaction(write=True) as tx:
            count = await self.revoke_reauth_tokens_in(tx, realm, user_id, now)
            await self.core.audit.record(tx, REAUTH_TOKENS_REVOKED, realm_id=realm.id,
                                         user_id=user_id, client=client, count=count)
        return count

    @staticmethod
    async def revoke_reauth_tokens_in(tx: Tx, realm: Realm, user_id: str, now: datetime) -> int:
        """Inside a write that ends a user's sign-ins (a new password, a disabled account):
        a re-authentication token signs in without the password, so it ends with them."""
        count = 0
        for device in await tx.devices.for_user(user_id):
            if device.realm_id == realm.id:
                count += await tx.reauth_tokens.revoke_for_device(device.id, now)
        return count

    # Re-authentication tokens.

    async def issue_reauth_token(self, realm: Realm, device: Device, *,
                                 client: ClientInfo | None = None) -> str:
        """A new re-authentication token for the device; its previous one stops working
        (one live token per device)."""
        if device.revoked_at is not None or device.realm_id != realm.id:
            raise AuthError(ErrorCode.DEVICE_NOT_FOUND)
        async with self.core.store.transaction(write=True) as tx:
            raw = await self._issue(tx, device)
            await self.core.audit.record(tx, REAUTH_TOKEN_ISSUED, realm_id=realm.id,
                                         user_id=device.user_id, client=client,
                                         device_id=device.id)
        return raw

    async def _issue(self, tx: Tx, device: Device) -> str:
        now = self.core.now()
        await tx.reauth_tokens.revoke_for_device(device.id, now)
        raw = new_token(32)
        ttl = timedelta(seconds=self.core.settings.reauth_token_ttl)
        await tx.reauth_tokens.add(ReauthToken(id=new_id(), device_id=device.id,
                                               token_hash=digest(raw), created_at=now,
                                               expires_at=now + ttl))
        return raw

    async def reauthenticate(self, realm: Realm, raw: str, *,
                             client: ClientInfo | None = None) -> Reauthentication:
        """Use a re-authentication token: once. It is consumed and its successor returned.
        Unknown, used, revoked and expired tokens, revoked devices and disabled users all get
        the same INVALID_TOKEN."""
        if not raw or len(raw) > 512:
            raise AuthError(ErrorCode.INVALID_TOKEN)
        now = self.core.now()
        refused: str | None = None
        async with self.core.store.transaction(write=True) as tx:
            token = await tx.reauth_tokens.by_hash(digest(raw))
            device = await tx.devices.get(token.device_id) if token else None
            user = await tx.users.get(device.user_id) if device else None
            if token is None or device is None or user is None or device.realm_id != realm.id:
                refused = "unknown"
            elif device.revoked_at is not None:
                refused = "device_revoked"
            elif token.revoked_at is not None or token.used_at is not None:
                refused = "used_or_revoked"
            elif token.expires_at <= now:
                refused = "expired"
            elif user.status != "active":
                refused = "user_disabled"
            elif not await tx.reauth_tokens.consume(token.id, now):
                refused = "used_or_revoked"  # a concurrent use won
            if refused is None:
                assert device is not None and user is not None
                successor = await self._issue(tx, device)
                await tx.devices.touch(device.id, now)
                await self.core.audit.record(tx, REAUTH_TOKEN_USED, realm_id=realm.id,
                                             user_id=user.id, client=client,
                                             device_id=device.id)
        if refused is not None:
            async with self.core.store.transaction(write=True) as tx:
                await self.core.audit.record(
                    tx, REAUTH_TOKEN_REFUSED, realm_id=realm.id,
                    user_id=user.id if user and device and device.realm_id == realm.id
                    else None, client=client, reason=refused)
            raise AuthError(ErrorCode.INVALID_TOKEN,
                            "The re-authentication token is invalid or has expired.")
        assert device is not None and user is not None
        return Reauthentication(user=user, device=device, token=successor)
