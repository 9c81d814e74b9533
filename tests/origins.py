"""A test origin: a twisted.web server on a loopback address, with hostile behaviours.

Usage (in a trial ``TestCase``)::

    origin = await start_origin(reactor)          # or yield, under inlineCallbacks
    self.addCleanup(origin.stop)
    origin.add("/cat.png", png_bytes, "image/png")
    origin.redirect("/old", "/cat.png")
    stream = origin.endless("/huge")              # a body that never ends
    ... fetch origin.url("/cat.png") ...
    origin.hits["/cat.png"]                       # requests seen for that path
    await stream.dropped                          # the client hung up early

``start_origin`` takes any reactor with ``listenTCP``: the real one for live
loopback tests, or a ``MemoryReactorClock`` (give a fixed ``port``) to drive
the same origin through ``twisted.test.iosim`` and a ``Clock``.

``StaticResolver`` is an ``IHostnameResolver`` that answers from a dict, so a
test can make ``loopback.test`` resolve to ``127.0.0.1`` without any DNS.
"""

from __future__ import annotations

import datetime
import ipaddress
import socket
from collections import Counter
from collections.abc import Iterable, Mapping
from typing import Any

import attrs
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from OpenSSL import SSL
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import (
    IHostnameResolver,
    IHostResolution,
    IListeningPort,
    IOpenSSLContextFactory,
    IPullProducer,
    IReactorTime,
    IResolutionReceiver,
)
from twisted.internet.ssl import Certificate
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site
from zope.interface import implementer


@implementer(IOpenSSLContextFactory)
@attrs.frozen
class _ServerTLSContext:
    """What ``listenSSL`` wants: a ``getContext()`` with the server's key and certificate.

    Built from cryptography objects directly (``PrivateCertificate.options()``
    goes through pyOpenSSL's deprecated X509/PKey types and warns).
    """

    key: ec.EllipticCurvePrivateKey
    certificate: x509.Certificate

    def getContext(self) -> SSL.Context:
        context = SSL.Context(SSL.TLS_SERVER_METHOD)
        context.use_certificate(self.certificate)
        context.use_privatekey(self.key)
        return context


@attrs.frozen
class TLSAuthority:
    """A throwaway certificate authority and one server certificate it signed.

    ``server_options`` is for ``listenSSL``; ``trust_root`` is what a client
    passes as ``trustRoot`` to trust the server (and nothing else).
    """

    trust_root: Certificate
    server_options: _ServerTLSContext


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def make_tls_authority(names: Iterable[str] = ("tls.test", "127.0.0.1")) -> TLSAuthority:
    """A new CA and a server certificate for ``names`` (DNS names or IP addresses)."""
    now = datetime.datetime.now(datetime.UTC)
    validity = (now - datetime.timedelta(hours=1), now + datetime.timedelta(days=1))
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(_name("imgproxy test CA"))
        .issuer_name(_name("imgproxy test CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(validity[0])
        .not_valid_after(validity[1])
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(ca_key, hashes.SHA256())
    )
    alternative_names: list[x509.GeneralName] = []
    for name in names:
        try:
            alternative_names.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            alternative_names.append(x509.DNSName(name))
    server_key = ec.generate_private_key(ec.SECP256R1())
    server_cert = (
        x509.CertificateBuilder()
        .subject_name(_name("imgproxy test origin"))
        .issuer_name(ca_cert.subject)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(validity[0])
        .not_valid_after(validity[1])
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
    )
    if alternative_names:  # none: a certificate that names no host (no subjectAltName)
        server_cert = server_cert.add_extension(
            x509.SubjectAlternativeName(alternative_names), critical=False
        )
    server_cert = server_cert.sign(ca_key, hashes.SHA256())
    trust_root = Certificate.loadPEM(ca_cert.public_bytes(serialization.Encoding.PEM))
    server_options = _ServerTLSContext(key=server_key, certificate=server_cert)
    return TLSAuthority(trust_root=trust_root, server_options=server_options)


@attrs.define(eq=False)
class Stream:
    """What a streaming behaviour sent, and whether the client hung up on it.

    ``dropped`` fires (with the bytes sent by then) when the client closes the
    connection before the body ended; ``completed`` when the body was sent in full.
    """

    sent: int = 0
    responses: int = 0
    dropped: Deferred[int] = attrs.field(factory=Deferred)
    completed: Deferred[int] = attrs.field(factory=Deferred)

    def _watch(self, request: Request) -> None:
        def lost(_: Failure) -> None:
            if not self.dropped.called:
                self.dropped.callback(self.sent)

        def done(_: object) -> None:
            if not self.completed.called:
                self.completed.callback(self.sent)

        request.notifyFinish().addCallbacks(done, lost)


class _Leaf(Resource):
    isLeaf = True

    def __init__(self, origin: Origin, path: str) -> None:
        super().__init__()
        self._origin = origin
        self._path = path

    def render(self, request: Request) -> bytes | int:
        self._origin._record(self._path, request)
        return self.respond(request)

    def respond(self, request: Request) -> bytes | int:
        raise NotImplementedError


class _Static(_Leaf):
    def __init__(
        self,
        origin: Origin,
        path: str,
        body: bytes,
        content_type: str | None,
        status: int,
        headers: Mapping[str, str],
        chunked: bool = False,
    ) -> None:
        super().__init__(origin, path)
        self._body = body
        self._content_type = content_type
        self._status = status
        self._headers = headers
        self._chunked = chunked

    def respond(self, request: Request) -> bytes | int:
        request.setResponseCode(self._status)
        if self._content_type is not None:
            request.setHeader(b"content-type", self._content_type.encode("latin-1"))
        for name, value in self._headers.items():
            request.setHeader(name.encode("latin-1"), value.encode("latin-1"))
        if not self._chunked:
            return self._body
        # Written before finishing, the body goes out chunked, with no length.
        for start in range(0, len(self._body), 4096):
            request.write(self._body[start : start + 4096])
        request.finish()
        return NOT_DONE_YET


@implementer(IPullProducer)
class _EndlessProducer:
    def __init__(self, request: Request, stream: Stream, chunk: bytes) -> None:
        self._request = request
        self._stream = stream
        self._chunk = chunk
        self._stopped = False

    def resumeProducing(self) -> None:
        if self._stopped:
            return
        self._stream.sent += len(self._chunk)
        self._request.write(self._chunk)

    def stopProducing(self) -> None:
        self._stopped = True


class _Endless(_Leaf):
    """A body that never ends, written as fast as the client reads it."""

    def __init__(
        self, origin: Origin, path: str, stream: Stream, declared: int | None, chunk: int
    ) -> None:
        super().__init__(origin, path)
        self._stream = stream
        self._declared = declared
        self._chunk = b"\xff" * chunk

    def respond(self, request: Request) -> int:
        self._stream.responses += 1
        request.setHeader(b"content-type", b"image/jpeg")
        if self._declared is not None:
            request.setHeader(b"content-length", str(self._declared).encode("ascii"))
        self._stream._watch(request)
        request.registerProducer(_EndlessProducer(request, self._stream, self._chunk), False)
        return NOT_DONE_YET


class _Drip(_Leaf):
    """Headers at once, then ``chunk`` every ``interval`` seconds, for ever (or ``count`` times).

    With ``interval=None`` it sends ``first`` and then nothing at all: a stall.
    """

    def __init__(
        self,
        origin: Origin,
        path: str,
        stream: Stream,
        clock: IReactorTime,
        interval: float | None,
        chunk: bytes,
        first: bytes,
        declared: int | None,
    ) -> None:
        super().__init__(origin, path)
        self._stream = stream
        self._clock = clock
        self._interval = interval
        self._chunk = chunk
        self._first = first
        self._declared = declared

    def respond(self, request: Request) -> int:
        self._stream.responses += 1
        request.setHeader(b"content-type", b"image/jpeg")
        if self._declared is not None:
            request.setHeader(b"content-length", str(self._declared).encode("ascii"))
        self._stream._watch(request)
        # Sends the headers now even when ``first`` is empty.
        request.write(self._first)
        self._stream.sent += len(self._first)
        if self._interval is None:
            return NOT_DONE_YET
        interval = self._interval
        pending: list[Any] = []

        def drip() -> None:
            if self._stream.dropped.called:
                return
            request.write(self._chunk)
            self._stream.sent += len(self._chunk)
            pending[:] = [self._clock.callLater(interval, drip)]

        def cancel(_: object) -> None:
            for call in pending:
                if call.active():
                    call.cancel()

        request.notifyFinish().addBoth(cancel)
        pending.append(self._clock.callLater(interval, drip))
        return NOT_DONE_YET


class _Truncate(_Leaf):
    """Promise ``declared`` bytes, send ``body``, then close the connection."""

    def __init__(self, origin: Origin, path: str, body: bytes, declared: int) -> None:
        super().__init__(origin, path)
        self._body = body
        self._declared = declared

    def respond(self, request: Request) -> int:
        request.setHeader(b"content-type", b"image/jpeg")
        request.setHeader(b"content-length", str(self._declared).encode("ascii"))
        request.write(self._body)
        assert request.channel is not None and request.channel.transport is not None
        request.channel.transport.loseConnection()
        return NOT_DONE_YET


class _Reset(_Leaf):
    """Hang up without answering."""

    def respond(self, request: Request) -> int:
        assert request.channel is not None
        transport = request.channel.transport
        assert transport is not None
        transport.abortConnection()
        return NOT_DONE_YET


class _Root(Resource):
    def __init__(self, origin: Origin) -> None:
        super().__init__()
        self._origin = origin
        self.leaves: dict[str, _Leaf] = {}

    def getChildWithDefault(self, path: bytes, request: Request) -> Resource:
        return self

    def render(self, request: Request) -> bytes | int:
        path = request.path.decode("latin-1")
        leaf = self.leaves.get(path)
        if leaf is None:
            self._origin._record(path, request)
            request.setResponseCode(404)
            request.setHeader(b"content-type", b"text/plain")
            return b"no such path on the test origin\n"
        return leaf.render(request)


@attrs.frozen
class SeenRequest:
    """One request as the origin saw it; header names are lower case."""

    method: str
    path: str
    headers: dict[str, list[str]]

    def header(self, name: str) -> str | None:
        """The last value of header ``name``, or None."""
        values = self.headers.get(name.lower())
        return values[-1] if values else None


@attrs.define(eq=False)
class Origin:
    """A running test origin; add behaviours by path, read ``hits``, ``stop`` it."""

    interface: str
    clock: IReactorTime
    scheme: str = "http"
    hits: Counter[str] = attrs.field(factory=Counter)
    requests: list[SeenRequest] = attrs.field(factory=list)
    connections: int = 0  # TCP connections accepted
    _root: _Root | None = None
    _port: IListeningPort | None = None

    @property
    def port(self) -> int:
        assert self._port is not None
        return self._port.getHost().port

    @property
    def authority(self) -> str:
        """``host:port``, with brackets around an IPv6 host."""
        host = f"[{self.interface}]" if ":" in self.interface else self.interface
        return f"{host}:{self.port}"

    def url(self, path: str = "/") -> str:
        """The absolute URL of ``path`` on this origin (``https`` when it serves TLS)."""
        return f"{self.scheme}://{self.authority}{path}"

    def _record(self, path: str, request: Request) -> None:
        self.hits[path] += 1
        headers = {
            name.decode("latin-1").lower(): [v.decode("latin-1") for v in values]
            for name, values in request.requestHeaders.getAllRawHeaders()
        }
        method = request.method.decode("latin-1")
        self.requests.append(SeenRequest(method=method, path=path, headers=headers))

    def _set(self, path: str, leaf: _Leaf) -> None:
        assert self._root is not None
        self._root.leaves[path] = leaf

    def add(
        self,
        path: str,
        body: bytes,
        content_type: str | None = "application/octet-stream",
        *,
        status: int = 200,
        headers: Mapping[str, str] | None = None,
        chunked: bool = False,
    ) -> None:
        """Serve ``body`` at ``path`` with that status, type and extra headers.

        ``chunked`` sends it with chunked transfer encoding, without a Content-Length.
        """
        leaf = _Static(self, path, body, content_type, status, dict(headers or {}), chunked)
        self._set(path, leaf)

    def status(self, path: str, code: int, body: bytes = b"") -> None:
        """Answer ``code`` at ``path`` (404, 500, 304, ...)."""
        self._set(path, _Static(self, path, body, "text/plain", code, {}))

    def redirect(self, path: str, location: str, status: int = 302) -> None:
        """Redirect ``path`` to ``location`` (relative or absolute, sent as given)."""
        self._set(path, _Static(self, path, b"", "text/plain", status, {"Location": location}))

    def redirect_chain(self, prefix: str, hops: int, final: str) -> str:
        """``hops`` redirects ``prefix0 -> prefix1 -> ... -> final``; returns the first path."""
        for i in range(hops):
            target = final if i == hops - 1 else f"{prefix}{i + 1}"
            self.redirect(f"{prefix}{i}", target)
        return f"{prefix}0" if hops else final

    def endless(
        self, path: str, declared_length: int | None = None, chunk: int = 64 << 10
    ) -> Stream:
        """A body that never ends; with ``declared_length`` it claims that Content-Length."""
        stream = Stream()
        self._set(path, _Endless(self, path, stream, declared_length, chunk))
        return stream

    def drip(
        self,
        path: str,
        interval: float | None,
        chunk: bytes = b"\xff",
        *,
        first: bytes = b"",
        declared_length: int | None = None,
    ) -> Stream:
        """Send ``first``, then ``chunk`` every ``interval`` seconds of ``clock``, for ever.

        ``interval=None`` stalls after ``first``.
        """
        stream = Stream()
        leaf = _Drip(self, path, stream, self.clock, interval, chunk, first, declared_length)
        self._set(path, leaf)
        return stream

    def truncate(self, path: str, body: bytes, declared_length: int) -> None:
        """Claim ``declared_length`` bytes, send only ``body``, then hang up."""
        self._set(path, _Truncate(self, path, body, declared_length))

    def reset(self, path: str) -> None:
        """Abort the connection at ``path`` without sending a response."""
        self._set(path, _Reset(self, path))

    def stop(self) -> Deferred[None]:
        """Stop listening (established connections are left to close)."""
        assert self._port is not None
        return self._port.stopListening() or succeed(None)


class _CountingSite(Site):
    def __init__(self, origin: Origin, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._origin = origin

    def buildProtocol(self, addr: Any) -> Any:
        self._origin.connections += 1
        return super().buildProtocol(addr)


def start_origin(
    reactor: Any,
    interface: str = "127.0.0.1",
    port: int = 0,
    clock: IReactorTime | None = None,
    tls: TLSAuthority | None = None,
) -> Deferred[Origin]:
    """Listen on ``interface:port`` (port 0: any free one) and return the ``Origin``.

    ``clock`` times the drip behaviour; it defaults to ``reactor``. With ``tls``
    the origin serves HTTPS with that authority's server certificate. Fails
    with ``CannotListenError`` when the address cannot be bound (e.g. no ``::1``).
    """
    origin = Origin(
        interface=interface,
        clock=clock if clock is not None else reactor,
        scheme="http" if tls is None else "https",
    )
    root = _Root(origin)
    origin._root = root
    site = _CountingSite(origin, root, reactor=origin.clock)
    site.displayTracebacks = False
    try:
        if tls is None:
            origin._port = reactor.listenTCP(port, site, interface=interface)
        else:
            origin._port = reactor.listenSSL(port, site, tls.server_options, interface=interface)
    except CannotListenError:
        return fail()
    if origin._port.getHost().port == 0:
        # A MemoryReactor reports port 0 when asked for it: nothing to connect to.
        raise ValueError("give a fixed port to start_origin on a memory reactor")
    return succeed(origin)


def unused_port(interface: str = "127.0.0.1") -> int:
    """A port nothing listens on right now: connecting to it is refused."""
    family = socket.AF_INET6 if ":" in interface else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.bind((interface, 0))
        return int(probe.getsockname()[1])


@implementer(IHostResolution)
@attrs.frozen
class _Resolution:
    name: str

    def cancel(self) -> None:
        pass


@implementer(IHostnameResolver)
class StaticResolver:
    """Resolves names from a dict of ``name -> [addresses]``; unknown names resolve to none.

    ``lookups`` records every name asked for, in order. ``hang`` names get no
    answer at all (for timeout tests).
    """

    def __init__(self, names: Mapping[str, Iterable[str]], hang: Iterable[str] = ()) -> None:
        self._names = {name: list(addresses) for name, addresses in names.items()}
        self._hang = set(hang)
        self.lookups: list[str] = []

    def resolveHostName(
        self,
        resolutionReceiver: IResolutionReceiver,
        hostName: str,
        portNumber: int = 0,
        addressTypes: Any = None,
        transportSemantics: str = "TCP",
    ) -> IResolutionReceiver:
        self.lookups.append(hostName)
        resolution = _Resolution(hostName)
        resolutionReceiver.resolutionBegan(resolution)
        if hostName in self._hang:
            return resolutionReceiver
        for address in self._names.get(hostName, []):
            if ":" in address:
                resolutionReceiver.addressResolved(IPv6Address("TCP", address, portNumber))
            else:
                resolutionReceiver.addressResolved(IPv4Address("TCP", address, portNumber))
        resolutionReceiver.resolutionComplete()
        return resolutionReceiver
