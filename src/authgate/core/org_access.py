"""Signing in to one organisation without a password: as a guest, or with a token that the
organisation's own backend signed (HS256, with the organisation's secret).

The rules live here, not in a dialect:

- A guest is a new anonymous user with the ``guest`` role in the organisation. A contact e-mail
  given by a guest is kept as an attribute, never as a login id: nobody can claim an address by
  naming it.
- A customer token names its organisation in ``aud`` = ``<realm issuer>/projects/<org id>``; only
  that organisation's secret verifies it, only HS256 is accepted (never ``none``), and ``exp`` is
  enforced when present. Its ``_id`` is the customer's own user id: the user it denotes is found
  by an external id scoped to the organisation, so one organisation's secret can never sign in
  a user of another organisation or an account that exists on its own (a customer-asserted
  e-mail is not linked to an existing account either). The user becomes a member with the
  token's role the first time; an inactive membership is refused.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from authgate.core.errors import AuthError, ErrorCode
from authgate.core.models import ClientInfo, Membership, Organisation, Realm, User
from authgate.core.ports import Tx
from authgate.core.throttle import address_block
from authgate.core.users import EMAIL, NewUser
from authgate.crypto import jwt as jwtlib

if TYPE_CHECKING:
    from authgate.core.engine import Core

GUEST_ROLE = "guest"
CUSTOMER_ROLES = ("owner", "admin", "agent", "user")
DEFAULT_CUSTOMER_ROLE = "user"
CONTACT_EMAIL = "contact_email"
# Organisation setting: whether anonymous guests may sign in (default: yes).
ALLOW_GUESTS = "allow_guests"


@dataclass(slots=True)
class OrganisationSignIn:
    """Who signed in, to which organisation, with which membership."""

    user: User
    organisation: Organisation
    membership: Membership
    # For a customer token: its verified claims.
    claims: dict[str, Any] = field(default_factory=dict)


def _name(value: Any, field_name: str) -> str | None:
    if value is None or value == "":
        return None
    if not isinstance(value, str) or len(value) > 200:
        raise AuthError(ErrorCode.INVALID_REQUEST, f"{field_name} must be a short string.",
                        details={"field": field_name})
    return value


def _contact_email(value: Any) -> str | None:
    if value is None or value == "":
        return None
    if not isinstance(value, str) or len(value) > 320 or not EMAIL.match(value.strip()):
        raise AuthError(ErrorCode.INVALID_REQUEST, "The e-mail address is not valid.",
                        details={"field": "email"})
    return value.strip()


def _attributes(value: Any, contact_email: str | None) -> dict[str, Any]:
    if value is None:
        value = {}
    if not isinstance(value, dict):
        raise AuthError(ErrorCode.INVALID_REQUEST, "attributes must be an object.",
                        details={"field": "attributes"})
    attributes = dict(value)
    if contact_email:
        attributes[CONTACT_EMAIL] = contact_email
    return attributes


class OrganisationAccess:
    def __init__(self, core: Core) -> None:
        self.core = core

    @staticmethod
    def _check_open(org: Organisation) -> None:
        if not org.is_active:
            raise AuthError(ErrorCode.ORGANISATION_INACTIVE)
        if org.is_suspended:
            raise AuthError(ErrorCode.ORGANISATION_SUSPENDED)

    def _member_hook(self, realm: Realm, org: Organisation, role: str,
                     found: dict[str, Membership]) -> Any:
        async def hook(tx: Tx, user: User) -> None:
            found["membership"] = await self.core.organisations.add_member(
                realm, org, user.id, roles=[role], tx=tx)

        return hook

    # Guests.

    async def guest(self, realm: Realm, org_id: str, *, given_name: Any = None,
                    family_name: Any = None, contact_email: Any = None, attributes: Any = None,
                    client: ClientInfo | None = None) -> OrganisationSignIn:
        """A new anonymous user, member of the organisation with the guest role. Each client
        address may create ``throttle_guest_free_attempts`` guests per window, then backs off:
        knowing a project id must not let anyone fill the user table."""
        if not org_id or len(org_id) > 64:
            raise AuthError(ErrorCode.ORGANISATION_NOT_FOUND)
        org = await self.core.organisations.get(realm, org_id)
        self._check_open(org)
        if not org.settings.get(ALLOW_GUESTS, True):
            raise AuthError(ErrorCode.FORBIDDEN, "Guests may not sign in to this organisation.")
        throttle = self.core.throttle
        address = address_block(client.ip) if client and client.ip else "-"
        key = throttle.scoped_key("guest", f"{realm.id}:{address}",
                                  self.core.settings.throttle_guest_free_attempts)
        await throttle.spend([key])  # every guest counts
        email = _contact_email(contact_email)
        new = NewUser(is_anonymous=True,
                      given_name=_name(given_name, "firstname") or
                      "guest#" + uuid.uuid4().hex[:4],
                      family_name=_name(family_name, "lastname"),
                      custom_attributes=_attributes(attributes, email))
        found: dict[str, Membership] = {}
        user = await self.core.users.create(
            realm, new, client=client, event="user.guest_created",
            hooks=[self._member_hook(realm, org, GUEST_ROLE, found)])
        return OrganisationSignIn(user, org, found["membership"])

    # Customer-signed tokens.

    def audience_prefix(self, realm: Realm) -> str:
        return self.core.realms.issuer(realm) + "/projects/"

    async def customer_token(self, realm: Realm, token: str, *,
                             client: ClientInfo | None = None) -> OrganisationSignIn:
        """Verify a token signed by an organisation's backend and sign its user in there."""
        if not token or len(token) > 8192:
            raise AuthError(ErrorCode.INVALID_TOKEN)
        try:
            header = jwtlib.unverified_header(token)
            unverified = jwtlib.unverified_claims(token)
        except jwtlib.TokenError:
            raise AuthError(ErrorCode.INVALID_TOKEN) from None
        if header.get("alg") != "HS256":
            raise AuthError(ErrorCode.INVALID_TOKEN)
        audience = unverified.get("aud")
        if not audience:
            raise AuthError(ErrorCode.INVALID_REQUEST, "JWT Aud field is required",
                            details={"reason": "aud_required"})
        org = await self._audience_organisation(realm, audience)
        secret = self.core.organisations.secret(org)
        if secret is None:
            raise AuthError(ErrorCode.INVALID_TOKEN)
        try:
            claims = jwtlib.verify_hs256(token, secret,
                                         audience=self.audience_prefix(realm) + org.id,
                                         now=self.core.now().timestamp())
        except jwtlib.TokenError as exc:
            raise AuthError(ErrorCode.TOKEN_EXPIRED if exc.expired
                            else ErrorCode.INVALID_TOKEN) from None
        self._check_open(org)

        external = claims.get("_id")
        if isinstance(external, bool) or not isinstance(external, (str, int)) or \
                not str(external) or len(str(external)) > 200:
            raise AuthError(ErrorCode.INVALID_TOKEN, "The token has no _id.")
        role = claims.get("role") or DEFAULT_CUSTOMER_ROLE
        if role not in CUSTOMER_ROLES:
            raise AuthError(ErrorCode.INVALID_REQUEST, "Unknown role.")
        try:
            email = _contact_email(claims.get("email"))
            given, family = _name(claims.get("firstname"), "firstname"), \
                _name(claims.get("lastname"), "lastname")
            attributes = _attributes(claims.get("attributes"), email)
        except AuthError as exc:
            # A claim, not a field of the request body.
            raise AuthError(ErrorCode.INVALID_REQUEST, "The token's "
                            f"{exc.details.get('field')} claim is invalid.") from None

        external_id = f"{org.id}:{external}"
        async with self.core.store.transaction() as tx:
            user = await tx.users.by_external_id(realm.id, external_id)
        if user is None:
            found: dict[str, Membership] = {}
            try:
                user = await self.core.users.create(
                    realm, NewUser(external_id=external_id, given_name=given,
                                   family_name=family, custom_attributes=attributes),
                    client=client, event="user.external_created",
                    hooks=[self._member_hook(realm, org, role, found)])
                return OrganisationSignIn(user, org, found["membership"], claims)
            except AuthError as exc:
                if exc.code is not ErrorCode.USER_ALREADY_EXISTS:
                    raise
            # A concurrent first sign-in with the same token created the user: use it.
            async with self.core.store.transaction() as tx:
                user = await tx.users.by_external_id(realm.id, external_id)
            if user is None:
                raise AuthError(ErrorCode.INVALID_TOKEN)

        if user.status != "active":
            raise AuthError(ErrorCode.USER_DISABLED)
        changes = {k: v for k, v in (("given_name", given), ("family_name", family),
                                     ("custom_attributes", attributes))
                   if getattr(user, k) != v}
        if changes:
            user = await self.core.users.update_profile(realm, user.id, changes)
        membership = await self.core.organisations.membership(org, user.id)
        if membership is None:
            membership = await self.core.organisations.add_member(realm, org, user.id,
                                                                  roles=[role])
        elif membership.status != "active":
            raise AuthError(ErrorCode.MEMBERSHIP_INACTIVE)
        return OrganisationSignIn(user, org, membership, claims)

    async def _audience_organisation(self, realm: Realm, audience: Any) -> Organisation:
        prefix = self.audience_prefix(realm)
        candidates = audience if isinstance(audience, list) else [audience]
        for candidate in candidates:
            if isinstance(candidate, str) and candidate.startswith(prefix):
                org_id = candidate[len(prefix):]
                if org_id and "/" not in org_id and len(org_id) <= 64:
                    async with self.core.store.transaction() as tx:
                        org = await tx.organisations.get(org_id)
                    if org is not None and org.realm_id == realm.id:
                        return org
        raise AuthError(ErrorCode.INVALID_TOKEN)
