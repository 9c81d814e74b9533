"""Gateway-to-worker request signing: HMAC-SHA256 over the request and a timestamp.

Pure. The key is derived from the cluster secret, so the gossip encryption key
and the HTTP signing key are never the same bytes.
"""

from __future__ import annotations

import hashlib
import hmac

import attrs

TIMESTAMP_HEADER = b"x-imgproxy-timestamp"
SIGNATURE_HEADER = b"x-imgproxy-signature"
REPLAY_WINDOW = 30.0


def derive_request_key(cluster_secret: bytes) -> bytes:
    """A key for request signing, separate from the gossip key."""
    label = b"imgproxy internal request signing v1"
    return hmac.new(cluster_secret, label, hashlib.sha256).digest()


def _canonical(method: bytes, path: bytes, query: bytes, body: bytes, timestamp: bytes) -> bytes:
    return b"\n".join(
        [method.upper(), path, query, hashlib.sha256(body).hexdigest().encode(), timestamp]
    )


@attrs.frozen
class RequestSigner:
    """Signs and verifies internal requests with one derived key."""

    key: bytes
    window: float = REPLAY_WINDOW

    @classmethod
    def from_secret(cls, cluster_secret: bytes, window: float = REPLAY_WINDOW) -> RequestSigner:
        return cls(derive_request_key(cluster_secret), window)

    def sign(
        self, method: bytes, path: bytes, query: bytes, body: bytes, now: float
    ) -> dict[bytes, bytes]:
        """The headers to add to a request sent at ``now``."""
        timestamp = f"{now:.3f}".encode("ascii")
        mac = hmac.new(self.key, _canonical(method, path, query, body, timestamp), hashlib.sha256)
        return {TIMESTAMP_HEADER: timestamp, SIGNATURE_HEADER: mac.hexdigest().encode("ascii")}

    def refusal(
        self,
        method: bytes,
        path: bytes,
        query: bytes,
        body: bytes,
        timestamp: bytes | None,
        signature: bytes | None,
        now: float,
    ) -> str | None:
        """None when the request is authentic and fresh, else why it is refused."""
        if not timestamp or not signature:
            return "the request is not signed with the cluster secret"
        try:
            sent = float(timestamp.decode("ascii"))
        except (UnicodeDecodeError, ValueError):
            return "the request's timestamp is malformed"
        if not abs(now - sent) <= self.window:
            return "the request's timestamp is outside the replay window"
        mac = hmac.new(self.key, _canonical(method, path, query, body, timestamp), hashlib.sha256)
        if not hmac.compare_digest(mac.hexdigest().encode("ascii"), signature.lower()):
            return "the request's signature is not valid"
        return None
