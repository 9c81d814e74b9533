"""The public HTTP API: ``GET /image``, ``DELETE /image``, and JSON errors everywhere.

``ImageResource`` is the hottest code of the project: a cache hit is one query
parse, one dictionary lookup and one write, with no Deferred in between.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Protocol

from twisted.internet.defer import CancelledError, Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from imgproxy.errors import ProxyError
from imgproxy.metrics import NodeMetrics
from imgproxy.params import ImageRequest, TransformSpec, parse_image_query, parse_purge_query
from imgproxy.worker.cache import CacheEntry

PARSED_MEMO_SIZE = 8192


class ImageBackend(Protocol):
    """Where images come from: the local worker (standalone) or the cluster (gateway)."""

    def cached(self, spec: TransformSpec) -> CacheEntry | None:
        """A cached variant answered synchronously, or None (then ``serve`` is called)."""

    def serve(self, spec: TransformSpec) -> Deferred[tuple[CacheEntry, bool]]:
        """The variant and whether it was a cache hit."""

    def purge(self, url: str) -> Deferred[None]:
        """Remove the source and every variant of ``url`` wherever it is cached."""


def write_error(request: Request, error: ProxyError) -> bytes:
    """Set the status and headers of the contract's JSON error; return its body."""
    request.setResponseCode(error.status)
    request.setHeader(b"content-type", b"application/json")
    request.setHeader(b"cache-control", b"no-store")
    request.setHeader(b"x-content-type-options", b"nosniff")
    if error.retry_after is not None:
        request.setHeader(b"retry-after", str(error.retry_after).encode("ascii"))
    body = error.json_body()
    if request.method == b"HEAD":
        # The length of the body a GET would get, and no body.
        request.setHeader(b"content-length", b"%d" % len(body))
        return b""
    return body


def finish_with_failure(
    request: Request, failure: Failure, metrics: NodeMetrics, endpoint: str, log: Logger
) -> None:
    """Answer a failed asynchronous request with its JSON error (a bug becomes a 502)."""
    if failure.check(CancelledError) or request.finished or request._disconnected:
        return
    error = failure.value
    if isinstance(error, ProxyError) and error.__cause__ is not None:
        # A codec or network error behind a 502: keep it visible to operators.
        log.info("{uri}: {reason} (because {cause!r})", uri=request.uri,
                 reason=error.reason, cause=error.__cause__)
    if not isinstance(error, ProxyError):
        log.failure("{uri} failed", failure, uri=request.uri)
        error = ProxyError(502, "the image could not be processed")
    metrics.count_request(endpoint, error.status)
    body = write_error(request, error)
    if body:
        request.setHeader(b"content-length", b"%d" % len(body))
        request.write(body)
    request.finish()


def raw_query_of(request: Request) -> bytes:
    return request.uri.partition(b"?")[2]


def header_list(request: Request, name: bytes) -> bytes | None:
    """A list-valued header as one value: repeated lines joined, as RFC 9110 5.3
    reads them (``getHeader`` gives only the last line)."""
    values = request.requestHeaders.getRawHeaders(name)
    if not values:
        return None
    return values[0] if len(values) == 1 else b", ".join(values)


def etag_matches(if_none_match: bytes, etag: str) -> bool:
    """RFC 9110 weak comparison of ``If-None-Match`` against our strong ETag."""
    wanted = etag.encode("ascii")
    for candidate in if_none_match.split(b","):
        candidate = candidate.strip()
        if candidate == b"*":
            return True
        if candidate.startswith(b"W/"):
            candidate = candidate[2:]
        if candidate == wanted:
            return True
    return False


class JsonResource(Resource):
    """A Resource whose unsupported methods get a JSON 405, not Twisted's HTML page."""

    allowed_methods: tuple[bytes, ...] = (b"GET", b"HEAD")

    def render(self, request: Request) -> bytes | int:
        if request.method not in self.allowed_methods:
            request.setHeader(b"allow", b", ".join(self.allowed_methods))
            return write_error(
                request, ProxyError(405, f"method {request.method.decode('latin-1')} not allowed")
            )
        return head_answered(request, super().render(request))


def head_answered(request: Request, body: bytes | int) -> bytes | int:
    """``body``, or for HEAD its headers and length with no body.

    Rendered through ``render_GET``, a HEAD's body is dropped by Twisted, which
    logs a warning for each one: a monitor polling with HEAD would fill the log.
    """
    if request.method == b"HEAD" and isinstance(body, bytes) and body:
        request.setHeader(b"content-length", b"%d" % len(body))
        return b""
    return body


class NotFound(JsonResource):
    """Every unknown path: a JSON 404."""

    isLeaf = True
    allowed_methods = (b"GET", b"HEAD", b"POST", b"PUT", b"DELETE", b"PATCH", b"OPTIONS")

    def render(self, request: Request) -> bytes | int:
        return head_answered(request, write_error(request, ProxyError(404, "no such resource")))


class ImageResource(JsonResource):
    """``/image``: serve a variant (GET, HEAD) or purge a source (DELETE)."""

    isLeaf = True
    allowed_methods = (b"GET", b"HEAD", b"DELETE")
    _log = Logger()

    def __init__(
        self,
        backend: ImageBackend,
        metrics: NodeMetrics,
        signing_key: bytes | None,
        max_age: int,
        timer: Callable[[], float] = time.perf_counter,
        purge_key: bytes | None = None,
    ) -> None:
        """``purge_key``: signs DELETE instead of ``signing_key``. With one key for
        both, as the contract has it by default, any signed URL of an image that
        has only a ``url`` parameter is also a valid purge of that image."""
        super().__init__()
        self._backend = backend
        self._metrics = metrics
        self._signing_key = signing_key
        self._purge_key = purge_key if purge_key is not None else signing_key
        self._cache_control = f"public, max-age={max_age}".encode("ascii")
        self._timer = timer
        self._parsed: dict[tuple[bytes, bytes | None], ImageRequest] = {}

    def _parse(self, raw_query: bytes, accept: bytes | None) -> ImageRequest:
        """``parse_image_query``, remembered: hot images are asked for again and again.

        Only valid (and, with a signing key, correctly signed) queries are
        remembered, keyed by the raw query and, for ``format=auto``, the Accept.
        """
        parsed = self._parsed.get((raw_query, None)) or self._parsed.get((raw_query, accept))
        if parsed is not None:
            return parsed
        parsed = parse_image_query(raw_query, accept, self._signing_key)
        if len(self._parsed) >= PARSED_MEMO_SIZE:
            self._parsed.clear()
        self._parsed[(raw_query, (accept or b"") if parsed.varies_on_accept else None)] = parsed
        return parsed

    def render_GET(self, request: Request) -> bytes | int:
        started = self._timer()
        try:
            parsed = self._parse(raw_query_of(request), header_list(request, b"accept"))
        except ProxyError as error:
            self._metrics.count_request("image", error.status)
            return write_error(request, error)
        entry = self._backend.cached(parsed.spec)
        if entry is not None:
            body = self._write_image(request, parsed, entry, b"HIT")
            self._metrics.count_image(True, self._timer() - started)
            if request.code == 304:
                # Returning b"" would make Twisted send "Content-Length: 0", which a
                # 304 must not (it would contradict the 200's length, RFC 9110 8.6).
                request.finish()
                return NOT_DONE_YET
            return body
        d = self._backend.serve(parsed.spec)
        d.addCallbacks(
            self._served, self._failed, (request, parsed, started), None, (request,), None
        )
        request.notifyFinish().addErrback(lambda _: d.cancel())
        return NOT_DONE_YET

    def _served(
        self,
        result: tuple[CacheEntry, bool],
        request: Request,
        parsed: ImageRequest,
        started: float,
    ) -> None:
        entry, hit = result
        if request.finished or request._disconnected:
            return
        body = self._write_image(request, parsed, entry, b"HIT" if hit else b"MISS")
        self._metrics.count_image(hit, self._timer() - started)
        if body:
            request.setHeader(b"content-length", b"%d" % len(body))
            request.write(body)
        request.finish()

    def _failed(self, failure: Failure, request: Request) -> None:
        finish_with_failure(request, failure, self._metrics, "image", self._log)

    def _write_image(
        self, request: Request, parsed: ImageRequest, entry: CacheEntry, cache_status: bytes
    ) -> bytes:
        """Headers of a 200 (or 304); returns the body to write."""
        headers = request.responseHeaders
        etag = entry.etag
        headers.setRawHeaders(b"etag", [etag.encode("ascii")])
        headers.setRawHeaders(b"cache-control", [self._cache_control])
        headers.setRawHeaders(b"x-cache", [cache_status])
        if parsed.varies_on_accept:
            headers.setRawHeaders(b"vary", [b"Accept"])
        if_none_match = header_list(request, b"if-none-match")
        if if_none_match is not None and etag_matches(if_none_match, etag):
            request.setResponseCode(304)
            self._metrics.count_request("image", 304)
            return b""
        headers.setRawHeaders(b"content-type", [entry.content_type.encode("ascii")])
        headers.setRawHeaders(b"x-content-type-options", [b"nosniff"])
        self._metrics.count_request("image", 200)
        if request.method == b"HEAD":
            request.setHeader(b"content-length", str(len(entry.body)).encode("ascii"))
            return b""
        return entry.body

    def render_DELETE(self, request: Request) -> bytes | int:
        try:
            url = parse_purge_query(raw_query_of(request), self._purge_key)
        except ProxyError as error:
            self._metrics.count_request("purge", error.status)
            return write_error(request, error)
        d = self._backend.purge(url)

        def purged(_: object) -> None:
            self._metrics.count_request("purge", 204)
            request.setResponseCode(204)
            request.finish()

        d.addCallbacks(purged, self._failed, errbackArgs=(request,))
        return NOT_DONE_YET
