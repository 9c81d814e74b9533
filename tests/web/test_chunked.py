"""The chunked request-body decoder: CRLF or bare LF framing, in any pieces; bad framing refused."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.http import _DataLoss, _MalformedChunkedDataError

from imgproxy.web.chunked import MAX_SIZE_LINE, LenientChunkedDecoder


class Decoded:
    def __init__(self) -> None:
        self.body = b""
        self.rest: bytes | None = None
        self.decoder = LenientChunkedDecoder(self.data, self.finish)

    def data(self, piece: bytes) -> None:
        self.body += piece

    def finish(self, rest: bytes) -> None:
        self.rest = rest

    def feed(self, *pieces: bytes) -> Decoded:
        for piece in pieces:
            if self.rest is None:
                self.decoder.dataReceived(piece)
            else:  # as the channel does: what follows the body is the next request's
                self.rest += piece
        return self


def framed(chunks: list[bytes], ends: list[bytes], trailers: tuple[bytes, ...] = ()) -> bytes:
    """``chunks`` in chunked coding, the i-th line ending in ``ends[i % len(ends)]``."""
    out, i = b"", 0
    for chunk in [*chunks, b""]:
        end = ends[i % len(ends)]
        out += b"%x" % len(chunk) + end
        if chunk:
            out += chunk + ends[(i + 1) % len(ends)]
        i += 1
    for trailer in trailers:
        out += trailer + ends[0]
    return out + ends[-1]


class LenientChunkedDecoderTests(SynchronousTestCase):
    def test_crlf_and_bare_lf_framing_give_the_same_body(self) -> None:
        for ends in ([b"\r\n"], [b"\n"], [b"\r\n", b"\n"]):
            decoded = Decoded().feed(framed([b"abc", b"defgh"], ends) + b"NEXT")
            self.assertEqual((decoded.body, decoded.rest), (b"abcdefgh", b"NEXT"), ends)
            decoded.decoder.noMoreData()

    def test_extensions_and_trailers_are_read_past(self) -> None:
        data = b"3;name=value\nabc\n0\nX-Checksum: 1\r\n\r\n"
        decoded = Decoded().feed(data)
        self.assertEqual((decoded.body, decoded.rest), (b"abc", b""))

    def test_byte_at_a_time(self) -> None:
        data = framed([b"hello", b"world"], [b"\r\n", b"\n"])
        decoded = Decoded().feed(*(bytes([b]) for b in data))
        self.assertEqual((decoded.body, decoded.rest), (b"helloworld", b""))

    def test_bad_framing_is_refused_at_once(self) -> None:
        for data in (b"zz\nabc\n", b"\nabc\n", b"-3\nabc\n", b"3\nabcdef\n",
                     b"1" * 17 + b"\n", b"3" * (MAX_SIZE_LINE + 2),
                     b"0\n" + b"X: y\n" * 20000):
            with self.subTest(data=data[:30]), self.assertRaises(_MalformedChunkedDataError):
                Decoded().feed(data)

    def test_a_body_that_stops_short_is_data_loss(self) -> None:
        decoded = Decoded().feed(b"5\nab")
        self.assertRaises(_DataLoss, decoded.decoder.noMoreData)

    @settings(max_examples=200, deadline=None)
    @given(
        chunks=st.lists(st.binary(min_size=1, max_size=40), max_size=6),
        ends=st.lists(st.sampled_from([b"\r\n", b"\n"]), min_size=1, max_size=4),
        cuts=st.lists(st.integers(min_value=0, max_value=400), max_size=8),
    )
    def test_any_framing_in_any_pieces(
        self, chunks: list[bytes], ends: list[bytes], cuts: list[int]
    ) -> None:
        data = framed(chunks, ends) + b"GET / HTTP/1.1"
        edges = sorted({0, len(data), *(c % (len(data) + 1) for c in cuts)})
        decoded = Decoded().feed(*(data[a:b] for a, b in zip(edges, edges[1:], strict=False)))
        self.assertEqual((decoded.body, decoded.rest), (b"".join(chunks), b"GET / HTTP/1.1"))
