"""``GET /``: a status page that works offline: server-rendered HTML, inline SVG, no assets.

The page renders complete on the server (a browser without JavaScript sees
everything) and then refreshes its parts in place from ``/status.json``.
"""

from __future__ import annotations

import html
from collections.abc import Callable
from typing import Any

from twisted.web.server import Request

from imgproxy.web.public import JsonResource

REFRESH_MS = 3000

_STYLE = """
body{font-family:system-ui,sans-serif;margin:2rem;color:#222;background:#fafafa}
h1{font-size:1.4rem;margin:0 0 .3rem} h2{font-size:1.1rem;margin:1.5rem 0 .5rem}
table{border-collapse:collapse;background:#fff} td,th{padding:.3rem .8rem;
border-bottom:1px solid #ddd;text-align:left} th{background:#f0f0f0}
.alive{color:#187a2f}.suspect{color:#b36b00}.dead,.failed{color:#b00020}.left{color:#777}
.stats span{display:inline-block;margin-right:2rem} .muted{color:#777;font-size:.85rem}
"""

_SCRIPT = """
async function refresh(){
  try{
    const r = await fetch('/status.json', {cache: 'no-store'});
    if(!r.ok) return;
    const s = await r.json();
    document.getElementById('members').innerHTML = s.members_html;
    document.getElementById('chart').innerHTML = s.chart_svg;
    document.getElementById('stats').innerHTML = s.stats_html;
    document.getElementById('updated').textContent = new Date().toLocaleTimeString();
  }catch(e){}
}
setInterval(refresh, REFRESH_MS);
""".replace("REFRESH_MS", str(REFRESH_MS))


def _e(value: object) -> str:
    return html.escape(str(value), quote=True)


def members_html(members: list[dict[str, Any]]) -> str:
    rows = "".join(
        "<tr><td>{name}</td><td>{role}</td><td>{address}</td>"
        '<td class="{state}">{state}</td><td>{incarnation}</td></tr>'.format(
            name=_e(m.get("name", "")),
            role=_e(m.get("role", "")),
            address=_e(f"{m.get('address', '')}:{m.get('http_port', '')}"),
            state=_e(m.get("state", "")),
            incarnation=_e(m.get("incarnation", "")),
        )
        for m in members
    )
    return (
        "<table><thead><tr><th>name</th><th>role</th><th>address</th><th>state</th>"
        f"<th>incarnation</th></tr></thead><tbody>{rows}</tbody></table>"
    )


def chart_svg(shares: dict[str, float]) -> str:
    """Horizontal bars: the share of keys each worker owns."""
    if not shares:
        return '<p class="muted">no worker is alive</p>'
    bar_height, gap, label_width, width = 22, 6, 180, 420
    height = len(shares) * (bar_height + gap)
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" role="img" aria-label="share of keys per worker"'
        f' width="{label_width + width + 70}" height="{height}">'
    ]
    for i, (name, share) in enumerate(sorted(shares.items())):
        y = i * (bar_height + gap)
        length = max(1.0, share * width)
        parts.append(
            f'<text x="0" y="{y + 15}" font-size="13">{_e(name)}</text>'
            f'<rect class="bar" x="{label_width}" y="{y}" width="{length:.1f}" '
            f'height="{bar_height}" fill="#3b7dd8"><title>{_e(name)}: {share:.1%}</title></rect>'
            f'<text x="{label_width + length + 6:.1f}" y="{y + 15}" font-size="13">'
            f"{share:.1%}</text>"
        )
    parts.append("</svg>")
    return "".join(parts)


def stats_html(stats: dict[str, Any]) -> str:
    """This node's cache figures; a node without a cache (a gateway) says so instead of zeros."""
    if not stats:
        return '<span class="muted">no cache on this node: its workers keep the images</span>'
    ratio = stats.get("hit_ratio")
    ratio_text = "–" if ratio is None else f"{ratio:.1%}"
    return (
        f"<span>cache entries: <b>{_e(stats.get('entries', 0))}</b></span>"
        f"<span>cache bytes: <b>{_e(_human(stats.get('bytes', 0)))}</b></span>"
        f"<span>hit ratio: <b>{ratio_text}</b></span>"
    )


def _human(count: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if count < 1024 or unit == "GiB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    return str(count)


def status_parts(status: dict[str, Any]) -> dict[str, str]:
    return {
        "members_html": members_html(status["members"]),
        "chart_svg": chart_svg(status["key_shares"]),
        "stats_html": stats_html(status["cache"]),
    }


def render_page(status: dict[str, Any]) -> str:
    parts = status_parts(status)
    node = status["node"]
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>imgproxy · {_e(node['name'])}</title><style>{_STYLE}</style></head>
<body>
<h1>imgproxy · {_e(node['name'])}</h1>
<div class="muted">role <b>{_e(node['role'])}</b> · address {_e(node['address'])} ·
updated <span id="updated">now</span></div>
<h2>Cache</h2><div class="stats" id="stats">{parts['stats_html']}</div>
<h2>Members</h2><div id="members">{parts['members_html']}</div>
<h2>Share of keys per worker</h2><div id="chart">{parts['chart_svg']}</div>
<script>{_SCRIPT}</script>
</body></html>
"""


class StatusPage(JsonResource):
    """``/``: the HTML page."""

    isLeaf = True

    def __init__(self, describe: Callable[[], dict[str, Any]]) -> None:
        super().__init__()
        self._describe = describe

    def render_GET(self, request: Request) -> bytes:
        request.setHeader(b"content-type", b"text/html; charset=utf-8")
        request.setHeader(b"cache-control", b"no-store")
        request.setHeader(
            b"content-security-policy",
            b"default-src 'none'; style-src 'unsafe-inline'; script-src 'unsafe-inline'; "
            b"connect-src 'self'; img-src 'self' data:; frame-ancestors 'none'",
        )
        return render_page(self._describe()).encode("utf-8")


def status_document(status: dict[str, Any]) -> dict[str, Any]:
    """``/status.json``: the status and the page's parts, for the in-place refresh."""
    return {**status, **status_parts(status)}
