"""An ``HTTPConnectionPool`` that does not log every connection it opens and closes."""

from __future__ import annotations

from twisted.web.client import HTTPConnectionPool, _HTTP11ClientFactory


class _QuietClientFactory(_HTTP11ClientFactory):
    # Twisted logs "Starting factory" for every pooled connection otherwise:
    # two lines per origin fetch drown the access log.
    noisy = False


class QuietConnectionPool(HTTPConnectionPool):
    """A persistent connection pool without per-connection log lines."""

    _factory = _QuietClientFactory
