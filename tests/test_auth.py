"""Internal request signing: authentic, fresh requests pass; everything else is refused."""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from imgproxy.auth import SIGNATURE_HEADER, TIMESTAMP_HEADER, RequestSigner

SIGNER = RequestSigner.from_secret(b"k" * 16)
REQUEST = (b"POST", b"/v1/cache", b"", b'{"url": "http://x/"}')


class RequestSignerTests(SynchronousTestCase):
    def check(self, headers: dict[bytes, bytes], now: float, signer: RequestSigner = SIGNER,
              request: tuple[bytes, bytes, bytes, bytes] = REQUEST) -> str | None:
        return signer.refusal(*request, headers.get(TIMESTAMP_HEADER),
                              headers.get(SIGNATURE_HEADER), now)

    def test_signed_request_accepted(self) -> None:
        self.assertIsNone(self.check(SIGNER.sign(*REQUEST, now=1000.0), now=1001.0))

    def test_unsigned_request_refused(self) -> None:
        self.assertIn("not signed", self.check({}, now=0))

    def test_other_key_refused(self) -> None:
        other = RequestSigner.from_secret(b"j" * 16)
        self.assertIn("not valid", self.check(other.sign(*REQUEST, now=5.0), now=5.0))

    def test_tampered_parts_refused(self) -> None:
        headers = SIGNER.sign(*REQUEST, now=5.0)
        for i, tampered in enumerate([b"GET", b"/v1/image", b"a=1", b"{}"]):
            request = list(REQUEST)
            request[i] = tampered
            with self.subTest(part=i):
                self.assertIsNotNone(self.check(headers, 5.0, request=tuple(request)))

    def test_replay_outside_window_refused(self) -> None:
        headers = SIGNER.sign(*REQUEST, now=100.0)
        self.assertIn("replay", self.check(headers, now=100.0 + SIGNER.window + 1))
        self.assertIn("replay", self.check(headers, now=100.0 - SIGNER.window - 1))

    def test_malformed_timestamp_refused(self) -> None:
        headers = SIGNER.sign(*REQUEST, now=1.0)
        headers[TIMESTAMP_HEADER] = b"\xffnan"
        self.assertIsNotNone(self.check(headers, now=1.0))
        headers[TIMESTAMP_HEADER] = b"nan"
        self.assertIsNotNone(self.check(headers, now=1.0))
