"""The gateway's (and a worker's handoff) client for the internal worker API, over treq.

One persistent connection pool for the whole node. Every request is signed
when a cluster secret is set. A worker that refuses, resets or does not answer
in time raises ``WorkerUnavailable`` (the caller fails over); a worker that
answers with an error status raises ``ProxyError`` with that status.
"""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Collection
from typing import Any
from urllib.parse import urlencode

import treq
from treq.client import HTTPClient
from twisted.internet.defer import CancelledError, Deferred, TimeoutError, inlineCallbacks
from twisted.internet.endpoints import HostnameEndpoint, TCP4ClientEndpoint, TCP6ClientEndpoint
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.web.client import URI, Agent
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgentEndpointFactory
from zope.interface import implementer

from imgproxy.auth import RequestSigner
from imgproxy.errors import ProxyError
from imgproxy.params import TransformSpec, source_key_of
from imgproxy.placement import WorkerRef
from imgproxy.quietpool import QuietConnectionPool
from imgproxy.worker.cache import CacheEntry, source_cache_key
from imgproxy.worker.internal import (
    AUTH_REFUSED_HEADER,
    CREATED_HEADER,
    HELD_OUT_HEADER,
    encode_names,
)

# Statuses a worker answers for its own reasons; they reach the client as they are.
PASSED_THROUGH = frozenset({400, 403, 404, 413, 415, 502, 504})


class WorkerUnavailable(Exception):
    """The worker could not be reached or did not answer: try the next one."""

    def __init__(self, worker: WorkerRef, why: str) -> None:
        super().__init__(f"{worker.name} ({worker.host}:{worker.port}): {why}")
        self.worker = worker
        self.why = why


class WorkerBusy(WorkerUnavailable):
    """The worker answered 503: alive, but try another one for this request."""


@implementer(IAgentEndpointFactory)
class DirectEndpoints:
    """Plain TCP to a worker's address: membership gives addresses, not names.

    Agent's default ``HostnameEndpoint`` resolves even an address and reports a
    refused connection only after its 0.3 s "happy eyeballs" delay: 0.3 s added
    to every failover from a dead worker.
    """

    def __init__(self, reactor: Any, connect_timeout: float) -> None:
        self._reactor = reactor
        self._timeout = connect_timeout

    def endpointForURI(self, uri: URI) -> IStreamClientEndpoint:
        host = uri.host.decode("ascii")
        try:
            address = ipaddress.ip_address(host.strip("[]"))
        except ValueError:
            return HostnameEndpoint(self._reactor, uri.host, uri.port, timeout=self._timeout)
        endpoint = TCP6ClientEndpoint if address.version == 6 else TCP4ClientEndpoint
        return endpoint(self._reactor, str(address), uri.port, timeout=self._timeout)


class WorkerClient:
    """Calls the internal API of workers."""

    def __init__(
        self,
        reactor: Any,
        signer: RequestSigner | None,
        lookup_timeout: float = 2.0,
        produce_timeout: float = 60.0,
        connections_per_worker: int = 32,
        http: Any = None,
    ) -> None:
        """``http``: a treq-like client to use instead of the pooled one (tests)."""
        self._reactor = reactor
        self._signer = signer
        self.lookup_timeout = lookup_timeout
        self.produce_timeout = produce_timeout
        self.pool = QuietConnectionPool(reactor, persistent=True)
        self.pool.maxPersistentPerHost = connections_per_worker
        self.pool.retryAutomatically = False
        self._http = http or HTTPClient(
            Agent.usingEndpointFactory(
                reactor, DirectEndpoints(reactor, lookup_timeout), pool=self.pool
            )
        )

    def close(self) -> Deferred[None]:
        return self.pool.closeCachedConnections()

    def _headers(self, method: bytes, path: bytes, query: bytes, body: bytes) -> Headers:
        headers = Headers({b"user-agent": [b"imgproxy-gateway"]})
        if body:
            headers.setRawHeaders(b"content-type", [b"application/json"])
        if self._signer is not None:
            signed = self._signer.sign(method, path, query, body, self._reactor.seconds())
            for name, value in signed.items():
                headers.setRawHeaders(name, [value])
        return headers

    @inlineCallbacks
    def _request(
        self,
        worker: WorkerRef,
        method: bytes,
        path: bytes,
        query: bytes,
        body: bytes,
        timeout: float,
        held_out: Collection[str] = (),
    ):  # type: ignore[no-untyped-def]
        host = f"[{worker.host}]" if ":" in worker.host else worker.host
        url = f"http://{host}:{worker.port}".encode("ascii") + path
        if query:
            url += b"?" + query
        headers = self._headers(method, path, query, body)
        if held_out:
            headers.setRawHeaders(HELD_OUT_HEADER, [encode_names(held_out)])

        @inlineCallbacks
        def exchange():  # type: ignore[no-untyped-def]
            response = yield self._http.request(
                method.decode("ascii"), url, headers=headers, data=body or None
            )
            content = yield treq.content(response)
            return response, content

        # One deadline for the whole exchange: a worker that sends its headers
        # and then stalls (SIGSTOP) must not hold the request forever.
        d = exchange()
        d.addTimeout(timeout, self._reactor)
        try:
            response, content = yield d
        except (CancelledError, TimeoutError):
            raise WorkerUnavailable(worker, f"no answer within {timeout:g}s") from None
        except Exception as error:
            # Refused, reset, cancelled while connecting, failed to send or to
            # read: whatever the transport says, the next worker may answer.
            raise WorkerUnavailable(worker, type(error).__name__) from None
        return response, content

    @staticmethod
    def _entry(key: str, url: str, response: Any, content: bytes) -> CacheEntry:
        headers = response.headers
        created = headers.getRawHeaders(CREATED_HEADER, [b"0"])[0]
        return CacheEntry(
            key=key,
            body=content,
            content_type=headers.getRawHeaders(b"content-type", [b"application/octet-stream"])[
                0
            ].decode("ascii", "replace"),
            created=float(created),
            etag=headers.getRawHeaders(b"etag", [b'""'])[0].decode("ascii", "replace"),
            source_url=url,
        )

    @staticmethod
    def _error(worker: WorkerRef, response: Any, content: bytes) -> Exception:
        if response.code == 503:
            return WorkerBusy(worker, "busy")
        try:
            reason = str(json.loads(content)["error"])
        except (ValueError, KeyError, TypeError):
            reason = f"the worker answered {response.code}"
        if response.code == 403 and response.headers.hasHeader(AUTH_REFUSED_HEADER):
            # Our signature, or our clock, is wrong for this worker: not the client's doing.
            return WorkerUnavailable(worker, f"refused the cluster authentication: {reason}")
        if response.code in PASSED_THROUGH:
            return ProxyError(response.code, reason)
        if response.code in (414, 431):
            # Another worker would refuse it too: failing over would take every
            # worker out of rotation for one client's request.
            return ProxyError(400, "the request is too long")
        if 400 <= response.code < 500:
            return ProxyError(502, f"the worker refused the request ({response.code})")
        return WorkerUnavailable(worker, f"answered {response.code}: {reason}")

    @inlineCallbacks
    def lookup(  # type: ignore[no-untyped-def]
        self, worker: WorkerRef, spec: TransformSpec, stale_ok: bool = False,
        timeout: float | None = None,
    ):
        """``GET /v1/image``: the cached variant, or None."""
        pairs = spec.to_query() + ([("stale", "1")] if stale_ok else [])
        query = urlencode(pairs).encode("ascii")
        response, content = yield self._request(
            worker, b"GET", b"/v1/image", query, b"", timeout or self.lookup_timeout
        )
        if response.code == 200:
            return self._entry(spec.cache_key, spec.url, response, content)
        if response.code == 404:
            return None
        raise self._error(worker, response, content)

    @inlineCallbacks
    def lookup_source(  # type: ignore[no-untyped-def]
        self, worker: WorkerRef, url: str, timeout: float | None = None
    ):
        """``GET /v1/source``: the cached original bytes (stale or not), or None."""
        query = urlencode([("url", url)]).encode("ascii")
        response, content = yield self._request(
            worker, b"GET", b"/v1/source", query, b"", timeout or self.lookup_timeout
        )
        if response.code == 200:
            return self._entry(source_cache_key(source_key_of(url)), url, response, content)
        if response.code == 404:
            return None
        raise self._error(worker, response, content)

    @inlineCallbacks
    def produce(  # type: ignore[no-untyped-def]
        self, worker: WorkerRef, spec: TransformSpec, held_out: Collection[str] = ()
    ):
        """``POST /v1/cache``: (the variant, whether the worker had it cached).

        ``held_out``: workers the worker must not copy the variant from (see
        ``HELD_OUT_HEADER``)."""
        body = json.dumps(spec.to_json(), sort_keys=True).encode("utf-8")
        response, content = yield self._request(
            worker, b"POST", b"/v1/cache", b"", body, self.produce_timeout, held_out
        )
        if response.code == 200:
            hit = response.headers.getRawHeaders(b"x-cache", [b"MISS"])[0] == b"HIT"
            return self._entry(spec.cache_key, spec.url, response, content), hit
        raise self._error(worker, response, content)

    @inlineCallbacks
    def purge(self, worker: WorkerRef, url: str):  # type: ignore[no-untyped-def]
        """``DELETE /v1/cache?url=``."""
        query = urlencode([("url", url)]).encode("ascii")
        response, content = yield self._request(
            worker, b"DELETE", b"/v1/cache", query, b"", self.lookup_timeout
        )
        if response.code != 204:
            raise self._error(worker, response, content)
        return None
