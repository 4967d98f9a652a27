"""The dashboard in Debian's headless Chromium, served by the real REST API (rest.make_app) over an in-memory
node (tests/unit/memnode.py: the real NodeOperations over in-memory maps, checker and BGP speaker).

Each /vips poll first moves traffic in the node's counter maps (sampled at once), so the chart has rates to
draw, and a drain goes through the node's real change path. Chromium runs with a virtual time budget: the
page's one-second poll runs several times, then the DOM is dumped and read here.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from aiohttp.typedefs import Handler

from edge_lb import events
from edge_lb.api import dashboard, rest

from .memnode import BACKENDS, VIP, MemNode, running

CHROMIUM_TIMEOUT = 60.0  # seconds of wall time for one page load; the page itself runs on virtual time
VIRTUAL_TIME_MS = 4000


def chromium() -> str:
    for found in (shutil.which("chromium"), "/usr/bin/chromium"):
        if found and os.access(found, os.X_OK):
            return found
    if os.geteuid() != 0:
        pytest.skip("chromium is not installed (scripts/setup.sh installs it; CI runs as root and has it)")
    pytest.fail("chromium is missing: run scripts/setup.sh, which installs Debian's chromium")


# ---- the API over an in-memory node ---------------------------------------------------------------------


@dataclass
class Lab:
    """The real API and the dashboard over `node`. Each /vips poll first sends 100 packets per second of
    weight to every backend (through the counter maps and the sampler); `drain_on_poll` drains BACKENDS[0]
    through the node's operations when that poll arrives."""

    node: MemNode
    polls: int = 0
    drain_on_poll: int | None = None

    def app(self) -> web.Application:
        app = rest.make_app(self.node.ops, token=None, extra=[dashboard.add_routes])

        @web.middleware
        async def traffic(request: web.Request, handler: Handler) -> web.StreamResponse:
            if request.path == "/api/v1/vips":
                await self.poll()
            return await handler(request)

        app.middlewares.append(traffic)
        return app

    async def poll(self) -> None:
        self.polls += 1
        if self.polls == self.drain_on_poll:
            await self.node.ops.set_weight(VIP, BACKENDS[0], 0)
        weights = {str(b.address): b.weight for v in self.node.state.config.vips for b in v.backends}
        for i, backend in enumerate(BACKENDS):
            self.node.send(backend, 100 * (i + 1) * weights[backend])


# ---- the dumped DOM -------------------------------------------------------------------------------------


@dataclass
class Element:
    tag: str
    attrs: dict[str, str]
    children: list[Element | str] = field(default_factory=list)

    def text(self) -> str:
        return "".join(c if isinstance(c, str) else c.text() for c in self.children)

    def walk(self) -> Iterator[Element]:
        yield self
        for child in self.children:
            if isinstance(child, Element):
                yield from child.walk()

    def all(self, tag: str, **attrs: str) -> list[Element]:
        """Elements of `tag` with these attributes (underscores stand for dashes: data_state=...)."""
        want = {k.replace("_", "-"): v for k, v in attrs.items()}
        return [e for e in self.walk() if e.tag == tag and all(e.attrs.get(k) == v for k, v in want.items())]

    def one(self, tag: str, **attrs: str) -> Element:
        found = self.all(tag, **attrs)
        assert len(found) == 1, f"expected one <{tag} {attrs}>, found {len(found)}"
        return found[0]

    def cell(self, name: str) -> str:
        return self.one("td", **{"class": name}).text().strip()


class TreeBuilder(HTMLParser):
    VOID = frozenset({"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source",
                      "track", "wbr"})

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.root = Element("#document", {})
        self.stack = [self.root]

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        node = Element(tag, {k: v or "" for k, v in attrs})
        self.stack[-1].children.append(node)
        if tag not in self.VOID:
            self.stack.append(node)

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.stack[-1].children.append(Element(tag, {k: v or "" for k, v in attrs}))

    def handle_endtag(self, tag: str) -> None:
        for depth in range(len(self.stack) - 1, 0, -1):
            if self.stack[depth].tag == tag:
                del self.stack[depth:]
                return

    def handle_data(self, data: str) -> None:
        self.stack[-1].children.append(data)


def parse(html: str) -> Element:
    builder = TreeBuilder()
    builder.feed(html)
    builder.close()
    return builder.root


def band_thickness(path: Element) -> list[float]:
    """A stacked band's height at each sample: its path is the upper edge, then the lower edge backwards."""
    points = [float(y) for y in re.findall(r"[\d.]+,([\d.]+)", path.attrs["d"])]
    half = len(points) // 2
    upper, lower = points[:half], points[half:][::-1]
    return [low - up for up, low in zip(upper, lower, strict=True)]


# ---- running Chromium -----------------------------------------------------------------------------------


def dump_dom(binary: str, url: str, profile: Path) -> tuple[str, str]:
    """Load url in headless Chromium, let VIRTUAL_TIME_MS of page time pass, return (DOM, stderr)."""
    args = [binary, "--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run",
            f"--user-data-dir={profile}", f"--virtual-time-budget={VIRTUAL_TIME_MS}", "--dump-dom", url]
    # Its own process group, so a hung browser goes with all its helpers.
    with subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          start_new_session=True) as proc:
        try:
            out, err = proc.communicate(timeout=CHROMIUM_TIMEOUT)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate(timeout=10)
            pytest.fail(f"chromium did not dump {url} within {CHROMIUM_TIMEOUT:.0f}s; killed it")
    if proc.returncode != 0 or "<html" not in out:
        pytest.fail(f"chromium exited {proc.returncode} on {url}:\n{err[-3000:]}")
    return out, err


async def load(lab: Lab, tmp_path: Path, name: str) -> Element:
    """Serve the lab on an ephemeral port, load the dashboard once, and return the page as it ended."""
    runner = web.AppRunner(lab.app())
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = runner.addresses[0][1]
        lab.polls = 0
        html, _ = await asyncio.to_thread(dump_dom, chromium(), f"http://127.0.0.1:{port}/", tmp_path / name)
    finally:
        await runner.cleanup()
    return parse(html)


def backend_row(page: Element, address: str) -> Element:
    return page.one("tr", data_vip=VIP, data_backend=address)


def legend_pps(page: Element, address: str) -> int:
    return int(page.one("li", data_backend=address).attrs["data-pps"])


# ---- the tests ------------------------------------------------------------------------------------------


def test_dashboard_shows_the_lab_and_follows_a_drain(tmp_path: Path) -> None:
    chromium()  # skip or fail before starting anything

    async def main() -> tuple[Element, Element]:
        async with running(tmp_path) as node:
            lab = Lab(node)
            events.emit("started", instance="mem")  # the newest event when the first page loads
            first = await load(lab, tmp_path, "first")
            lab.drain_on_poll = 3  # drained while the second page is open, after it has shown the backend up
            second = await load(lab, tmp_path, "second")
            assert node.ring_slots(BACKENDS[0]) == 0, "the drain reached the maps"
            return first, second

    started = time.monotonic()
    first, second = asyncio.run(main())
    print(f"two page loads in {time.monotonic() - started:.1f}s")

    # The node, BGP, and a page that polls and reports no API problem.
    assert first.one("span", id="node-instance").text() == "mem"
    assert first.one("p", id="conn").attrs["data-ok"] == "true"
    assert int(first.one("body").attrs["data-polls"]) >= 3, "polled once a second over the virtual time"
    assert first.one("tr", data_peer="10.9.0.1").attrs["data-state"] == "up"
    assert first.all("code", data_prefix="10.0.0.1/32")
    assert "hidden" in first.one("p", id="bgp-disabled").attrs
    notices = [li.text() for li in first.one("ul", id="node-notices").all("li")]
    assert any(text.startswith("connection table: ") for text in notices), notices  # status's lines

    # The VIP and both backends, up, with their columns.
    assert VIP in first.one("section", data_vip=VIP).one("h3").text()
    for address in BACKENDS:
        row = backend_row(first, address)
        assert row.attrs["data-state"] == "up"
        assert row.cell("state") == "up"
        assert row.cell("address") == address
        assert row.cell("weight") == "1"
        assert row.cell("encap") == "ipip"  # how its packets travel (GUE would say "gue")
        assert row.cell("reason") == "fake ok"
        assert re.fullmatch(r"\d+\.\d ms", row.cell("latency")), row.cell("latency")

    # The chart: several samples, one band per backend, 10.1.0.2 carrying twice the packets of 10.1.0.1.
    chart = first.one("svg", **{"class": "traffic"})
    assert int(chart.attrs["data-samples"]) >= 2
    for address in BACKENDS:
        band = chart.one("path", data_backend=address)
        assert int(band.attrs["data-points"]) >= 2 and min(band_thickness(band)) > 0
    assert legend_pps(first, BACKENDS[1]) == pytest.approx(2 * legend_pps(first, BACKENDS[0]), rel=0.05)
    assert legend_pps(first, BACKENDS[0]) > 0
    assert first.one("ol", id="events").all("li")[0].attrs["data-event"] == "started", "newest first"

    # The second page saw the drain happen: the row, the chart's band going to nothing, the event on top.
    drained = backend_row(second, BACKENDS[0])
    assert drained.attrs["data-state"] == "drained"
    assert drained.cell("state") == "drained"
    assert drained.cell("weight") == "0 (config 1)"
    assert backend_row(second, BACKENDS[1]).attrs["data-state"] == "up"
    heights = band_thickness(second.one("path", data_backend=BACKENDS[0]))
    assert heights[0] > 0 and heights[-1] == 0, f"the drained backend's band should fall to zero: {heights}"
    assert legend_pps(second, BACKENDS[0]) == 0 < legend_pps(second, BACKENDS[1])
    shown = second.one("ol", id="events").all("li")
    names = [e.attrs["data-event"] for e in shown]
    assert names[0] == "weight" and "started" in names[1:], f"newest first: {names}"
    assert f"backend={BACKENDS[0]}" in shown[0].text()


def test_only_the_page_and_its_assets_are_served() -> None:
    paths = ("/", "/dashboard/app.js", "/dashboard/style.css",
             "/dashboard/__init__.py", "/dashboard/index.html", "/dashboard/..%2f__init__.py")

    async def main() -> dict[str, tuple[int, str, str]]:
        app = web.Application()
        dashboard.add_routes(app)
        runner = web.AppRunner(app)
        await runner.setup()
        try:
            site = web.TCPSite(runner, "127.0.0.1", 0)
            await site.start()
            base = f"http://127.0.0.1:{runner.addresses[0][1]}"
            results = {}
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
                for path in paths:
                    async with session.get(base + path) as response:
                        await response.read()
                        results[path] = (response.status, response.headers.get("Content-Type", ""),
                                         response.headers.get("Content-Security-Policy", ""))
            return results
        finally:
            await runner.cleanup()

    results = asyncio.run(main())
    assert results["/"][:2] == (200, "text/html; charset=utf-8")
    assert "script-src 'self'" in results["/"][2] and "unsafe-inline" not in results["/"][2]
    assert results["/dashboard/app.js"][:2] == (200, "text/javascript; charset=utf-8")
    assert results["/dashboard/style.css"][:2] == (200, "text/css; charset=utf-8")
    for path in paths[3:]:
        assert results[path][0] == 404, path
