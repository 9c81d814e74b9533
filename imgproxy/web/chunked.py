"""A chunked request body whose framing lines may end in a bare LF, as its head's may.

Twisted's decoder waits for CRLF; a body framed with bare LF (which RFC 9112 2.2
lets a recipient accept, and nginx does) then waited out the idle timeout.
This decoder has Twisted's interface (``dataReceived``, ``noMoreData``, the two
callbacks) and raises Twisted's own errors, which ``HTTPChannel`` answers with 400.
"""

from __future__ import annotations

from collections.abc import Callable

from twisted.web.http import _DataLoss, _MalformedChunkedDataError

#: The longest chunk-size line (with extensions) and all trailer lines together.
MAX_SIZE_LINE = 1024
MAX_TRAILER = 64 * 1024
#: A chunk size of more hex digits than this cannot be meant (2**64 bytes).
MAX_SIZE_DIGITS = 16
_HEX = frozenset(b"0123456789abcdefABCDEF")


class LenientChunkedDecoder:
    """Chunked transfer coding (RFC 9112 7.1), lines ending in CRLF or LF."""

    def __init__(
        self, dataCallback: Callable[[bytes], None], finishCallback: Callable[[bytes], None]
    ) -> None:
        self.dataCallback = dataCallback
        self.finishCallback = finishCallback
        self.state = "SIZE"
        self._buffer = bytearray()
        self._searched = 0  # where the search for the next LF resumes
        self._remaining = 0
        self._trailer_bytes = 0

    def dataReceived(self, data: bytes) -> None:
        if self.state == "FINISHED":
            raise RuntimeError("chunked body data after its last chunk")
        self._buffer += data
        while self._step():
            pass

    def noMoreData(self) -> None:
        if self.state != "FINISHED":
            raise _DataLoss(f"the chunked body ended in state {self.state}")

    def _line(self, limit: int) -> bytes | None:
        """The next line without its CRLF or LF, or None until it is whole."""
        end = self._buffer.find(b"\n", self._searched)
        if end == -1:
            if len(self._buffer) > limit:
                raise _MalformedChunkedDataError("a chunked body's line is too long")
            self._searched = len(self._buffer)
            return None
        if end > limit:
            raise _MalformedChunkedDataError("a chunked body's line is too long")
        line = bytes(self._buffer[:end]).rstrip(b"\r")
        del self._buffer[: end + 1]
        self._searched = 0
        return line

    def _step(self) -> bool:
        """Handle what the buffer allows in the current state; whether to go on."""
        if self.state == "SIZE":
            line = self._line(MAX_SIZE_LINE)
            if line is None:
                return False
            digits = line.split(b";", 1)[0].rstrip(b" \t")
            if not digits or len(digits) > MAX_SIZE_DIGITS or not set(digits) <= _HEX:
                raise _MalformedChunkedDataError(f"bad chunk size {digits[:20]!r}")
            self._remaining = int(digits, 16)
            self.state = "BODY" if self._remaining else "TRAILER"
            return True
        if self.state == "BODY":
            if not self._buffer:
                return False
            piece = bytes(self._buffer[: self._remaining])
            del self._buffer[: len(piece)]
            self._remaining -= len(piece)
            if not self._remaining:
                self.state = "BODY_END"
            self.dataCallback(piece)
            return True
        if self.state == "BODY_END":
            if self._buffer.startswith(b"\n"):
                del self._buffer[:1]
            elif self._buffer.startswith(b"\r\n"):
                del self._buffer[:2]
            elif self._buffer in (b"", b"\r"):
                return False
            else:
                raise _MalformedChunkedDataError("a chunk is longer than its size")
            self.state = "SIZE"
            return True
        # TRAILER: header lines (ignored) up to an empty one.
        line = self._line(MAX_TRAILER - self._trailer_bytes)
        if line is None:
            return False
        if line:
            self._trailer_bytes += len(line) + 1
            return True
        self.state = "FINISHED"
        rest = bytes(self._buffer)
        self._buffer.clear()
        self.finishCallback(rest)
        return False
