"""An ``HTTPConnectionPool`` that does not log every connection it opens and closes,
nor every interim response a server sends."""

from __future__ import annotations

from typing import Any

from twisted.logger import Logger, globalLogPublisher
from twisted.web._newclient import HTTP11ClientProtocol
from twisted.web.client import HTTPConnectionPool, _HTTP11ClientFactory

#: Interim (1xx) responses a server may send before its answer. We never ask for one
#: (no "Expect: 100-continue"); a server that sends them without end is cut off.
MAX_INTERIM_RESPONSES = 8


class _InterimResponses:
    """The log observer of one response parser: passes on its events, but counts
    the interim responses Twisted logs one line each for, and logs the first only.

    Without it, a hostile origin sending "100 Continue" for as long as the fetch
    timeout lets it wrote a log line per 25 bytes received: a log flood on demand.
    """

    _log = Logger()

    def __init__(self, protocol: HTTP11ClientProtocol) -> None:
        self._protocol = protocol
        self.count = 0

    def __call__(self, event: dict[str, Any]) -> None:
        code = event.get("code")
        if not (isinstance(code, int) and 100 <= code < 200):
            globalLogPublisher(event)
            return
        self.count += 1
        if self.count == 1:
            globalLogPublisher(event)
        elif self.count == MAX_INTERIM_RESPONSES + 1:  # the rest of the buffer may hold more
            self._log.warn(
                "{peer} sent more than {limit} interim responses: hanging up",
                peer=self._protocol.transport.getPeer(),
                limit=MAX_INTERIM_RESPONSES,
            )
            self._protocol.transport.loseConnection()


class _ClientProtocol(HTTP11ClientProtocol):
    def request(self, request: Any) -> Any:
        answer = super().request(request)
        parser = getattr(self, "_parser", None)
        if parser is not None:
            # Twisted's parser logs through its class's Logger; this one is its own.
            parser._log = Logger(
                namespace=f"{type(parser).__module__}.{type(parser).__name__}",
                source=parser,
                observer=_InterimResponses(self),
            )
        return answer


class _QuietClientFactory(_HTTP11ClientFactory):
    # Twisted logs "Starting factory" for every pooled connection otherwise:
    # two lines per origin fetch drown the access log.
    noisy = False


class _OriginClientFactory(_QuietClientFactory):
    def buildProtocol(self, addr: Any) -> HTTP11ClientProtocol:
        return _ClientProtocol(self._quiescentCallback)


class QuietConnectionPool(HTTPConnectionPool):
    """A persistent connection pool without per-connection log lines."""

    _factory = _QuietClientFactory


class OriginConnectionPool(QuietConnectionPool):
    """The same, for servers we do not run: endless interim responses are cut off.

    (Our own workers never send one: the gateway's pool saves the per-request cost.)
    """

    _factory = _OriginClientFactory
