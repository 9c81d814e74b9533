"""Fuzzing the internal worker API: any request, signed or not, gets a contract status and JSON."""

from __future__ import annotations

import json
from urllib.parse import quote

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from treq.testing import StubTreq
from twisted.internet.defer import fail
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.resource import Resource

from imgproxy.auth import RequestSigner
from imgproxy.errors import ProxyError
from imgproxy.metrics import NodeMetrics
from imgproxy.worker.cache import DiskCache
from imgproxy.worker.images import ImageService
from imgproxy.worker.internal import internal_api
from imgproxy.worker.transform import TransformLimits
from tests.worker.test_images import InlinePool

SECRET = b"f" * 32
ALLOWED = {200, 204, 400, 403, 404, 405, 413, 415, 502, 504}


class RefusingOrigin:
    """Every fetch fails the way an unreachable origin does."""

    def fetch(self, url: str):
        return fail(ProxyError(502, "the origin refused the connection"))


class InternalApiFuzzTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1_000_000)
        cache = DiskCache(self.mktemp(), 1 << 20, 3600, self.clock)
        images = ImageService(cache, RefusingOrigin(), InlinePool(), TransformLimits(),
                              NodeMetrics())
        self.signer = RequestSigner.from_secret(SECRET)
        root = Resource()
        root.putChild(b"v1", internal_api(images, self.signer, self.clock, NodeMetrics()))
        self.http = StubTreq(root)

    def send(self, method: bytes, path: bytes, query: bytes, body: bytes, sign: bool):
        headers = {}
        if sign:
            signed = self.signer.sign(method, path, query, body, self.clock.seconds())
            headers = {name: [value] for name, value in signed.items()}
        url = "http://worker.test" + (path + (b"?" + query if query else b"")).decode()
        d = self.http.request(method.decode(), url, headers=headers, data=body or None)
        self.http.flush()
        response = self.successResultOf(d)
        body_d = response.content()
        self.http.flush()
        return response.code, self.successResultOf(body_d)

    @settings(max_examples=400, deadline=None,
              suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(
        method=st.sampled_from([b"GET", b"POST", b"DELETE", b"PUT", b"HEAD"]),
        path=st.sampled_from([b"/v1/image", b"/v1/cache", b"/v1/source", b"/v1/nope", b"/v1/"]),
        pairs=st.lists(st.tuples(
            st.sampled_from(["url", "w", "h", "fit", "format", "q", "stale", "zz", ""]),
            st.one_of(st.text(max_size=20), st.sampled_from(
                ["http://origin.test/a.jpg", "0", "8193", "cover", "avif", "1", "-1"])),
        ), max_size=6),
        body=st.one_of(st.binary(max_size=200), st.builds(
            lambda d: json.dumps(d).encode(),
            st.dictionaries(st.sampled_from(["url", "w", "h", "fit", "format", "q", "x"]),
                            st.one_of(st.none(), st.integers(-5, 10_000), st.text(max_size=10),
                                      st.lists(st.integers(), max_size=2)), max_size=6))),
        sign=st.booleans(),
    )
    def test_every_request_gets_a_contract_status_and_a_json_error(
        self, method, path, pairs, body, sign
    ) -> None:
        query = "&".join(f"{quote(k)}={quote(v)}" for k, v in pairs).encode()
        code, content = self.send(method, path, query, body if method == b"POST" else b"",
                                  sign)
        self.assertIn(code, ALLOWED)
        if not sign:
            self.assertIn(code, (403, 404, 405))
        if code >= 400 and method != b"HEAD":
            payload = json.loads(content)
            self.assertEqual(payload["status"], code)
            self.assertIsInstance(payload["error"], str)

    def test_a_lone_surrogate_in_json_is_a_400_not_a_500(self) -> None:
        # JSON may escape half of a UTF-16 pair; such a string is not text.
        for body in (
            b'{"url": "http://origin.test/\\ud800.jpg"}',
            b'{"url": "http://origin.test/a.jpg", "fit": "\\ud800"}',
            b'{"url": "http://origin.test/a.jpg", "format": "\\udfff"}',
        ):
            code, content = self.send(b"POST", b"/v1/cache", b"", body, sign=True)
            self.assertEqual((code, json.loads(content)["status"]), (400, 400), body)
