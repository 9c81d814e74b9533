"""The worker client: every transport failure is a reason to fail over, never a 502."""

from __future__ import annotations

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.endpoints import HostnameEndpoint, TCP4ClientEndpoint, TCP6ClientEndpoint
from twisted.internet.error import ConnectingCancelledError, ConnectionRefusedError
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase
from twisted.web._newclient import RequestTransmissionFailed
from twisted.web.client import URI
from twisted.web.http_headers import Headers
from twisted.web.iweb import UNKNOWN_LENGTH

from imgproxy.errors import ProxyError
from imgproxy.gateway.client import DirectEndpoints, WorkerClient, WorkerUnavailable
from imgproxy.params import TransformSpec
from imgproxy.placement import WorkerRef
from imgproxy.worker.internal import AUTH_REFUSED_HEADER

WORKER = WorkerRef("w1", "127.0.0.9", 8080)
SPEC = TransformSpec("http://origin.test/a.jpg", width=10)


class ScriptedHttp:
    """A treq-like client whose request outcome the test sets."""

    def __init__(self, outcome) -> None:
        self.outcome = outcome

    def request(self, method, url, headers=None, data=None):
        return self.outcome() if callable(self.outcome) else self.outcome


class StalledResponse:
    """Headers arrived, the body never does."""

    code = 200
    length = UNKNOWN_LENGTH
    headers = Headers()

    def deliverBody(self, protocol) -> None:
        pass


class Answered:
    """A complete response with a JSON error body."""

    def __init__(self, code: int) -> None:
        self.code = code
        self.length = UNKNOWN_LENGTH
        self.headers = Headers()

    def deliverBody(self, protocol) -> None:
        from twisted.python.failure import Failure
        from twisted.web.client import ResponseDone

        protocol.dataReceived(b'{"error": "why", "status": %d}' % self.code)
        protocol.connectionLost(Failure(ResponseDone()))


class WorkerClientFailureTests(SynchronousTestCase):
    def client(self, outcome, clock: Clock | None = None) -> WorkerClient:
        return WorkerClient(clock or Clock(), None, lookup_timeout=2.0, http=ScriptedHttp(outcome))

    def test_transport_failures_become_worker_unavailable(self) -> None:
        for error in (ConnectionRefusedError(), ConnectingCancelledError(None),
                      RequestTransmissionFailed([]), OSError("reset")):
            with self.subTest(error=type(error).__name__):
                d = self.client(lambda e=error: fail(e)).lookup(WORKER, SPEC)
                self.failureResultOf(d, WorkerUnavailable)

    def test_a_request_too_long_for_the_worker_is_the_clients_400_not_a_failover(self) -> None:
        # Any other worker would refuse it too: failing over would take them all out.
        for code in (414, 431):
            d = self.client(lambda c=code: succeed(Answered(c))).lookup(WORKER, SPEC)
            self.assertEqual(self.failureResultOf(d, ProxyError).value.status, 400)

    def test_another_refusal_of_the_request_is_502_not_a_failover(self) -> None:
        for code in (405, 411, 429):
            d = self.client(lambda c=code: succeed(Answered(c))).lookup(WORKER, SPEC)
            self.assertEqual(self.failureResultOf(d, ProxyError).value.status, 502)

    def test_a_refused_signature_is_a_reason_to_fail_over_a_refused_source_is_not(self) -> None:
        refused = Answered(403)
        refused.headers = Headers({AUTH_REFUSED_HEADER: [b"1"]})
        d = self.client(lambda: succeed(refused)).lookup(WORKER, SPEC)
        self.failureResultOf(d, WorkerUnavailable)
        d = self.client(lambda: succeed(Answered(403))).lookup(WORKER, SPEC)
        self.assertEqual(self.failureResultOf(d, ProxyError).value.status, 403)

    def test_a_server_error_is_a_reason_to_fail_over(self) -> None:
        d = self.client(lambda: succeed(Answered(500))).lookup(WORKER, SPEC)
        self.failureResultOf(d, WorkerUnavailable)

    def test_no_answer_within_the_timeout(self) -> None:
        clock = Clock()
        d = self.client(lambda: Deferred(), clock).lookup(WORKER, SPEC)
        self.assertNoResult(d)
        clock.advance(2.0)
        self.assertIn("no answer", self.failureResultOf(d, WorkerUnavailable).value.why)

    def test_a_body_that_stalls_after_the_headers_times_out_too(self) -> None:
        clock = Clock()
        response: Deferred = Deferred()
        d = self.client(lambda: response, clock).lookup(WORKER, SPEC)
        response.callback(StalledResponse())
        self.assertNoResult(d)
        clock.advance(2.0)
        self.failureResultOf(d, WorkerUnavailable)


class DirectEndpointTests(SynchronousTestCase):
    """A worker's address is dialled as it is: no resolution, no happy-eyeballs delay."""

    def endpoint(self, url: bytes):
        return DirectEndpoints(MemoryReactorClock(), 2.0).endpointForURI(URI.fromBytes(url))

    def test_an_ipv4_address_is_plain_tcp(self) -> None:
        endpoint = self.endpoint(b"http://127.0.0.9:8080/v1/image")
        self.assertIsInstance(endpoint, TCP4ClientEndpoint)
        self.assertEqual((endpoint._host, endpoint._port, endpoint._timeout),
                         ("127.0.0.9", 8080, 2.0))

    def test_an_ipv6_address_is_plain_tcp_too(self) -> None:
        endpoint = self.endpoint(b"http://[fd00::9]:8080/v1/image")
        self.assertIsInstance(endpoint, TCP6ClientEndpoint)
        self.assertEqual(endpoint._host, "fd00::9")

    def test_a_name_is_still_resolved(self) -> None:
        self.assertIsInstance(self.endpoint(b"http://worker.test:8080/"), HostnameEndpoint)
