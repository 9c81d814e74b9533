"""Write BENCHMARKS.md from the reports under bench/results/ (``make bench`` ends with this).

Each report carries its own command, machine, date and load; this only puts them in one
file, in a fixed order, with the targets of the issues in front.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"

SECTIONS = [
    ("proxy.md", "bench/run-all (make bench)"),
    ("cluster.md", ".venv/bin/python bench/cluster.py"),
    ("placement.md", ".venv/bin/python bench/placement.py"),
    ("membership.md", "bench/.work/venv/bin/python bench/membership.py"),
    ("soak.md", "bench/.work/venv/bin/python bench/soak.py"),
]

INTRO = """# Benchmarks

Every figure here was printed by a script under `bench/`, run on this project's machine
(2 cores, 24 GB, shared with other work: each report states the load average beside its
numbers). Peers run in the same script on the same machine: thumbor 7.8 from PyPI, nginx
with `image_filter` and `proxy_cache` from Debian, a raw Pillow loop, and HashiCorp serf.
`make bench` reinstalls the peers and the corpus and rewrites the proxy report and this
file; the other reports are rewritten by their own commands, named in each section.
Plots are the PNG files beside the reports in `bench/results/`.
"""


def demote(markdown: str) -> str:
    """Each report's headings one level down, so they nest under this file's."""
    lines = []
    for line in markdown.splitlines():
        lines.append("#" + line if line.startswith("#") else line)
    return "\n".join(lines).strip() + "\n"


def assemble() -> str:
    parts = [INTRO]
    for name, command in SECTIONS:
        path = RESULTS / name
        if not path.exists():
            parts.append(f"## {name}\n\nNot run yet: `{command}` writes it.\n")
            continue
        parts.append(beside_the_reports(demote(path.read_text())))
    return "\n".join(parts)


def beside_the_reports(markdown: str) -> str:
    """Plot links are relative to the report; BENCHMARKS.md sits two folders up."""
    return re.sub(r"\]\(([\w.-]+\.png)\)", r"](bench/results/\1)", markdown)


def main() -> int:
    (ROOT / "BENCHMARKS.md").write_text(assemble())
    print(f"wrote {ROOT / 'BENCHMARKS.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
