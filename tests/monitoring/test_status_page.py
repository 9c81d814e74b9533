"""The status page at ``GET /``, rendered by headless Chromium against a real cluster.

Chromium runs the page's script with a virtual-time budget longer than the refresh
period, so the DOM it dumps is the one after an in-place refresh from
``/status.json``. The screenshots go to ``test-artifacts/`` for people to look at.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import attrs
import pytest
from PIL import Image
from twisted.trial.unittest import SkipTest, TestCase

from imgproxy.web.status import REFRESH_MS
from tests.monitoring import ARTIFACTS, LoopbackCluster, ensure_debs, plan_cluster, start_cluster
from tests.processes import ImgproxyProcess, in_thread

WINDOW = (1200, 900)
BAR_COLOUR = (0x3B, 0x7D, 0xD8)  # the bars' fill in imgproxy/web/status.py


# --- a small DOM ----------------------------------------------------------------------------


@attrs.define
class Element:
    """An element of the dumped DOM: tag, attributes, children, text inside it."""

    tag: str
    attributes: dict[str, str]
    children: list[Element] = attrs.field(factory=list)
    texts: list[str] = attrs.field(factory=list)

    def walk(self) -> list[Element]:
        """This element and every element below it, in document order."""
        found = [self]
        for child in self.children:
            found.extend(child.walk())
        return found

    def find_all(self, tag: str) -> list[Element]:
        return [e for e in self.walk() if e.tag == tag]

    def by_id(self, identifier: str) -> Element:
        for element in self.walk():
            if element.attributes.get("id") == identifier:
                return element
        raise AssertionError(f"no element with id {identifier!r}")

    @property
    def text(self) -> str:
        """All the text inside, in order, with runs of white space made one space."""
        parts = list(self.texts)
        for child in self.children:
            parts.append(child.text)
        return " ".join(" ".join(parts).split())


_VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source",
         "track", "wbr"}


class _TreeBuilder(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.root = Element("#document", {})
        self._stack = [self.root]

    def handle_starttag(self, tag: str, attrs_: list[tuple[str, str | None]]) -> None:
        element = Element(tag, {k: v or "" for k, v in attrs_})
        self._stack[-1].children.append(element)
        if tag not in _VOID:
            self._stack.append(element)

    def handle_startendtag(self, tag: str, attrs_: list[tuple[str, str | None]]) -> None:
        self._stack[-1].children.append(Element(tag, {k: v or "" for k, v in attrs_}))

    def handle_endtag(self, tag: str) -> None:
        for depth in range(len(self._stack) - 1, 0, -1):
            if self._stack[depth].tag == tag:
                del self._stack[depth:]
                return

    def handle_data(self, data: str) -> None:
        self._stack[-1].texts.append(data)


def parse_dom(markup: str) -> Element:
    """The element tree of an HTML document (enough for Chromium's ``--dump-dom``)."""
    builder = _TreeBuilder()
    builder.feed(markup)
    builder.close()
    return builder.root


# --- Chromium -------------------------------------------------------------------------------


def chromium(url: str, *args: str, timeout: float = 40) -> str:
    """Run headless Chromium on ``url`` with ``args``; its standard output (blocking).

    Chromium runs in a session of its own so that, on a timeout, its whole group of
    helper processes goes (by the group id of the one process started here).
    """
    profile = tempfile.mkdtemp(prefix="imgproxy-chromium-")
    command = [
        "chromium", "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
        "--no-first-run", "--disable-extensions", "--disable-background-networking",
        f"--user-data-dir={profile}", f"--window-size={WINDOW[0]},{WINDOW[1]}",
        f"--virtual-time-budget={REFRESH_MS + 2000}", *args, url,
    ]
    process = subprocess.Popen(
        command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        start_new_session=True,
    )
    try:
        out, err = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
        raise AssertionError(f"chromium did not finish within {timeout} s") from None
    finally:
        shutil.rmtree(profile, ignore_errors=True)
    if process.returncode != 0:
        raise AssertionError(f"chromium exited with {process.returncode}: {err[-2000:]!r}")
    return out.decode("utf-8", errors="replace")


@pytest.mark.slow  # real processes: 20-40 s on a busy 2-core machine
class StatusPageTests(TestCase):
    """The gateway's page in a real browser: members table, chart, refresh, screenshot."""

    timeout = 60

    def setUp(self) -> None:
        reason = ensure_debs("chromium")
        if reason is not None:
            raise SkipTest(reason)
        from twisted.internet import reactor

        self.reactor: Any = reactor

    async def start(self) -> LoopbackCluster:
        cluster = await plan_cluster(self, self.reactor, workers=2, images=4)
        await start_cluster(self.reactor, cluster)
        # Something in the workers' caches, so their pages have figures to show.
        for url in cluster.image_urls:
            path = cluster.image_path(url, w=48)
            for _ in range(2):
                reply = await cluster.gateway.request_async(self.reactor, path)
                self.assertEqual(reply.status, 200)
        return cluster

    async def render(self, node: ImgproxyProcess, artifact: str) -> Element:
        """The refreshed DOM of ``node``'s page; its screenshot saved as ``artifact``."""
        ARTIFACTS.mkdir(exist_ok=True)
        screenshot = ARTIFACTS / artifact
        screenshot.unlink(missing_ok=True)
        dom = await in_thread(
            self.reactor, chromium, node.url("/"), "--dump-dom", f"--screenshot={screenshot}"
        )
        self.check_screenshot(screenshot)
        return parse_dom(dom)

    def check_screenshot(self, path: Path) -> None:
        with Image.open(path) as image:
            self.assertEqual(image.size, WINDOW)
            pixels = image.convert("RGB")
            bar_pixels = sum(
                count for count, colour in pixels.getcolors(WINDOW[0] * WINDOW[1])
                if colour == BAR_COLOUR
            )
        # The bars show: at least a few hundred pixels of their colour.
        self.assertGreater(bar_pixels, 500, path)

    def members_rows(self, page: Element) -> dict[str, list[str]]:
        rows = page.by_id("members").find_all("tr")
        cells = [[cell.text for cell in row.find_all("td")] for row in rows]
        return {row[0]: row for row in cells if row}

    def check_members(self, page: Element, cluster: LoopbackCluster) -> None:
        rows = self.members_rows(page)
        self.assertEqual(set(rows), {p.name for p in cluster.processes})
        for node in cluster.processes:
            name, role, address, state, incarnation = rows[node.name]
            self.assertEqual(role, "gateway" if node is cluster.gateway else "worker")
            self.assertEqual(address, node.authority)
            self.assertEqual(state, "alive")
            self.assertRegex(incarnation, r"^\d+$")

    def check_chart(self, page: Element, cluster: LoopbackCluster) -> None:
        svg = page.by_id("chart").find_all("svg")
        self.assertEqual(len(svg), 1)
        bars = [r for r in svg[0].find_all("rect") if "bar" in r.attributes.get("class", "")]
        self.assertEqual(len(bars), len(cluster.workers))
        titles = [bar.find_all("title")[0].text for bar in bars]  # "worker-1: 49.5%"
        self.assertEqual({t.split(":")[0] for t in titles}, {w.name for w in cluster.workers})
        shares = [float(t.rsplit(" ", 1)[1].rstrip("%")) for t in titles]
        self.assertAlmostEqual(sum(shares), 100.0, delta=0.2)

    async def test_every_node_page_shows_the_members_the_chart_and_its_cache(self) -> None:
        cluster = await self.start()

        page = await self.render(cluster.gateway, "status-page-gateway.png")
        # The in-place refresh ran: it stamps the time it last succeeded.
        self.assertNotEqual(page.by_id("updated").text, "now")
        self.assertEqual(page.find_all("title")[0].text, "imgproxy · gateway-1")
        self.check_members(page, cluster)
        self.check_chart(page, cluster)
        self.assertIn("no cache on this node", page.by_id("stats").text)

        # The worker that holds the most entries (the keys may all be on one).
        figures = {
            w.name: (await w.request_async(self.reactor, "/status.json")).json()["cache"]
            for w in cluster.workers
        }
        worker = max(cluster.workers, key=lambda w: figures[w.name]["entries"])
        page = await self.render(worker, "status-page-worker.png")
        self.assertNotEqual(page.by_id("updated").text, "now")
        self.check_members(page, cluster)
        self.check_chart(page, cluster)
        stats = page.by_id("stats").text
        entries = int(stats.split("cache entries:")[1].split()[0])
        self.assertEqual(entries, figures[worker.name]["entries"], stats)
        self.assertGreater(entries, 0, stats)
        self.assertRegex(stats, r"hit ratio: \d+\.\d%")
