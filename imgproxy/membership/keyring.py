"""memberlist's keyring and its AES-GCM payload encryption (security.go, keyring.go).

An encrypted payload is: the encryption version byte, a 12-byte random nonce, then the
AES-GCM ciphertext with its 16-byte tag. Version 0 pads the plaintext with PKCS7 to the
AES block size first (protocol version 1 only); version 1 does not pad.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from imgproxy.membership.wire import WireError

__all__ = ["Keyring", "validate_key"]

_VERSION_SIZE = 1
_NONCE_SIZE = 12
_TAG_SIZE = 16
_BLOCK_SIZE = 16
_MAX_VERSION = 1


def validate_key(key: bytes) -> None:
    """Raise ``ValueError`` unless ``key`` is 16, 24 or 32 bytes (AES-128/192/256)."""
    if len(key) not in (16, 24, 32):
        raise ValueError("key size must be 16, 24 or 32 bytes")


def _min_length(version: int) -> int:
    # The smallest valid payload: an empty plaintext (padded to one block for version 0).
    padding = _BLOCK_SIZE if version == 0 else 0
    return _VERSION_SIZE + _NONCE_SIZE + padding + _TAG_SIZE


class Keyring:
    """The keys a member encrypts and decrypts with: an immutable value.

    The primary key (first in :attr:`keys`) encrypts; every key is tried, primary first,
    to decrypt. Rotation as memberlist does it: :meth:`add_key` everywhere, then
    :meth:`use_key`, then :meth:`remove_key` the old one; each returns a new keyring.
    """

    __slots__ = ("_ciphers", "_keys")

    def __init__(self, keys: Sequence[bytes], primary: bytes | None = None) -> None:
        ordered: list[bytes] = []
        if primary is None:
            if not keys:
                raise ValueError("a keyring needs at least one key")
            primary = keys[0]
        for key in (primary, *keys):
            key = bytes(key)
            validate_key(key)
            if key not in ordered:
                ordered.append(key)
        self._keys = tuple(ordered)
        self._ciphers = tuple(AESGCM(key) for key in ordered)

    @property
    def keys(self) -> tuple[bytes, ...]:
        """Every installed key, the primary first."""
        return self._keys

    @property
    def primary_key(self) -> bytes:
        """The key that encrypts."""
        return self._keys[0]

    def add_key(self, key: bytes) -> Keyring:
        """This keyring with ``key`` installed for decryption (a no-op if present)."""
        return Keyring([*self._keys, key], self.primary_key)

    def use_key(self, key: bytes) -> Keyring:
        """This keyring with the installed ``key`` as primary; ``ValueError`` if absent."""
        if key not in self._keys:
            raise ValueError("requested key is not in the keyring")
        return Keyring(self._keys, key)

    def remove_key(self, key: bytes) -> Keyring:
        """This keyring without ``key``; removing the primary key is a ``ValueError``."""
        if key == self.primary_key:
            raise ValueError("removing the primary key is not allowed")
        return Keyring([k for k in self._keys if k != key], self.primary_key)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Keyring) and other._keys == self._keys

    def __hash__(self) -> int:
        return hash(self._keys)

    def __repr__(self) -> str:
        # Never print key material.
        return f"<Keyring with {len(self._keys)} key(s)>"

    def encrypt(
        self, plaintext: bytes, version: int, extra_data: bytes = b"", *, nonce: bytes | None = None
    ) -> bytes:
        """Seal ``plaintext`` with the primary key: version byte, nonce, ciphertext and tag.

        ``extra_data`` is authenticated but not encrypted (memberlist's label, or a
        stream's 5-byte header). ``nonce`` is for tests only; it is random otherwise.
        """
        if version not in (0, 1):
            raise ValueError(f"unsupported encryption version {version}")
        if nonce is None:
            nonce = os.urandom(_NONCE_SIZE)
        if len(nonce) != _NONCE_SIZE:
            raise ValueError("the nonce must be 12 bytes")
        if version == 0:
            pad = _BLOCK_SIZE - len(plaintext) % _BLOCK_SIZE
            plaintext = plaintext + bytes((pad,)) * pad
        sealed = self._ciphers[0].encrypt(nonce, plaintext, extra_data or None)
        return bytes((version,)) + nonce + sealed

    def decrypt(self, ciphertext: bytes, extra_data: bytes = b"") -> bytes:
        """Open a payload with whichever key fits; :class:`WireError` if none does."""
        if not ciphertext:
            raise WireError("cannot decrypt an empty payload")
        version = ciphertext[0]
        if version > _MAX_VERSION:
            raise WireError(f"unsupported encryption version {version}")
        if len(ciphertext) < _min_length(version):
            raise WireError(f"payload is too small to decrypt: {len(ciphertext)}")
        nonce = bytes(ciphertext[_VERSION_SIZE : _VERSION_SIZE + _NONCE_SIZE])
        sealed = bytes(ciphertext[_VERSION_SIZE + _NONCE_SIZE :])
        for cipher in self._ciphers:
            try:
                plain = cipher.decrypt(nonce, sealed, extra_data or None)
            except InvalidTag:
                continue
            if version == 0:
                # Only a key holder can get here, but refuse a nonsense pad anyway.
                pad = plain[-1] if plain else 0
                if not 1 <= pad <= _BLOCK_SIZE or pad > len(plain):
                    raise WireError("bad PKCS7 padding")
                plain = plain[:-pad]
            return plain
        raise WireError("no installed keys could decrypt the message")
