"""The HTTP site of a node: its resource tree, ``/health``, ``/metrics`` and the access log."""

from __future__ import annotations

import io
import json
from collections.abc import Callable
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.web.http import HTTPChannel, _ChunkedTransferDecoder, datetimeToString
from twisted.web.resource import IResource, Resource
from twisted.web.server import Request, Site

from imgproxy.errors import ProxyError, error_body
from imgproxy.metrics import NodeMetrics
from imgproxy.web.chunked import LenientChunkedDecoder
from imgproxy.web.public import JsonResource, NotFound, write_error


class JsonDocument(JsonResource):
    """A JSON document built afresh on every GET (``/health``, ``/status.json``)."""

    isLeaf = True

    def __init__(
        self,
        describe: Callable[[], dict[str, Any]],
        status_of: Callable[[dict[str, Any]], int] = lambda document: 200,
    ) -> None:
        """``status_of`` picks the HTTP status from the document (``/health``: 503
        while the node leaves, for load balancers)."""
        super().__init__()
        self._describe = describe
        self._status_of = status_of

    def render_GET(self, request: Request) -> bytes:
        document = self._describe()
        request.setResponseCode(self._status_of(document))
        request.setHeader(b"content-type", b"application/json")
        request.setHeader(b"cache-control", b"no-store")
        return json.dumps(document, sort_keys=True).encode("utf-8")


class MetricsResource(JsonResource):
    """``GET /metrics``: the node's registry in Prometheus text format."""

    isLeaf = True

    def __init__(self, metrics: NodeMetrics) -> None:
        super().__init__()
        self._metrics = metrics

    def render_GET(self, request: Request) -> bytes:
        request.setHeader(b"content-type", CONTENT_TYPE_LATEST.encode("ascii"))
        return generate_latest(self._metrics.registry)


class NodeRoot(Resource):
    """The root: named children, JSON 404 for everything else, and ``/`` itself."""

    def __init__(self, children: dict[bytes, IResource], index: IResource | None = None) -> None:
        super().__init__()
        for name, child in children.items():
            self.putChild(name, child)
        self._index = index
        self._not_found = NotFound()

    def getChildWithDefault(self, path: bytes, request: Request) -> IResource:
        child = self.children.get(path)
        if child is None:
            return self.getChild(path, request)
        if request.postpath and getattr(child, "isLeaf", False):
            # "/image/anything" is not "/image": a leaf would serve it all alike.
            return self._not_found
        return child

    def getChild(self, path: bytes, request: Request) -> IResource:
        # "/" is the index; "//image" (an empty segment, then more) is nothing.
        if path == b"" and self._index is not None and not request.postpath:
            return self._index
        return self._not_found

    def render(self, request: Request) -> bytes:
        if self._index is not None:
            return self._index.render(request)
        return self._not_found.render(request)


MAX_REQUEST_BODY = 64 * 1024
#: How long a request, head and body, may take to arrive from its first byte
#: (Twisted's idle timeout restarts with every byte).
REQUEST_SECONDS = 30.0
_LINE_ENDS = frozenset(b"\r\n")
# What "Server" says: the product, as nginx and darthsim's imgproxy do, not
# Twisted's name and version for a scanner to match against advisories.
SERVER_NAME = [b"imgproxy"]
#: The longest request line (and line plus headers) a public listener reads.
MAX_REQUEST_HEAD = 16 * 1024
#: A worker's: a gateway re-encodes the URL it was given, which may grow it up to
#: threefold (a "/" sent as is becomes "%2F"), and signs it.
WORKER_REQUEST_HEAD = 4 * MAX_REQUEST_HEAD


def raw_json_response(status: int, phrase: bytes, reason: str) -> bytes:
    """A complete HTTP/1.1 error response, for when no Request object can write one.

    With the headers every response carries (Date, RFC 9110 6.6.1; Server).
    """
    body = error_body(status, reason)
    return (
        b"HTTP/1.1 %d %s\r\ndate: %s\r\nserver: %s\r\ncontent-type: application/json\r\n"
        b"content-length: %d\r\ncache-control: no-store\r\nx-content-type-options: nosniff\r\n"
        b"connection: close\r\n\r\n%s"
        % (status, phrase, datetimeToString(), SERVER_NAME[0], len(body), body)
    )


def origin_form(target: bytes) -> bytes:
    """The path and query of an absolute-form request target (RFC 9112 3.2.2).

    Servers must accept ``GET http://host/image?url=... HTTP/1.1``; Twisted takes
    the target as a path. Anything else that is not a path stays as it is (and
    finds no resource).
    """
    scheme, separator, rest = target.partition(b"://")
    if not separator or scheme.lower() not in (b"http", b"https"):
        return target
    authority_end = min(
        (i for i in (rest.find(b"/"), rest.find(b"?")) if i >= 0), default=len(rest)
    )
    path = rest[authority_end:]
    return path if path.startswith(b"/") else b"/" + path


class TrackedRequest(Request):
    """A request the site counts while in flight, with a cap on its body.

    No endpoint takes more than a small JSON body, so a larger one is refused
    with 413 as soon as its length is known (or its chunks pass the cap), and
    never spooled to a temporary file as Twisted would.
    """

    body_refused = False

    def requestReceived(self, command: bytes, path: bytes, version: bytes) -> None:
        if path[:1] != b"/" and path != b"*":
            path = origin_form(path)
        super().requestReceived(command, path, version)

    def gotLength(self, length: int | None) -> None:
        if length is not None and length > MAX_REQUEST_BODY:
            self._refuse_body()
            return
        super().gotLength(length)

    def handleContentChunk(self, data: bytes) -> None:
        if self.body_refused:
            return
        if self.content.tell() + len(data) > MAX_REQUEST_BODY:
            self._refuse_body()
            return
        super().handleContentChunk(data)

    def _refuse_body(self) -> None:
        self.body_refused = True
        self.content = io.BytesIO()
        self.channel.transport.write(
            raw_json_response(413, b"Content Too Large", "the request body is too large")
        )
        self.channel.transport.loseConnection()

    def process(self) -> None:
        if self.body_refused:
            return
        site = self.channel.site
        site.in_flight += 1
        self.notifyFinish().addBoth(site.request_done)
        super().process()

    def render(self, resrc: IResource) -> None:
        # Twisted set its own "Server" just before calling this.
        self.responseHeaders.setRawHeaders(b"server", SERVER_NAME)
        super().render(resrc)

    def _handleStar(self) -> None:
        self.responseHeaders.setRawHeaders(b"server", SERVER_NAME)
        # "OPTIONS *" probes readiness; anything else on "*" is a JSON 405 like every error.
        if self.method == b"OPTIONS":
            super()._handleStar()
            return
        self.setHeader(b"allow", b"OPTIONS")
        body = write_error(self, ProxyError(405, "only OPTIONS applies to '*'"))
        if body:  # (for HEAD, write_error has set GET's length and given no body)
            self.setHeader(b"content-length", b"%d" % len(body))
        self.write(body)
        self.finish()


class NodeChannel(HTTPChannel):
    """HTTP/1.1 whose protocol-level errors are JSON too, like every other error."""

    #: The request line, and the request line with every header: Twisted's 16 KiB.
    MAX_LENGTH = MAX_REQUEST_HEAD
    totalHeadersSize = MAX_REQUEST_HEAD
    # Lines may end in a bare LF (RFC 9112 2.2 lets a recipient accept one, and nginx
    # does): split on LF and drop the CR before it. Waiting for a CRLF that a client
    # never sends would hold its request until the idle timeout.
    delimiter = b"\n"

    # Twisted's idle timeout starts again with every byte: a client sending one
    # byte every few seconds would hold a connection for ever. A request, head
    # and body (at most MAX_REQUEST_BODY), has REQUEST_SECONDS from its first
    # byte (nginx's client_header_timeout); a client that goes silent meets the
    # idle timeout. Checked as bytes arrive: no timer per request on the hit path.
    _request_started: float | None = None
    _timed_out = False

    def connectionMade(self) -> None:
        self._now = self.site.clock.seconds
        super().connectionMade()

    def dataReceived(self, data: bytes) -> None:
        started = self._request_started
        if started is None:
            # Empty lines between requests are to be ignored (RFC 9112 2.2): they
            # start no request, nor its clock.
            if data and (data[0] not in _LINE_ENDS or data.strip(b"\r\n")):
                self._request_started = self._now()
        elif self._now() - started >= REQUEST_SECONDS:
            if not self._timed_out:
                self._too_slow()
            return
        super().dataReceived(data)

    def allContentReceived(self) -> None:
        self._request_started = None
        super().allContentReceived()

    def timeoutConnection(self) -> None:
        # Idle with a request begun and unfinished (a head without its blank line,
        # a body short of its length): say why it is dropped, as nginx's 408 does.
        if self._request_started is not None and not self._timed_out:
            self._write_408("the request stopped arriving")
        super().timeoutConnection()

    def _too_slow(self) -> None:
        self._write_408("the request took too long to arrive")
        self.loseConnection()

    def _write_408(self, reason: str) -> None:
        self._timed_out = True  # once: what else arrives is dropped with the connection
        self.transport.write(raw_json_response(408, b"Request Timeout", reason))

    def lineReceived(self, line: bytes) -> None:
        line = line.rstrip(b"\r")
        if line and self._request_started is None:
            # A request pipelined behind the last one, read from what was buffered.
            self._request_started = self._now()
        HTTPChannel.lineReceived(self, line)

    def headerReceived(self, line: bytes) -> bool:
        name, _, value = line.partition(b":")
        if name.strip().lower() != b"transfer-encoding":
            return bool(super().headerReceived(line))
        if value.strip(b" \t").lower() != b"chunked":
            # Twisted reads an "identity" body until the connection closes, and
            # with it any request behind it: RFC 9112 6.1 leaves chunked alone.
            self._respondToBadRequestAndDisconnect()
            return False
        accepted = bool(super().headerReceived(line))
        decoder = self._transferDecoder
        if accepted and type(decoder) is _ChunkedTransferDecoder:
            # The body's framing lines may end in a bare LF too, as the head's may.
            self._transferDecoder = LenientChunkedDecoder(
                decoder.dataCallback, decoder.finishCallback
            )
        return accepted

    def _respondToBadRequestAndDisconnect(self) -> None:
        # Twisted answers too many or too large headers the same way as garbage.
        if (
            self._receivedHeaderCount > self.maxHeaders
            or self._receivedHeaderSize > self.totalHeadersSize
        ):
            self.transport.write(
                raw_json_response(
                    431, b"Request Header Fields Too Large", "too many or too large headers"
                )
            )
        else:
            self.transport.write(raw_json_response(400, b"Bad Request", "malformed HTTP request"))
        self.loseConnection()

    def lineLengthExceeded(self, line: bytes) -> None:
        # Before the request line is read (Twisted's private flag; 431 if it is gone),
        # the long line is the request target: 414, as RFC 9110 15.5.15 and nginx have it.
        if getattr(self, "_HTTPChannel__first_line", 0):
            response = raw_json_response(414, b"URI Too Long", "the request line is too long")
        else:
            response = raw_json_response(
                431, b"Request Header Fields Too Large", "a request header is too long"
            )
        self.transport.write(response)
        self.loseConnection()


class NodeSite(Site):
    """A ``Site`` that counts in-flight requests and writes a batched access log.

    One log event per request cost a fifth of a cache hit's CPU (formatting
    and one write per line), so access lines are collected and logged as one
    event per batch: every ``flush_interval`` or every ``batch_size`` lines.
    Each event still carries the structured ``requests`` for a JSON observer.
    """

    _log = Logger()
    displayTracebacks = False
    requestFactory = TrackedRequest
    # Plain HTTP/1.1: no TLS here, so no protocol negotiation wrapper either.
    protocol = NodeChannel

    def __init__(
        self,
        resource: IResource,
        clock: IReactorTime,
        flush_interval: float = 1.0,
        batch_size: int = 256,
        max_request_head: int = MAX_REQUEST_HEAD,
    ) -> None:
        # The injected clock also drives the channels' idle timeouts: no global reactor here.
        super().__init__(resource, reactor=clock)
        self.in_flight = 0
        self._clock = clock
        self._flush_interval = flush_interval
        self._batch_size = batch_size
        self._pending: list[tuple[str, str, str, int, int]] = []
        self._flush_call: IDelayedCall | None = None
        self._max_request_head = max_request_head

    @property
    def clock(self) -> IReactorTime:
        return self._clock

    def buildProtocol(self, addr: Any) -> Any:
        channel = super().buildProtocol(addr)
        if self._max_request_head != MAX_REQUEST_HEAD:
            channel.MAX_LENGTH = channel.totalHeadersSize = self._max_request_head
        return channel

    def request_done(self, _: object) -> None:
        self.in_flight -= 1

    def log(self, request: Request) -> None:
        client = request.getClientAddress()
        self._pending.append((
            getattr(client, "host", "-"),
            request.method.decode("latin-1"),
            request.uri[:2048].decode("latin-1"),
            request.code,
            request.sentLength,
        ))
        if len(self._pending) >= self._batch_size:
            self.flush_access_log()
        elif self._flush_call is None:
            self._flush_call = self._clock.callLater(self._flush_interval, self.flush_access_log)

    def flush_access_log(self) -> None:
        """Log every pending access line as one event."""
        if self._flush_call is not None and self._flush_call.active():
            self._flush_call.cancel()
        self._flush_call = None
        pending, self._pending = self._pending, []
        if not pending:
            return
        self._log.info(
            "{access_lines}",
            access_lines="\n".join(f'{c} "{m} {u}" {s} {n}' for c, m, u, s, n in pending),
            requests=[
                {"client": c, "method": m, "uri": u, "status": s, "length": n}
                for c, m, u, s, n in pending
            ],
        )

    def stopFactory(self) -> None:
        self.flush_access_log()
        super().stopFactory()
