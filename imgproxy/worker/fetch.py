"""Download a source image from its origin, safely.

The SSRF guard lives in the connection step: ``_CheckedEndpointFactory`` resolves
the host once, refuses it unless every address passes the ``AddressPolicy``,
and connects to the checked IP itself, so a second lookup (DNS rebinding) can
never pick another address. Redirects are followed here, hop by hop, so every
hop goes through the same check. Bodies are counted while they stream and the
connection is dropped as soon as they pass the byte limit; one timer bounds the
whole fetch, connect included.

Every failure leaves as ``ProxyError``: 403 for a refused address, 404 when the
origin says so, 413 for too many bytes, 504 for too slow, 502 for the rest.
"""

from __future__ import annotations

import ipaddress
import re
import zlib
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, urljoin, urlsplit, urlunsplit

import attrs
import idna
from OpenSSL.SSL import VERIFY_FAIL_IF_NO_PEER_CERT, VERIFY_PEER
from service_identity.exceptions import CertificateError, VerificationError
from service_identity.hazmat import DNS_ID, IPAddress_ID, verify_service_identity
from service_identity.pyopenssl import extract_patterns
from twisted.internet.address import IPv4Address as TwistedIPv4Address
from twisted.internet.address import IPv6Address as TwistedIPv6Address
from twisted.internet.defer import (
    CancelledError,
    Deferred,
    DeferredSemaphore,
    maybeDeferred,
    succeed,
)
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP6ClientEndpoint, wrapClientTLS
from twisted.internet.error import (
    ConnectError,
    ConnectingCancelledError,
    ConnectionDone,
    ConnectionLost,
    ConnectionRefusedError,
    TimeoutError,
)
from twisted.internet.interfaces import (
    IHostnameResolver,
    IHostResolution,
    IOpenSSLClientConnectionCreator,
    IProtocolFactory,
    IResolutionReceiver,
    IStreamClientEndpoint,
)
from twisted.internet.protocol import Protocol
from twisted.internet.ssl import optionsForClientTLS
from twisted.logger import Logger
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory
from twisted.python.failure import Failure
from twisted.web.client import (
    URI,
    Agent,
    ResponseDone,
    ResponseFailed,
)
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers
from twisted.web.iweb import UNKNOWN_LENGTH, IAgentEndpointFactory, IResponse
from zope.interface import implementer

from imgproxy.errors import ProxyError
from imgproxy.params import PATH_SAFE, QUERY_SAFE, check_source_url, idna_host
from imgproxy.quietpool import OriginConnectionPool
from imgproxy.worker.addresses import AddressPolicy, IPAddress, parse_ip_literal

if TYPE_CHECKING:
    from twisted.internet._sslverify import IOpenSSLTrustRoot

REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
OK_STATUSES = frozenset({200, 203})
NOT_FOUND_STATUSES = frozenset({404, 410})
#: Content codings an origin may send though asked for none ("identity"), as some
#: servers do for any file: undone here, as browsers and darthsim's imgproxy do.
DECODED_CODINGS = {"gzip": 16 + zlib.MAX_WBITS, "x-gzip": 16 + zlib.MAX_WBITS,
                   "deflate": zlib.MAX_WBITS}
_WHOLE_RANGE = re.compile(rb"\s*bytes\s+0-(\d+)/(\d+)\s*")
# What an answer may add to the body limit before the connection is dropped:
# room for headers and chunk framing, which Twisted's parser holds in memory.
RESPONSE_OVERHEAD = 1 << 20


@attrs.frozen
class FetchLimits:
    """How much a single source download may cost."""

    max_bytes: int = 32 << 20
    timeout: float = 10.0  # total, connect and any wait for a turn included
    max_redirects: int = 5
    #: Downloads in progress at once: each may hold up to ``max_bytes`` in memory.
    concurrency: int = 16
    #: Downloads that may wait for a turn; more are refused with 503.
    queue: int = 256


@attrs.frozen
class FetchedSource:
    """A downloaded source: its final URL (after redirects), bytes and declared type."""

    url: str
    body: bytes
    content_type: str | None  # the origin's header, informational only


def request_url(url: str) -> bytes:
    """The URL as it goes on the wire: ASCII, its host the one ``urlsplit`` read.

    User info and fragment are dropped (Twisted's Agent would take user info
    for part of the host), an IPv6 host is written compressed, a non-ASCII host
    in IDNA and a non-ASCII path or query percent-encoded as UTF-8, so the
    client connects to the very host that ``check_source_url`` looked at.
    Raises ``ProxyError(502)`` for a host that cannot be encoded.
    """
    parts = urlsplit(url)
    host = parts.hostname or ""
    literal = parse_ip_literal(host) if ":" in host else None
    if literal is not None:
        ascii_host = f"[{literal.compressed}]"
    else:
        try:
            if host.isascii():
                ascii_host = host.encode("idna").decode("ascii")  # checks the labels
            else:
                ascii_host = idna_host(host)
        except (UnicodeError, idna.IDNAError):
            raise ProxyError(502, f"the host name {host!r} cannot be encoded") from None
    netloc = ascii_host if parts.port is None else f"{ascii_host}:{parts.port}"
    path = quote(parts.path or "/", safe=PATH_SAFE)
    query = quote(parts.query, safe=QUERY_SAFE)
    return urlunsplit((parts.scheme.lower(), netloc, path, query, "")).encode("ascii")


def _too_large(limit: int) -> ProxyError:
    return ProxyError(413, f"the source is larger than the limit of {limit} bytes")


@implementer(IResolutionReceiver)
class _AddressCollector:
    """Gathers one resolution's IP addresses into a Deferred."""

    def __init__(self, host: str) -> None:
        self._host = host
        self._addresses: list[IPAddress] = []
        self.deferred: Deferred[list[IPAddress]] = Deferred()

    def resolutionBegan(self, resolutionInProgress: IHostResolution) -> None:
        pass

    def addressResolved(self, address: object) -> None:
        if isinstance(address, TwistedIPv4Address | TwistedIPv6Address):
            try:
                self._addresses.append(ipaddress.ip_address(address.host))
            except ValueError:
                pass

    def resolutionComplete(self) -> None:
        if self.deferred.called:  # cancelled by the fetch's timer meanwhile
            return
        if not self._addresses:
            self.deferred.errback(
                ProxyError(502, f"the origin's host name {self._host!r} does not resolve")
            )
        else:
            self.deferred.callback(self._addresses)


class _CappedConnection(ProtocolWrapper):
    """Abort a connection that sends more than ``cap`` bytes in answer to one request.

    The body has its own exact limit (``_LimitedBody``); this bounds what comes
    before it, which Twisted's parser would otherwise collect without end (an
    origin sending headers for ever). Each request written starts a new count.
    """

    def __init__(self, factory: WrappingFactory, wrapped: Any, cap: int) -> None:
        super().__init__(factory, wrapped)
        self._cap = cap
        self._received = 0
        self._exceeded = False

    def write(self, data: bytes) -> None:
        self._received = 0
        super().write(data)

    def writeSequence(self, data: Sequence[bytes]) -> None:
        self._received = 0
        super().writeSequence(data)

    def dataReceived(self, data: bytes) -> None:
        self._received += len(data)
        if self._received > self._cap:
            assert self.transport is not None
            self._exceeded = True
            self.transport.abortConnection()
            return
        super().dataReceived(data)

    def connectionLost(self, reason: Failure) -> None:
        if self._exceeded:
            # We hung up, not the origin: say why.
            reason = Failure(ProxyError(
                502, "the origin's answer is too large before its body (headers or framing)"
            ))
        super().connectionLost(reason)


class _CappedFactory(WrappingFactory):
    protocol = _CappedConnection
    # One per connection: "Starting factory" twice per origin fetch would drown the log.
    noisy = False

    def __init__(self, wrapped: IProtocolFactory, cap: int) -> None:
        super().__init__(wrapped)
        self._cap = cap

    def buildProtocol(self, addr: Any) -> _CappedConnection:
        return _CappedConnection(self, self.wrappedFactory.buildProtocol(addr), self._cap)


@implementer(IOpenSSLClientConnectionCreator)
class _IdentityChecked:
    """``optionsForClientTLS``, except for how a certificate that names no host at all
    is taken: like one that names another host, a failed check. Twisted's own check
    logs it as a bug, with a critical traceback, for any origin that sends one."""

    _log = Logger()

    def __init__(self, options: Any, service_id: Any) -> None:
        self._options = options
        self._service_id = service_id

    def clientConnectionForTLS(self, tls_protocol: Any) -> Any:
        connection = self._options.clientConnectionForTLS(tls_protocol)
        verifier = self._verifier(tls_protocol)
        connection.set_verify(VERIFY_PEER | VERIFY_FAIL_IF_NO_PEER_CERT, verifier)
        return connection

    def _verifier(self, tls_protocol: Any) -> Any:
        def verify(connection: Any, certificate: Any, error: int, depth: int, ok: int) -> bool:
            if depth != 0 or not ok:
                return bool(ok)  # only the leaf names the host; a broken chain is reported
            try:
                verify_service_identity(extract_patterns(certificate), [self._service_id], [])
            except (VerificationError, CertificateError):
                tls_protocol.failVerification(Failure())
                return False
            except Exception:
                # An exception must not escape an OpenSSL callback.
                self._log.failure("checking the origin's certificate failed")
                return False
            return True

        return verify


def identity_checked_tls(host: str, trust_root: IOpenSSLTrustRoot | None) -> Any:
    """Client TLS options for ``host`` (a name, or an IP address literal)."""
    options = optionsForClientTLS(host, trustRoot=trust_root)
    try:
        literal = parse_ip_literal(host)
        service_id = IPAddress_ID(str(literal)) if literal is not None else DNS_ID(host)
    except (ValueError, TypeError):
        return options  # a name service_identity cannot check: Twisted's check as it is
    return _IdentityChecked(options, service_id)


@implementer(IStreamClientEndpoint)
class _CheckedEndpoint:
    """Resolve once, check every address, connect to a checked IP literal."""

    _log = Logger()

    def __init__(self, factory: _CheckedEndpointFactory, host: str, port: int, tls: bool) -> None:
        self._factory = factory
        self._host = host
        self._port = port
        self._tls = tls
        self._literal = parse_ip_literal(host)

    def connect(self, protocolFactory: IProtocolFactory) -> Deferred[Any]:
        return Deferred.fromCoroutine(self._connect(protocolFactory))

    def _resolve(self) -> Deferred[list[IPAddress]]:
        if self._literal is not None:
            return succeed([self._literal])
        collector = _AddressCollector(self._host)
        self._factory.resolver.resolveHostName(
            collector,
            self._host,
            self._port,
            addressTypes=[TwistedIPv4Address, TwistedIPv6Address],
            transportSemantics="TCP",
        )
        return collector.deferred

    async def _connect(self, protocolFactory: IProtocolFactory) -> Any:
        addresses = await self._resolve()
        for ip in addresses:
            reason = self._factory.policy.refusal(ip)
            if reason is not None:
                self._log.info(
                    "refused the origin {host} at {address}: {reason}",
                    host=self._host,
                    address=str(ip),
                    reason=reason,
                )
                # For a DNS name, the address itself is not told: it would let
                # a client map the internal network through our resolver.
                shown = f"{ip}" if self._literal is not None else f"of {self._host}"
                raise ProxyError(403, f"the source address {shown} is not allowed: {reason}")
        capped = _CappedFactory(protocolFactory, self._factory.max_response_bytes)
        last: BaseException | None = None
        for ip in addresses:
            try:
                wrapper = await self._endpoint_for(ip).connect(capped)
            except (ConnectError, OSError) as e:
                last = e  # try the next address of the name
                continue
            # The pool wants the HTTP protocol itself; the cap stays underneath.
            return wrapper.wrappedProtocol
        assert last is not None
        raise last

    def _endpoint_for(self, ip: IPAddress) -> IStreamClientEndpoint:
        reactor = self._factory.reactor
        timeout = self._factory.connect_timeout
        endpoint: IStreamClientEndpoint
        if ip.version == 4:
            endpoint = TCP4ClientEndpoint(reactor, str(ip), self._port, timeout=timeout)
        else:
            endpoint = TCP6ClientEndpoint(reactor, str(ip), self._port, timeout=timeout)
        if self._tls:
            # The name, not the IP, goes into SNI and the certificate check.
            options = identity_checked_tls(self._host, self._factory.trust_root)
            endpoint = wrapClientTLS(options, endpoint)
        return endpoint


@implementer(IAgentEndpointFactory)
class _CheckedEndpointFactory:
    """The Agent's endpoints: every connection goes through the address policy.

    The Agent keys its connection pool by (scheme, host, port) of the URL, so a
    pooled connection is only ever reused for the very host (name or literal)
    whose addresses were checked when it was opened.
    """

    def __init__(
        self,
        reactor: Any,
        resolver: IHostnameResolver,
        policy: AddressPolicy,
        connect_timeout: float,
        max_response_bytes: int,
        trust_root: IOpenSSLTrustRoot | None,
    ) -> None:
        self.reactor = reactor
        self.resolver = resolver
        self.policy = policy
        self.connect_timeout = connect_timeout
        self.max_response_bytes = max_response_bytes
        self.trust_root = trust_root

    def endpointForURI(self, uri: URI) -> IStreamClientEndpoint:
        host = uri.host.decode("ascii")
        return _CheckedEndpoint(self, host, uri.port, tls=uri.scheme == b"https")


class _LimitedBody(Protocol):
    """Collect a response body, dropping the connection once it passes ``limit``.

    Never holds more than ``limit`` bytes: the chunk that goes over is discarded.
    """

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._chunks: list[bytes] = []
        self._size = 0
        self._done = False
        self.finished: Deferred[bytes] = Deferred(self._cancel)

    def _stop(self) -> None:
        self._done = True
        self._chunks = []
        if self.transport is not None:
            self.transport.stopProducing()

    def _cancel(self, _: Deferred[bytes]) -> None:
        if not self._done:
            self._stop()

    def dataReceived(self, data: bytes) -> None:
        if self._done:
            return
        self._size += len(data)
        if self._size > self._limit:
            self._stop()
            self.finished.errback(_too_large(self._limit))
            return
        self._chunks.append(data)

    def connectionLost(self, reason: Failure = Failure(ConnectionLost())) -> None:  # noqa: B008
        if self._done:
            return
        self._done = True
        # PotentialDataLoss is how a body without a length ends: by closing.
        if reason.check(ResponseDone, PotentialDataLoss):
            self.finished.callback(b"".join(self._chunks))
        else:
            self.finished.errback(reason)
        self._chunks = []


class _DropBody(Protocol):
    """Refuse a body we do not want: close the connection instead of reading it."""

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.transport.stopProducing()


def _drop_body(response: IResponse) -> None:
    response.deliverBody(_DropBody())


def _underlying_reasons(error: BaseException) -> list[BaseException]:
    """The low-level causes inside Twisted's wrapper exceptions, or the error itself."""
    reasons: Sequence[Failure] | None = getattr(error, "reasons", None)
    if not reasons:
        return [error]
    return [reason.value for reason in reasons]


def _is_tls_error(error: BaseException) -> bool:
    module = type(error).__module__
    return module.startswith(("OpenSSL", "ssl", "service_identity"))


def _tls_reason(error: BaseException) -> str:
    # pyOpenSSL's errors carry [(library, function, reason), ...]; the last
    # reason is the one a person can act on ("certificate verify failed").
    if type(error).__module__.startswith("service_identity"):
        return "its certificate is not valid for the host name"
    details = error.args[0] if error.args else None
    if isinstance(details, list) and details and isinstance(details[-1], tuple):
        return str(details[-1][-1])
    return str(error) or type(error).__name__


def _describe_failure(error: BaseException) -> ProxyError | None:
    """A ProxyError for a known network failure, or None for an unexpected one."""
    if isinstance(error, ProxyError):
        return error
    for cause in _underlying_reasons(error):
        if isinstance(cause, ProxyError):
            return cause
        if _is_tls_error(cause):
            return ProxyError(502, f"the TLS connection to the origin failed: {_tls_reason(cause)}")
        if isinstance(cause, ConnectionRefusedError):
            return ProxyError(502, "the origin refused the connection")
        if isinstance(cause, TimeoutError):
            return ProxyError(504, "the origin did not accept the connection in time")
        if isinstance(cause, ConnectError | OSError):
            return ProxyError(502, f"could not connect to the origin: {cause}")
        if isinstance(cause, ConnectionLost | ConnectionDone):
            return ProxyError(502, "the origin closed the connection before answering in full")
    if isinstance(error, ResponseFailed):
        return ProxyError(502, "the origin sent a broken response")
    return None


def _whole_range(response: IResponse) -> bool:
    """A 206 whose ``Content-Range`` is the whole representation: as good as a 200."""
    ranges = response.headers.getRawHeaders(b"content-range")
    matched = _WHOLE_RANGE.fullmatch(ranges[-1]) if ranges else None
    if matched is None:
        return False
    last, total = int(matched[1]), int(matched[2])
    return last + 1 == total and response.length in (total, UNKNOWN_LENGTH)


def _content_coding(headers: Headers) -> str | None:
    """The gzip or deflate coding a response's body is in; None for none (502 for others)."""
    codings = [
        coding.strip().lower()
        for value in headers.getRawHeaders(b"content-encoding", [])
        for coding in value.decode("latin-1").split(",")
    ]
    codings = [c for c in codings if c and c != "identity"]
    if not codings:
        return None
    if len(codings) > 1 or codings[0] not in DECODED_CODINGS:
        raise ProxyError(502, f"the origin sent the image in a content coding "
                              f"({', '.join(codings)}) though asked for none")
    return codings[0]


def _inflated(body: bytes, coding: str, limit: int) -> bytes:
    """``body`` with its ``coding`` (gzip or deflate) undone, at most ``limit`` bytes."""
    if not body:
        return body
    if coding == "deflate":
        # zlib-wrapped, as RFC 9110 says, or raw deflate, as some servers send.
        for bits in (zlib.MAX_WBITS, -zlib.MAX_WBITS):
            try:
                return _inflate_members(body, bits, coding, limit)
            except zlib.error:
                continue
        compressed = _looks_zlib_wrapped(body)
    else:
        try:
            return _inflate_members(body, DECODED_CODINGS[coding], coding, limit)
        except zlib.error:
            compressed = body.startswith(_GZIP_MAGIC)
    if compressed:
        raise ProxyError(502, f"the origin sent a corrupt {coding} body")
    # Labelled but not compressed (a server that labels every file): the bytes as sent.
    return body


_GZIP_MAGIC = b"\x1f\x8b"


def _looks_zlib_wrapped(body: bytes) -> bool:
    # RFC 1950: method 8 (deflate), and the two header bytes a multiple of 31.
    return len(body) >= 2 and body[0] & 0x0F == 8 and (body[0] << 8 | body[1]) % 31 == 0


def _inflate_members(body: bytes, wbits: int, coding: str, limit: int) -> bytes:
    """Every member of ``body`` inflated (a gzip file may hold several, one after
    another, as ``cat a.gz b.gz`` makes); 413 past ``limit``, 502 if cut short."""
    decoded = bytearray()
    rest = body
    while True:
        inflater = zlib.decompressobj(wbits)
        # One byte past the limit tells "too large" from "exactly the limit".
        decoded += inflater.decompress(rest, limit + 1 - len(decoded))
        if len(decoded) > limit:
            raise _too_large(limit)
        if not inflater.eof:
            raise ProxyError(502, f"the origin sent a truncated {coding} body")
        rest = inflater.unused_data
        if not (wbits == DECODED_CODINGS["gzip"] and rest.startswith(_GZIP_MAGIC)):
            return bytes(decoded)


def _run_here(function: Callable[..., Any], *args: Any) -> Deferred[Any]:
    return maybeDeferred(function, *args)


def _location_text(raw: bytes) -> str:
    """A ``Location`` as browsers follow it: spaces, controls and bytes that are not
    UTF-8 percent-encoded, instead of refused."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return quote(raw, safe=_PRINTABLE_ASCII)
    return "".join(c if not c.isascii() or c in _PRINTABLE_ASCII else quote(c) for c in text)


_PRINTABLE_ASCII = "".join(chr(c) for c in range(0x21, 0x7F))


class SourceFetcher:
    """Downloads source images over HTTP(S), within the address policy and limits.

    Owns a persistent connection pool; ``close`` it when the service stops.
    """

    _log = Logger()

    def __init__(
        self,
        reactor: Any,
        policy: AddressPolicy,
        limits: FetchLimits,
        resolver: IHostnameResolver | None = None,
        user_agent: str = "imgproxy/0.1",
        *,
        tls_trust_root: IOpenSSLTrustRoot | None = None,
        run_blocking: Callable[..., Deferred[Any]] = _run_here,
    ) -> None:
        """``resolver`` defaults to ``reactor.nameResolver``; ``tls_trust_root`` to the
        platform's trust store (tests pass their own certificate authority).
        ``run_blocking(function, *args)`` runs CPU work off the reactor thread (a thread
        pool's; by default, here): inflating a gzip body of ``max_bytes`` takes tens of
        milliseconds, which every other request on this reactor would wait out."""
        self._reactor = reactor
        self._run_blocking = run_blocking
        self._limits = limits
        self._user_agent = user_agent
        self._pool = OriginConnectionPool(reactor, persistent=True)
        endpoints = _CheckedEndpointFactory(
            reactor,
            resolver if resolver is not None else reactor.nameResolver,
            policy,
            connect_timeout=limits.timeout,
            max_response_bytes=limits.max_bytes + RESPONSE_OVERHEAD,
            trust_root=tls_trust_root,
        )
        # The bare Agent, not treq: treq's URL handling (hyperlink) rejects every
        # IPv6 literal host, and its gzip decoding, cookie jar and redirect
        # following are all things a proxy fetching for strangers must not do.
        self._agent = Agent.usingEndpointFactory(reactor, endpoints, pool=self._pool)
        # Without a bound, anyone pointing many requests at a slow origin of their
        # own would make this process hold max_bytes per request.
        self._turns = DeferredSemaphore(limits.concurrency)

    @property
    def downloading(self) -> int:
        """Downloads in progress."""
        return self._turns.limit - self._turns.tokens

    @property
    def waiting(self) -> int:
        """Downloads waiting for a turn."""
        return len(self._turns.waiting)

    async def _fetch_in_turn(self, url: str) -> FetchedSource:
        if not self._turns.tokens and self.waiting >= self._limits.queue:
            raise ProxyError(503, "too many source downloads in progress", retry_after=1)
        # Cancelled while waiting (the timeout), it leaves the queue and holds no turn.
        await self._turns.acquire()
        try:
            return await self._fetch(url)
        finally:
            self._turns.release()

    def close(self) -> Deferred[None]:
        """Close the pooled connections to origins."""
        return self._pool.closeCachedConnections()

    def fetch(self, url: str) -> Deferred[FetchedSource]:
        """Download ``url``, following up to ``max_redirects`` redirects.

        Fails only with ``ProxyError``, except that cancelling the returned
        Deferred yourself fails it with ``CancelledError`` as usual.
        """
        timed_out = False
        d = Deferred.fromCoroutine(self._fetch_in_turn(url))

        def expire() -> None:
            nonlocal timed_out
            timed_out = True
            d.cancel()

        timer = self._reactor.callLater(self._limits.timeout, expire)

        def finish(result: FetchedSource | Failure) -> FetchedSource | Failure:
            if timer.active():
                timer.cancel()
            if not isinstance(result, Failure):
                return result
            if timed_out:
                # Whatever the cancellation broke on its way out, the cause is the timer.
                return Failure(
                    ProxyError(504, f"the origin did not answer within {self._limits.timeout:g}s")
                )
            if result.check(ProxyError, CancelledError):
                return result
            if result.check(ConnectingCancelledError):
                # The caller cancelled while we were connecting: say so plainly.
                return Failure(CancelledError())
            known = _describe_failure(result.value)
            if known is not None:
                return Failure(known)
            self._log.failure("unexpected failure fetching {url}", result, url=url)
            return Failure(ProxyError(502, "fetching the source failed"))

        return d.addBoth(finish)

    async def _fetch(self, url: str) -> FetchedSource:
        current = check_source_url(url)  # canonical: no fragment, which is never sent
        try:
            seen = {request_url(current)}
        except ProxyError as e:
            raise ProxyError(400, f"parameter 'url': {e.reason}") from None
        hops = 0
        while True:
            response = await self._get(current)
            code = response.code
            if code in OK_STATUSES or (code == 206 and _whole_range(response)):
                body = await self._read_body(response)
                coding = _content_coding(response.headers)
                if coding is not None:
                    body = await self._run_blocking(
                        _inflated, body, coding, self._limits.max_bytes
                    )
                types = response.headers.getRawHeaders(b"content-type")
                content_type = types[-1].decode("latin-1") if types else None
                return FetchedSource(url=current, body=body, content_type=content_type)
            _drop_body(response)
            if code in NOT_FOUND_STATUSES:
                raise ProxyError(404, f"the origin answered {code}")
            if code not in REDIRECT_STATUSES:
                raise ProxyError(502, f"the origin answered {code}")
            current = self._next_hop(current, code, response.headers)
            hops += 1
            if hops > self._limits.max_redirects:
                raise ProxyError(
                    502, f"too many redirects (more than {self._limits.max_redirects})"
                )
            if request_url(current) in seen:
                raise ProxyError(502, "the origin redirects in a loop")
            seen.add(request_url(current))

    def _next_hop(self, current: str, code: int, headers: Headers) -> str:
        locations = headers.getRawHeaders(b"location")
        if not locations:
            raise ProxyError(502, f"the origin answered {code} without a Location")
        location = _location_text(locations[-1].strip())
        if "\\" in location.partition("?")[0].partition("#")[0]:
            # Browsers read a backslash as "/" (a Location "\\host/x" is another host),
            # urljoin as a path character: a Location the two read differently is refused.
            raise ProxyError(502, "the origin redirected badly: a backslash in its Location")
        try:
            target = check_source_url(urljoin(current, location))
        except ProxyError as e:
            reason = e.reason.replace("parameter 'url'", "the redirect's Location")
            raise ProxyError(502, f"the origin redirected badly: {reason}") from None
        except ValueError as e:
            raise ProxyError(502, f"the origin redirected badly: {e}") from None
        return target

    async def _get(self, url: str) -> IResponse:
        headers = Headers(
            {
                b"user-agent": [self._user_agent.encode("latin-1", "replace")],
                b"accept": [b"image/*,*/*;q=0.8"],
                # A compressed body could inflate past the byte limit within one read.
                b"accept-encoding": [b"identity"],
            }
        )
        wire_url = request_url(url)
        try:
            request = self._agent.request(b"GET", wire_url, headers)
        except ValueError as e:
            # The Agent's own URL checks, stricter than urlsplit's.
            raise ProxyError(502, f"the URL cannot be requested: {e}") from None
        return await request

    async def _read_body(self, response: IResponse) -> bytes:
        limit = self._limits.max_bytes
        if response.length is not UNKNOWN_LENGTH and response.length > limit:
            _drop_body(response)
            raise _too_large(limit)
        body = _LimitedBody(limit)
        response.deliverBody(body)
        return await body.finished
