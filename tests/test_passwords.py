"""Password hashing and policy: Argon2id, imported schemes, re-hash on sign-in, common passwords."""

from __future__ import annotations

import base64
import hashlib
import os

import bcrypt
import pytest

from authgate.core.engine import Core
from authgate.core.errors import AuthError, ErrorCode
from authgate.core.models import Realm
from authgate.core.password_policy import PasswordPolicy, common_passwords
from authgate.core.users import NewUser
from authgate.crypto.passwords import PasswordHasher, is_supported_hash

SECRET = "import me please 42"


@pytest.fixture(scope="module")
def hasher() -> PasswordHasher:
    return PasswordHasher(memory_kib=1024, time_cost=1, parallelism=1, workers=2)


def django_pbkdf2(password: str, iterations: int = 1000) -> str:
    salt = "saltsaltsalt"
    raw = hashlib.pbkdf2_hmac("sha256", password.encode(), salt.encode(), iterations)
    return f"pbkdf2_sha256${iterations}${salt}${base64.b64encode(raw).decode()}"


def passlib_pbkdf2(password: str, rounds: int = 1000) -> str:
    salt = os.urandom(16)
    raw = hashlib.pbkdf2_hmac("sha256", password.encode(), salt, rounds)
    ab64 = lambda b: base64.b64encode(b, altchars=b"./").decode().rstrip("=")  # noqa: E731
    return f"$pbkdf2-sha256${rounds}${ab64(salt)}${ab64(raw)}"


def passlib_scrypt(password: str) -> str:
    salt = os.urandom(16)
    raw = hashlib.scrypt(password.encode(), salt=salt, n=1 << 10, r=8, p=1, dklen=32)
    b64 = lambda b: base64.b64encode(b).decode().rstrip("=")  # noqa: E731
    return f"$scrypt$ln=10,r=8,p=1${b64(salt)}${b64(raw)}"


@pytest.mark.parametrize("make", [
    lambda p: bcrypt.hashpw(p.encode(), bcrypt.gensalt(rounds=4)).decode(),
    lambda p: bcrypt.hashpw(p.encode(), bcrypt.gensalt(rounds=4)).decode().replace("$2b$", "$2y$"),
    django_pbkdf2, passlib_pbkdf2, passlib_scrypt,
], ids=["bcrypt-2b", "bcrypt-2y", "pbkdf2-django", "pbkdf2-passlib", "scrypt-passlib"])
def test_imported_hashes_verify_and_ask_for_a_rehash(hasher: PasswordHasher, make):
    stored = make(SECRET)
    assert is_supported_hash(stored)
    good = hasher.verify_sync(stored, SECRET)
    assert good.ok and good.needs_rehash
    assert not hasher.verify_sync(stored, SECRET + "x").ok


def test_argon2id_hashes_verify_without_rehash_at_the_same_parameters(hasher: PasswordHasher):
    stored = hasher.hash_sync(SECRET)
    assert stored.startswith("$argon2id$v=19$m=1024,t=1,p=1$")
    assert hasher.verify_sync(stored, SECRET).ok
    assert not hasher.verify_sync(stored, SECRET).needs_rehash
    stronger = PasswordHasher(memory_kib=2048, time_cost=1, parallelism=1, workers=1)
    assert stronger.verify_sync(stored, SECRET).needs_rehash


@pytest.mark.parametrize("stored", ["", "plain", "$2b$04$short", "pbkdf2_sha256$x$salt$abc",
                                    "pbkdf2_sha256$999999999$s$AAAA", "$argon2id$garbage",
                                    "$scrypt$ln=30,r=8,p=1$AAAA$AAAA"])
def test_malformed_or_abusive_hashes_never_verify(hasher: PasswordHasher, stored: str):
    assert not hasher.verify_sync(stored, SECRET).ok


def test_bcrypt_refuses_passwords_longer_than_it_reads(hasher: PasswordHasher):
    long = "a" * 72
    stored = bcrypt.hashpw(long.encode(), bcrypt.gensalt(rounds=4)).decode()
    assert hasher.verify_sync(stored, long).ok
    assert not hasher.verify_sync(stored, long + "b").ok  # bcrypt itself would say yes


def test_the_policy_rejects_short_common_and_login_id_passwords():
    policy = PasswordPolicy(min_length=8, max_length=64, reject_common=True)
    assert "123456789" in common_passwords() and len(common_passwords()) > 19_000
    assert policy.problems("short") == ["must be at least 8 characters"]
    assert policy.problems("password1") == ["is too common"]
    assert policy.problems("Password1") == ["is too common"]
    assert policy.problems("ann@example.com", related=("ann@example.com",)) == [
        "must not be the same as the login id"]
    assert policy.problems("x" * 65) == ["must be at most 64 characters"]
    assert policy.problems("a perfectly fine passphrase") == []
    with pytest.raises(AuthError) as raised:
        policy.check("qwerty123")
    assert raised.value.code is ErrorCode.WEAK_PASSWORD


async def test_an_imported_bcrypt_user_signs_in_and_is_rehashed_to_argon2id(core: Core,
                                                                         realm: Realm):
    stored = bcrypt.hashpw(SECRET.encode(), bcrypt.gensalt(rounds=4)).decode()
    report = await core.users.import_records(realm, [
        {"email": "imported@example.com", "name": "Imported", "password_hash": stored},
        {"email": "bad-hash@example.com", "password_hash": "md5$nope"},
        {"email": "extra@example.com", "favourite_colour": "blue"},
    ])
    assert report.created == 1
    assert [n for n, _ in report.failed] == [2, 3]
    user = (await core.signin.password(realm, "imported@example.com", SECRET)).user
    async with core.store.transaction() as tx:
        [credential] = await tx.credentials.for_user(user.id, "password")
    assert credential.secret.startswith("$argon2id$")
    assert (await core.signin.password(realm, "imported@example.com", SECRET)).user.id == user.id
    events = [e.type for e in await core.audit.recent(realm.id, user_id=user.id)]
    assert "user.password_rehashed" in events


async def test_an_import_reports_wrongly_typed_fields_line_by_line(core: Core, realm: Realm):
    """Every line is imported or reported; a field of the wrong type stops neither the others
    nor the report."""
    report = await core.users.import_records(realm, [
        {"email": 5},
        {"email": "typed-hash@example.com", "password_hash": 12},
        {"email": "typed-flag@example.com", "email_verified": "false"},
        {"email": "typed-roles@example.com", "roles": "admin"},
        {"email": "typed-nul@example.com", "name": "a\x00b"},
        {"email": "typed-attr@example.com", "custom_attributes": {"k": "a\x00b"}},
        {"email": "typed-fine@example.com", "roles": ["admin"], "email_verified": True},
    ])
    assert report.created == 1
    assert [n for n, _ in report.failed] == [1, 2, 3, 4, 5, 6]
    fine = await core.users.find(realm, "typed-fine@example.com")
    assert fine is not None and fine.roles == ["admin"] and fine.email_verified
    assert await core.users.find(realm, "typed-roles@example.com") is None


async def test_changing_the_phone_unverifies_it(core: Core, realm: Realm):
    user = await core.users.create(realm, NewUser(email="phone-change@example.com",
                                                  phone="+44 20 7946 0000",
                                                  phone_verified=True))
    changed = await core.users.update_profile(realm, user.id, {"phone": "+44 20 7946 0001"})
    assert changed.phone == "+44 20 7946 0001" and changed.phone_verified is False


async def test_sign_up_refuses_a_common_password(core: Core, realm: Realm):
    with pytest.raises(AuthError) as raised:
        await core.users.sign_up(realm, NewUser(email="c@example.com", password="iloveyou"))
    assert raised.value.code is ErrorCode.WEAK_PASSWORD
    assert await core.users.find(realm, "c@example.com") is None
