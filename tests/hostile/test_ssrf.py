"""The SSRF guard of the real process: loopback in every spelling, directly and after redirects.

Two proxies: a restricted one (the default policy, plus ``--allow-networks
127.0.0.5/32`` so that a "public" origin can live on 127.0.0.5) and a permissive
one (``--allow-private-sources``). The targets are loopback origins on 127.0.0.1
and ::1; a target that the restricted proxy refuses must never even see a
connection. No packet leaves loopback: the refusal of 10/8, 169.254.169.254 and
the other non-public ranges is the pure table in ``tests/worker/test_addresses.py``.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred
from twisted.trial.unittest import TestCase

from tests.hostile import (
    PERMISSIVE,
    RESTRICTED,
    assert_json_error,
    image_path,
    live_reactor,
    shared_proxy,
)
from tests.hostile.origin import HostileOrigin, decode, noise_png
from tests.processes import Reply

ALLOWED_NETWORK = "127.0.0.5"  # what RESTRICTED allows
IMAGE = noise_png(24, 16, seed=21)


class SSRFTestCase(TestCase):
    timeout = 60

    def setUp(self) -> Deferred[None]:
        self.reactor = live_reactor()
        return Deferred.fromCoroutine(self._start())

    async def _start(self) -> None:
        self.front = await self._origin(ALLOWED_NETWORK)  # the allowed "public" origin
        self.target = await self._origin("127.0.0.1")
        self.target6 = await self._origin("::1")
        for origin in (self.front, self.target, self.target6):
            origin.serve("/cat.png", IMAGE)

    async def _origin(self, interface: str) -> HostileOrigin:
        origin = await HostileOrigin.start(self.reactor, interface)
        self.addCleanup(origin.stop)
        return origin

    def loopback_urls(self) -> dict[str, str]:
        """The image on loopback, as a client might spell it, by case name."""
        port, port6 = self.target.port, self.target6.port
        return {
            "127.0.0.1": f"http://127.0.0.1:{port}/cat.png",
            "[::ffff:127.0.0.1]": f"http://[::ffff:127.0.0.1]:{port}/cat.png",
            "[::1]": f"http://[::1]:{port6}/cat.png",
            "localhost (DNS)": f"http://localhost:{port}/cat.png",
        }

    def odd_spellings(self) -> dict[str, str]:
        """More spellings of loopback and this host, refused by the default policy."""
        port = self.target.port
        return {
            "decimal": f"http://2130706433:{port}/cat.png",
            "hex": f"http://0x7f000001:{port}/cat.png",
            "short": f"http://127.1:{port}/cat.png",
            "octal": f"http://0177.0.0.1:{port}/cat.png",
            "unspecified": f"http://0.0.0.0:{port}/cat.png",
            "another loopback address": f"http://127.0.0.6:{port}/cat.png",
            "mapped, hex": f"http://[::ffff:7f00:1]:{port}/cat.png",
            "mapped, long": f"http://[0:0:0:0:0:ffff:127.0.0.1]:{port}/cat.png",
            "compatible": f"http://[::127.0.0.1]:{port}/cat.png",
            "upper-case name": f"http://LOCALHOST:{port}/cat.png",
            "user info": f"http://{ALLOWED_NETWORK}@127.0.0.1:{port}/cat.png",
            "mixed radix": f"http://0x7f.0.0.1:{port}/cat.png",
            "IPv6 zone": f"http://[::1%25lo]:{port}/cat.png",
            "mapped with zone": f"http://[::ffff:127.0.0.1%25lo]:{port}/cat.png",
            "NAT64": f"http://[64:ff9b::7f00:1]:{port}/cat.png",
            "6to4": f"http://[2002:7f00:1::]:{port}/cat.png",
            "HTTPS to a name": f"https://localhost:{port}/cat.png",
        }

    def unicode_spellings(self) -> dict[str, str]:
        """Spellings that IDNA or NFKC turn into loopback (not sendable in a Location)."""
        port = self.target.port
        return {
            "full-width name": f"http://\uff4c\uff4f\uff43\uff41\uff4c\uff48\uff4f\uff53\uff54:{port}/",
            "ideographic dots": f"http://127\u30020\u30020\u30021:{port}/cat.png",
            "circled digits": f"http://\u2460\u2461\u2466.0.0.1:{port}/cat.png",
        }

    def redirects(self, targets: dict[str, str]) -> dict[str, str]:
        """A redirect on the allowed origin to each target: case name -> its URL."""
        urls = {}
        for index, (name, location) in enumerate(targets.items()):
            for status in (302, 307):
                path = self.front.redirect_to(f"/to-{index}-{status}", location, status)
                urls[f"{status} redirect to {name}"] = self.front.url(path)
        return urls

    def get(self, proxy: Any, url: str) -> Deferred[Reply]:
        return proxy.request_async(self.reactor, image_path(url, w=12))


class DefaultPolicyTests(SSRFTestCase):
    """Without ``--allow-private-sources``: 403 for loopback however reached."""

    def setUp(self) -> Deferred[None]:
        self.proxy = shared_proxy(*RESTRICTED)
        return super().setUp()

    async def test_the_allowed_network_is_served(self) -> None:
        # The control: 403s below are the guard's, not a proxy that serves nothing.
        reply = await self.get(self.proxy, self.front.url("/cat.png"))
        self.assertEqual(reply.status, 200, reply.body[:200])
        self.assertEqual(decode(reply.body).size, (12, 8))
        self.front.redirect_to("/inside", self.front.url("/cat.png"))
        reply = await self.get(self.proxy, self.front.url("/inside"))
        self.assertEqual(reply.status, 200, reply.body[:200])

    async def test_loopback_is_refused_directly(self) -> None:
        cases = {**self.loopback_urls(), **self.odd_spellings(), **self.unicode_spellings()}
        for name, url in cases.items():
            reply = await self.get(self.proxy, url)
            self.assertEqual(reply.status, 403, (name, reply.body[:200]))
            assert_json_error(reply, 403)
        self.assert_targets_untouched()

    async def test_loopback_is_refused_after_a_redirect(self) -> None:
        targets = {
            **self.loopback_urls(),
            **self.odd_spellings(),
            "scheme-relative": f"//127.0.0.1:{self.target.port}/cat.png",
            "scheme-relative IPv6": f"//[::1]:{self.target6.port}/cat.png",
        }
        for name, url in self.redirects(targets).items():
            reply = await self.get(self.proxy, url)
            self.assertEqual(reply.status, 403, (name, reply.body[:200]))
            assert_json_error(reply, 403)
        self.assertGreater(self.front.hits("/to-0-302"), 0)  # the first hop was fetched
        self.assert_targets_untouched()

    async def test_a_backslash_before_the_path_is_refused_however_reached(self) -> None:
        # Browsers read it as "/", Python's parser as text: an allow-list that parses
        # like a browser would pass a URL whose host, for Python, is another one.
        url = f"http://{ALLOWED_NETWORK}:1\\@127.0.0.1:{self.target.port}/"
        reply = await self.get(self.proxy, url)
        assert_json_error(reply, 400)
        self.assertIn("backslash", reply.json()["error"])
        redirect = self.front.url(self.front.redirect_to("/to-backslash", url, 302))
        assert_json_error(await self.get(self.proxy, redirect), 502)
        self.assert_targets_untouched()

    async def test_a_refused_name_does_not_reveal_its_address(self) -> None:
        reply = await self.get(self.proxy, self.loopback_urls()["localhost (DNS)"])
        assert_json_error(reply, 403)
        self.assertNotIn("127.0.0.1", reply.json()["error"])

    def assert_targets_untouched(self) -> None:
        # Refused before connecting: the targets never saw a TCP connection.
        self.assertEqual(self.target.origin.connections, 0)
        self.assertEqual(self.target6.origin.connections, 0)


class AllowPrivateSourcesTests(SSRFTestCase):
    """With ``--allow-private-sources`` the same loopback cases are served."""

    def setUp(self) -> Deferred[None]:
        self.proxy = shared_proxy(*PERMISSIVE)
        return super().setUp()

    async def test_loopback_is_served_directly(self) -> None:
        for name, url in self.loopback_urls().items():
            reply = await self.get(self.proxy, url)
            self.assertEqual(reply.status, 200, (name, reply.body[:200]))
            self.assertEqual(decode(reply.body).size, (12, 8), name)

    async def test_loopback_is_served_after_a_redirect(self) -> None:
        for name, url in self.redirects(self.loopback_urls()).items():
            reply = await self.get(self.proxy, url)
            self.assertEqual(reply.status, 200, (name, reply.body[:200]))
            self.assertEqual(decode(reply.body).size, (12, 8), name)
        self.assertGreater(self.target.hits("/cat.png"), 0)
        self.assertGreater(self.target6.hits("/cat.png"), 0)
