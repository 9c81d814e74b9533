"""The one error type that crosses layers: an HTTP status with a readable reason."""

from __future__ import annotations

import json

import attrs


@attrs.frozen(auto_exc=True)
class ProxyError(Exception):
    """A failure that the public API reports as ``status`` with ``reason``.

    Every layer (parameters, fetch, transform, cache, gateway) raises this for
    anything a client or an origin did wrong; anything else is a bug and is
    reported as a generic 502 by the HTTP layer, never as a stack trace.
    """

    status: int
    reason: str
    retry_after: int | None = None

    def __str__(self) -> str:
        return f"{self.status}: {self.reason}"

    def json_body(self) -> bytes:
        """The contract's error body: ``{"error": reason, "status": code}``."""
        return error_body(self.status, self.reason)


def error_body(status: int, reason: str) -> bytes:
    """Encode the contract's JSON error body."""
    return json.dumps({"error": reason, "status": status}).encode("utf-8")
