"""Authenticated encryption of secrets at rest, under keys derived from the master secret.

Each purpose ("signing-key", "org-secret", ...) gets its own AES-256-GCM key through HKDF, and
the record id is bound in as associated data, so a ciphertext cannot be moved to another row.
"""

from __future__ import annotations

import hashlib
import hmac
import os

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

_VERSION = b"\x01"
_NONCE_BYTES = 12


class DecryptionError(Exception):
    """A ciphertext failed authentication: wrong master secret, wrong record, or tampering."""


class SecretBox:
    def __init__(self, master_secret: bytes) -> None:
        if len(master_secret) < 32:
            raise ValueError("the master secret must be at least 32 bytes")
        self._master = master_secret
        self._keys: dict[str, AESGCM] = {}
        self._mac_keys: dict[str, bytes] = {}

    def derive(self, purpose: str, length: int = 32) -> bytes:
        return HKDF(algorithm=hashes.SHA256(), length=length, salt=None,
                    info=f"authgate:{purpose}".encode()).derive(self._master)

    def _aead(self, purpose: str) -> AESGCM:
        if purpose not in self._keys:
            self._keys[purpose] = AESGCM(self.derive("aead:" + purpose))
        return self._keys[purpose]

    def encrypt(self, purpose: str, plaintext: bytes, bound_to: str) -> bytes:
        nonce = os.urandom(_NONCE_BYTES)
        sealed = self._aead(purpose).encrypt(nonce, plaintext, bound_to.encode())
        return _VERSION + nonce + sealed

    def decrypt(self, purpose: str, ciphertext: bytes, bound_to: str) -> bytes:
        if not ciphertext.startswith(_VERSION) or len(ciphertext) < 1 + _NONCE_BYTES + 16:
            raise DecryptionError("unknown ciphertext format")
        nonce, sealed = ciphertext[1:1 + _NONCE_BYTES], ciphertext[1 + _NONCE_BYTES:]
        try:
            return self._aead(purpose).decrypt(nonce, sealed, bound_to.encode())
        except InvalidTag:
            raise DecryptionError("ciphertext failed authentication") from None

    def mac(self, purpose: str, value: str) -> str:
        """A keyed digest for low-entropy secrets (PINs, codes) that must not be guessable
        offline from a stolen database."""
        key = self._mac_keys.get(purpose)
        if key is None:
            key = self._mac_keys[purpose] = self.derive("mac:" + purpose)
        return hmac.new(key, value.encode(), hashlib.sha256).hexdigest()
