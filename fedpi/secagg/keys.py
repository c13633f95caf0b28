"""Keys of one secure-aggregation round, all from `cryptography`: two X25519 key pairs per worker (one agrees the
keys that seal shares, the other the seeds of pairwise masks), HKDF-SHA256 for every derived key, and
ChaCha20-Poly1305 to seal each share for the one peer that may open it. Every key is fresh each round."""

from __future__ import annotations

import os

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

KEY_BYTES = 32
NONCE_BYTES = 12


class SealedShareRefused(ValueError):
    """A sealed share that does not open for this round and this pair of workers: tampered, replayed or misaddressed."""


class KeyPair:
    """An X25519 key pair whose private half never appears in a repr or a log."""

    def __init__(self, private: X25519PrivateKey | None = None):
        self._private = private or X25519PrivateKey.generate()
        self.public = self._private.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )

    @classmethod
    def from_private_bytes(cls, raw: bytes) -> KeyPair:
        return cls(X25519PrivateKey.from_private_bytes(raw))

    def private_bytes(self) -> bytes:
        """Only to be secret-shared."""
        return self._private.private_bytes(
            serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
        )

    def agree(self, peer_public: bytes, purpose: str, round_id: str) -> bytes:
        """A 32-byte key this pair and the peer's both derive, for one purpose in one round."""
        if len(peer_public) != KEY_BYTES:
            raise ValueError(f"an X25519 public key is {KEY_BYTES} bytes, got {len(peer_public)}")
        shared = self._private.exchange(X25519PublicKey.from_public_bytes(peer_public))
        return derive(shared, purpose, round_id)

    def __repr__(self) -> str:
        return f"KeyPair(public={self.public.hex()[:16]}…)"


def derive(secret: bytes, purpose: str, round_id: str) -> bytes:
    info = f"fedpi secure aggregation|{purpose}|{round_id}".encode()
    return HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=None, info=info).derive(secret)


def commitment(seed: bytes, round_id: str) -> bytes:
    """SHA-256 of a self-mask seed, published with its shares: a seed rebuilt from altered shares does not match."""
    digest = hashes.Hash(hashes.SHA256())
    digest.update(f"fedpi secure aggregation|self mask|{round_id}|".encode() + seed)
    return digest.finalize()


def _aad(round_id: str, sender: int, receiver: int) -> bytes:
    return f"{round_id}|{sender}|{receiver}".encode()


def seal(key: bytes, round_id: str, sender: int, receiver: int, plaintext: bytes) -> tuple[bytes, bytes]:
    """(nonce, ciphertext) that open only with `key`, for this round, from `sender` to `receiver`."""
    nonce = os.urandom(NONCE_BYTES)
    return nonce, ChaCha20Poly1305(key).encrypt(nonce, plaintext, _aad(round_id, sender, receiver))


def open_sealed(key: bytes, round_id: str, sender: int, receiver: int, nonce: bytes, ciphertext: bytes) -> bytes:
    try:
        if len(nonce) != NONCE_BYTES:
            raise InvalidTag
        return ChaCha20Poly1305(key).decrypt(nonce, ciphertext, _aad(round_id, sender, receiver))
    except InvalidTag:
        raise SealedShareRefused(
            f"the share from worker {sender} to worker {receiver} does not open for round {round_id!r}: "
            f"it was changed on the way, or belongs to another round or pair of workers"
        ) from None
