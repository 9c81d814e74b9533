"""The internal worker API (gateway to worker only), as the contract's table says.

``GET /v1/image`` answers from the cache (or 404), ``POST /v1/cache`` produces
the variant, ``DELETE /v1/cache`` purges a source. ``GET /v1/source`` and the
``stale=1`` flag serve the scale-out handoff: a key's new owner reads what its
previous owner still has. With a cluster secret, every request must carry a
fresh signature.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any
from urllib.parse import quote, unquote

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.resource import IResource
from twisted.web.server import NOT_DONE_YET, Request

from imgproxy.auth import SIGNATURE_HEADER, TIMESTAMP_HEADER, RequestSigner
from imgproxy.errors import ProxyError
from imgproxy.metrics import NodeMetrics
from imgproxy.params import (
    KNOWN_PARAMETERS,
    TransformSpec,
    check_source_url,
    decode_query,
    source_key_of,
    spec_from_values,
)
from imgproxy.web.public import (
    JsonResource,
    finish_with_failure,
    raw_query_of,
    write_error,
)
from imgproxy.web.site import NodeRoot
from imgproxy.worker.cache import CacheEntry, source_cache_key
from imgproxy.worker.images import ImageService

MAX_BODY_BYTES = 16 * 1024
CREATED_HEADER = b"x-imgproxy-created"
#: Set on a 403 for a request that failed the cluster authentication.
AUTH_REFUSED_HEADER = b"x-imgproxy-auth-refused"
INTERNAL_GET_PARAMETERS = (KNOWN_PARAMETERS - {"sig"}) | {"stale"}
#: On ``POST /v1/cache``: the workers the gateway holds out of rotation until
#: they have applied purges they missed. What they hold may have been purged, so
#: the handoff does not read from them. Not signed: a forged list can only send
#: a miss to the origin instead of a peer.
HELD_OUT_HEADER = b"x-imgproxy-held-out"
MAX_HELD_OUT_NAMES = 64


def encode_names(names: Iterable[str]) -> bytes:
    """Member names as one header value: each percent-encoded, comma-separated."""
    return ",".join(quote(name, safe="") for name in names).encode("ascii")


def decode_names(value: bytes) -> list[str]:
    """``encode_names`` read back; at most ``MAX_HELD_OUT_NAMES``, empty ones skipped."""
    names = value.decode("latin-1").split(",", MAX_HELD_OUT_NAMES)[:MAX_HELD_OUT_NAMES]
    return [unquote(name.strip()) for name in names if name.strip()]


def write_entry(request: Request, entry: CacheEntry, cache_status: bytes) -> bytes:
    """Headers of an internal 200; returns the body."""
    request.setHeader(b"content-type", entry.content_type.encode("ascii"))
    request.setHeader(b"etag", entry.etag.encode("ascii"))
    request.setHeader(CREATED_HEADER, repr(entry.created).encode("ascii"))
    request.setHeader(b"x-cache", cache_status)
    return entry.body


class _Endpoint(JsonResource):
    isLeaf = True
    _log = Logger()

    def __init__(
        self,
        images: ImageService,
        signer: RequestSigner | None,
        clock: IReactorTime,
        metrics: NodeMetrics,
    ) -> None:
        super().__init__()
        self._images = images
        self._signer = signer
        self._clock = clock
        self._metrics = metrics

    def render(self, request: Request) -> bytes | int:
        try:
            self._authenticate(request)
        except ProxyError as error:
            self._metrics.count_request("internal", error.status)
            return write_error(request, error)
        return super().render(request)

    def _body(self, request: Request) -> bytes:
        content = request.content
        if content is None:
            return b""
        content.seek(0)
        body = content.read(MAX_BODY_BYTES + 1)
        if len(body) > MAX_BODY_BYTES:
            raise ProxyError(413, "the request body is too large")
        return body

    def _authenticate(self, request: Request) -> None:
        if self._signer is None:
            return
        path, _, query = request.uri.partition(b"?")
        refusal = self._signer.refusal(
            request.method,
            path,
            query,
            self._body(request),
            request.getHeader(TIMESTAMP_HEADER),
            request.getHeader(SIGNATURE_HEADER),
            self._clock.seconds(),
        )
        if refusal is not None:
            # Marked, so a gateway tells this 403 (its own signature or clock is
            # wrong: try another worker) from a source's 403 (the client's answer).
            request.setHeader(AUTH_REFUSED_HEADER, b"1")
            raise ProxyError(403, refusal)

    def _fail(self, failure: Failure, request: Request) -> None:
        finish_with_failure(request, failure, self._metrics, "internal", self._log)


class ImageEndpoint(_Endpoint):
    """``GET /v1/image``: the cached variant or 404; ``stale=1`` accepts stale entries."""

    def render_GET(self, request: Request) -> bytes:
        try:
            values = decode_query(raw_query_of(request), INTERNAL_GET_PARAMETERS)
            stale_ok = values.pop("stale", "0") == "1"
            spec = spec_from_values(dict(values))
        except ProxyError as error:
            self._metrics.count_request("internal", error.status)
            return write_error(request, error)
        cache = self._images.cache
        entry = cache.get_stale_ok(spec.cache_key) if stale_ok else cache.get(spec.cache_key)
        if entry is None:
            self._metrics.count_request("internal", 404)
            return write_error(request, ProxyError(404, "not cached"))
        self._metrics.count_image(True, 0.0)
        self._metrics.count_request("internal", 200)
        return write_entry(request, entry, b"HIT")


class SourceEndpoint(_Endpoint):
    """``GET /v1/source?url=``: the cached original bytes (stale or not), or 404."""

    def render_GET(self, request: Request) -> bytes:
        try:
            url = decode_query(raw_query_of(request), frozenset({"url"})).get("url")
            if not url:
                raise ProxyError(400, "parameter 'url' is required")
        except ProxyError as error:
            return write_error(request, error)
        entry = self._images.cache.get_stale_ok(source_cache_key(source_key_of(url)))
        if entry is None:
            return write_error(request, ProxyError(404, "not cached"))
        return write_entry(request, entry, b"HIT")


class CacheEndpoint(_Endpoint):
    """``POST /v1/cache`` produces a variant; ``DELETE /v1/cache?url=`` purges a source."""

    allowed_methods = (b"POST", b"DELETE")

    def render_POST(self, request: Request) -> bytes | int:
        try:
            spec = self._spec_of(request)
        except ProxyError as error:
            self._metrics.count_request("internal", error.status)
            return write_error(request, error)
        entry = self._images.cached(spec)
        if entry is not None:
            self._metrics.count_request("internal", 200)
            return write_entry(request, entry, b"HIT")
        held_out = request.getHeader(HELD_OUT_HEADER)
        if held_out and self._images.peers is not None:
            self._images.peers.avoid(decode_names(held_out))
        d = self._images.render(spec)

        def produced(entry: CacheEntry) -> None:
            if request.finished or request._disconnected:
                return
            self._metrics.count_request("internal", 200)
            body = write_entry(request, entry, b"MISS")
            request.setHeader(b"content-length", str(len(body)).encode("ascii"))
            request.write(body)
            request.finish()

        d.addCallbacks(produced, self._fail, errbackArgs=(request,))
        request.notifyFinish().addErrback(lambda _: d.cancel())
        return NOT_DONE_YET

    def _spec_of(self, request: Request) -> TransformSpec:
        try:
            fields = json.loads(self._body(request) or b"null")
        except ValueError:
            raise ProxyError(400, "the body is not valid JSON") from None
        if not isinstance(fields, dict):
            raise ProxyError(400, "the body must be a JSON object")
        unknown = set(fields) - {"url", "w", "h", "fit", "format", "q"}
        if unknown:
            raise ProxyError(400, f"unknown field {sorted(unknown)[0]!r}")
        return spec_from_values({k: _scalar(k, v) for k, v in fields.items()})

    def render_DELETE(self, request: Request) -> bytes:
        try:
            url = decode_query(raw_query_of(request), frozenset({"url"})).get("url")
            if not url:
                raise ProxyError(400, "parameter 'url' is required")
            self._images.purge_source(check_source_url(url))
        except ProxyError as error:
            self._metrics.count_request("internal", error.status)
            return write_error(request, error)
        self._metrics.count_request("internal", 204)
        request.setResponseCode(204)
        return b""


def _scalar(name: str, value: Any) -> str | int | None:
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    raise ProxyError(400, f"field {name!r} must be a string or an integer")


def internal_api(
    images: ImageService, signer: RequestSigner | None, clock: IReactorTime, metrics: NodeMetrics
) -> IResource:
    """The ``/v1`` resource tree."""
    return NodeRoot({
        b"image": ImageEndpoint(images, signer, clock, metrics),
        b"source": SourceEndpoint(images, signer, clock, metrics),
        b"cache": CacheEndpoint(images, signer, clock, metrics),
    })
