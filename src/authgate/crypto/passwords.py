"""Password hashing: Argon2id for everything new, verification of imported schemes.

Imported hashes (bcrypt, PBKDF2-SHA256 in Django's or passlib's format, scrypt in passlib's
format) verify once and report ``needs_rehash`` so the caller stores an Argon2id hash instead.
Hashing runs in a bounded thread pool: argon2-cffi and bcrypt release the GIL, so the event loop
keeps serving while sign-ins use the CPU, and a flood of attempts cannot take more than
``workers`` cores.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import bcrypt
from argon2 import PasswordHasher as _Argon2
from argon2 import Type
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

# bcrypt only reads the first 72 bytes; longer passwords are pre-hashed by no scheme here, so we
# refuse to verify bcrypt hashes against longer inputs rather than silently truncate.
BCRYPT_MAX_BYTES = 72
_PBKDF2_MAX_ITERATIONS = 5_000_000


@dataclass(frozen=True, slots=True)
class Verification:
    ok: bool
    needs_rehash: bool = False


class UnsupportedHash(ValueError):
    """The stored hash is in no scheme Authgate can verify."""


def _b64decode(value: str, *, altchars: bytes | None = None) -> bytes:
    value = value.strip()
    return base64.b64decode(value + "=" * (-len(value) % 4), altchars=altchars, validate=False)


class PasswordHasher:
    def __init__(self, *, memory_kib: int, time_cost: int, parallelism: int,
                 workers: int) -> None:
        self._argon2 = _Argon2(time_cost=time_cost, memory_cost=memory_kib,
                               parallelism=parallelism, hash_len=32, salt_len=16, type=Type.ID)
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="pwhash")
        # A real hash of a random password: verifying against it costs what a real check costs.
        self._dummy = self._argon2.hash(base64.b64encode(hashlib.sha256(b"dummy").digest()))

    # Synchronous primitives (run in the pool by the async wrappers).

    def hash_sync(self, password: str) -> str:
        return self._argon2.hash(password)

    def verify_sync(self, stored: str, password: str) -> Verification:
        if stored.startswith("$argon2"):
            try:
                self._argon2.verify(stored, password)
            except VerifyMismatchError:
                return Verification(False)
            except (VerificationError, InvalidHashError):
                return Verification(False)
            return Verification(True, self._argon2.check_needs_rehash(stored))
        return Verification(_verify_imported(stored, password), needs_rehash=True)

    def dummy_verify_sync(self, password: str) -> None:
        self.verify_sync(self._dummy, password)

    # Async wrappers: off the event loop, at most ``workers`` at once.

    async def _run(self, fn, *args):  # type: ignore[no-untyped-def]
        # The pool's worker count is the bound: excess requests wait in its queue.
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    async def hash(self, password: str) -> str:
        return await self._run(self.hash_sync, password)

    async def verify(self, stored: str, password: str) -> Verification:
        return await self._run(self.verify_sync, stored, password)

    async def dummy_verify(self, password: str) -> None:
        """Spend the time of a real verification, for unknown users."""
        await self._run(self.dummy_verify_sync, password)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def is_supported_hash(stored: str) -> bool:
    """Whether an imported hash is in a scheme this module verifies."""
    return stored.startswith(("$argon2id$", "$argon2i$", "$2a$", "$2b$", "$2y$",
                              "pbkdf2_sha256$", "$pbkdf2-sha256$", "$scrypt$"))


def _verify_imported(stored: str, password: str) -> bool:
    secret = password.encode()
    if stored.startswith(("$2a$", "$2b$", "$2y$")):
        if len(secret) > BCRYPT_MAX_BYTES:
            return False
        try:
            return bcrypt.checkpw(secret, stored.replace("$2y$", "$2b$", 1).encode())
        except ValueError:
            return False
    if stored.startswith("pbkdf2_sha256$"):  # Django: pbkdf2_sha256$<iterations>$<salt>$<b64>
        try:
            _, iterations, salt, expected = stored.split("$", 3)
            rounds = int(iterations)
            digest = _b64decode(expected)
        except ValueError:
            return False
        return _pbkdf2_matches(secret, salt.encode(), rounds, digest)
    if stored.startswith("$pbkdf2-sha256$"):  # passlib: $pbkdf2-sha256$<rounds>$<ab64 salt>$<ab64>
        try:
            _, _, rounds_text, salt, expected = stored.split("$", 4)
            rounds = int(rounds_text)
            salt_bytes = _b64decode(salt, altchars=b"./")
            digest = _b64decode(expected, altchars=b"./")
        except ValueError:
            return False
        return _pbkdf2_matches(secret, salt_bytes, rounds, digest)
    if stored.startswith("$scrypt$"):  # passlib: $scrypt$ln=<n>,r=<r>,p=<p>$<salt>$<hash>
        try:
            _, _, params, salt, expected = stored.split("$", 4)
            opts = dict(part.split("=", 1) for part in params.split(","))
            n, r, p = 1 << int(opts["ln"]), int(opts["r"]), int(opts["p"])
            salt_bytes = _b64decode(salt)
            digest = _b64decode(expected)
            if n > 1 << 20 or r > 32 or p > 16:
                return False
            actual = hashlib.scrypt(secret, salt=salt_bytes, n=n, r=r, p=p, dklen=len(digest),
                                    maxmem=256 * 1024 * 1024)
        except (ValueError, KeyError):
            return False
        return hmac.compare_digest(actual, digest)
    return False


def _pbkdf2_matches(secret: bytes, salt: bytes, rounds: int, digest: bytes) -> bool:
    if not 1 <= rounds <= _PBKDF2_MAX_ITERATIONS or not digest:
        return False
    actual = hashlib.pbkdf2_hmac("sha256", secret, salt, rounds, dklen=len(digest))
    return hmac.compare_digest(actual, digest)
