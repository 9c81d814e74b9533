"""proxy.json -> proxy.md (tables as ratios to thumbor and to the Pillow ceiling) and PNG plots."""

from __future__ import annotations

from pathlib import Path

ORDER = ["imgproxy", "imgproxy-cluster", "thumbor", "nginx"]
COLOURS = {"imgproxy": "#1f77b4", "imgproxy-cluster": "#17becf", "thumbor": "#d62728",
           "nginx": "#2ca02c", "Pillow ceiling": "#7f7f7f"}
MIB = 2**20


CPU_NOTE = (
    "*By CPU*: the user+system CPU time of the server's process tree during the run, divided by "
    "the requests served (wrk's own CPU is not counted). Throughput moves with whatever else runs "
    "on the machine; the cost per request barely does, so when the load average beside a row is "
    "well above the core count, compare the CPU columns."
)


def _targets(data: dict) -> list[str]:
    return [t for t in ORDER if t in data["targets"]]


def _ratio(value: float | None, base: float | None) -> str:
    if not value or not base:
        return "–"
    return f"{value / base:.2f}×"


def _pct(value: float | None, base: float | None) -> str:
    if not value or not base:
        return "–"
    return f"{100 * value / base:.0f}%"


def _load(run: dict) -> str:
    load = run.get("load_before")
    return f"{load[0]}" if load else "–"


def _errors(run: dict) -> str:
    e = run.get("errors", {})
    bad = {k: v for k, v in e.items() if v}
    return ", ".join(f"{k} {v}" for k, v in bad.items()) if bad else "0"


def _get(data: dict, target: str, *keys: str):
    node = data["targets"].get(target)
    for k in keys:
        if not isinstance(node, dict) or k not in node:
            return None
        node = node[k]
    return node


def tables(data: dict) -> list[str]:
    """The markdown body: machine, tables, targets, plots, commands."""
    m = data["machine"]
    names = _targets(data)
    thumbor = "thumbor" if "thumbor" in names else None
    lines = ["# Side-by-side: imgproxy, thumbor, nginx and the raw Pillow ceiling", ""]
    lines += [
        f"Measured {m['date']} on {m['nproc']} cores ({m['cpu']}), {m['mem_gib']} GiB, "
        f"Linux {m['kernel']}, Python {m['python']}; {m['nginx']}; {m['wrk']}; "
        f"thumbor {m['thumbor']}. Commit: `{m['git']}`.",
        "",
        f"Command: `{data.get('entry') or data['command']}` (load average before the run "
        f"{data['ceiling'][next(iter(data['ceiling']))]['load_before'] if data['ceiling'] else '?'}"
        f", after {data.get('load_after', '?')}). Every process is on loopback; the origin is "
        f"{data.get('origin', 'a local nginx')}. Each row's load average (1, 5, 15 min) before "
        "its run is in proxy.json.",
        "",
        "Targets: " + "; ".join(f"**{t}**: {data['targets'][t]['note']}" for t in names) + ".",
        "",
    ]
    if data.get("skipped"):
        for t, why in data["skipped"].items():
            first = why.strip().splitlines()[0] if why.strip() else "failed"
            lines.append(f"- **{t} skipped**: {first}")
        lines.append("")

    # cache hits
    lines += ["## Cache hits", "",
              "The same URL (progressive JPEG to w=320, q=80), warmed, then "
              "`wrk -t2 -c32 -d{}s --latency`.".format(data["settings"]["hit_seconds"]), "",
              "| target | req/s | × thumbor | p50 ms | p90 ms | p99 ms | errors | "
              "server CPU ms/req | × thumbor by CPU | load before |",
              "| --- | ---: | ---: | ---: | ---: | ---: | --- | ---: | ---: | ---: |"]
    base = _get(data, thumbor, "hits", "rps") if thumbor else None
    base_cpu = _get(data, thumbor, "hits", "cpu_ms_per_req") if thumbor else None
    for t in names:
        h = _get(data, t, "hits")
        if h:
            cpu = h.get("cpu_ms_per_req")
            lines.append(f"| {t} | {h['rps']:,.0f} | {_ratio(h['rps'], base)} | {h['p50_ms']} | "
                         f"{h['p90_ms']} | {h['p99_ms']} | {_errors(h)} | "
                         f"{cpu if cpu is not None else '–'} | {_ratio(base_cpu, cpu)} | "
                         f"{_load(h)} |")
    lines += ["", CPU_NOTE, ""]

    # fresh transforms
    for key, title, what in (
        ("fresh", "Fresh transforms, source already cached",
         "the source fetched once before; then every request a new box"),
        ("fresh_uncached", "Fresh transforms, source not cached",
         "every request a new box *and* a new source URL (`/v/RUN-i/file` on the origin)"),
    ):
        if not any(_get(data, t, key) for t in names):
            continue
        lines += [f"## {title}", "",
                  f"img/s at 4 connections (`wrk -t1 -c4 -d{data['settings']['fresh_seconds']}s`"
                  f", Lua counter), {what}: " + (
                      "`w=320&h=201+i`, which is the w=320 result under a new cache key."
                      if data["settings"].get("fresh_mode", "box") == "box" else
                      "`w=200+i`: the output grows a pixel a request (past 320 the JPEG draft "
                      "is 1/4, not 1/8), while the ceiling stays at w=320.")
                  + " Ratios to thumbor and to the raw Pillow ceiling "
                  f"(`bench/pillow_ceiling.py`, {data['settings']['threads']} threads, "
                  "JPEG drafted to "
                  f"{data['settings'].get('ceiling_draft_factor', 1.0):g}× the target, "
                  "no HTTP, no cache; the better of a pass before and one after the servers).", ""]
        header = "| image | Pillow ceiling |" + "".join(f" {t} |" for t in names)
        lines += [header, "| --- | ---: |" + " ---: |" * len(names)]
        for label, file in data["image_types"]:
            ceil = data["ceiling"].get(file, {}).get("img_per_s")
            base = _get(data, thumbor, key, file, "rps") if thumbor else None
            row = f"| {label} | {ceil if ceil is not None else '–'} |"
            for t in names:
                r = _get(data, t, key, file)
                if not r:
                    row += " – |"
                    continue
                parts = [f"**{r['rps']}**"]
                if t != thumbor and base:
                    parts.append(f"{_ratio(r['rps'], base)} thumbor")
                parts.append(f"{_pct(r['rps'], ceil)} ceiling")
                if _errors(r) != "0":
                    parts.append(f"errors: {_errors(r)}")
                row += " " + ", ".join(parts) + " |"
            lines.append(row)
        loads = [r["load_before"][0] for t in names for r in (_get(data, t, key) or {}).values()]
        ceil_loads = [p["load_before"][0] for c in data["ceiling"].values()
                      for p in c.get("passes", [c])]
        if loads:
            lines += ["", f"1-minute load average before these runs: {min(loads)} to {max(loads)}"
                      + (f" (the ceiling's passes: {min(ceil_loads)} to {max(ceil_loads)})"
                         if ceil_loads else "") + f"; the machine has {m['nproc']} cores."]
        lines += ["", "Server CPU ms per image (the ceiling's: CPU ms of the loop per image); "
                  "× thumbor and % of the ceiling by CPU:", "",
                  header, "| --- | ---: |" + " ---: |" * len(names)]
        for label, file in data["image_types"]:
            ceil = data["ceiling"].get(file, {}).get("cpu_ms_per_img")
            base = _get(data, thumbor, key, file, "cpu_ms_per_req") if thumbor else None
            row = f"| {label} | {ceil if ceil is not None else '–'} |"
            for t in names:
                cpu = _get(data, t, key, file, "cpu_ms_per_req")
                if not cpu:
                    row += " – |"
                    continue
                parts = [f"{cpu}"]
                if t != thumbor and base:
                    parts.append(f"{_ratio(base, cpu)} thumbor")
                parts.append(f"{_pct(ceil, cpu)} ceiling")
                row += " " + ", ".join(parts) + " |"
            lines.append(row)
        lines += ["", "Latency (p50 / p99 ms):", "",
                  "| image |" + "".join(f" {t} |" for t in names),
                  "| --- |" + " ---: |" * len(names)]
        for label, file in data["image_types"]:
            row = f"| {label} |"
            for t in names:
                r = _get(data, t, key, file)
                row += f" {r['p50_ms']} / {r['p99_ms']} |" if r else " – |"
            lines.append(row)
        lines.append("")

    # memory
    lines += ["## Peak memory under 32 concurrent misses of the largest photo", "",
              "A freshly started server gets 32 simultaneous requests for 32 different boxes "
              "of `largest.jpg` (not fetched before); the summed VmRSS of its process tree "
              "(children included) is sampled every 100 ms.", "",
              "| target | idle MiB | peak MiB | × thumbor | max VmHWM MiB | answered 200 | "
              "wall s | load before |", "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    base = _get(data, thumbor, "memory", "peak_rss") if thumbor else None
    for t in names:
        mm = _get(data, t, "memory")
        if mm:
            lines.append(f"| {t} | {mm['idle_rss'] / MIB:.0f} | {mm['peak_rss'] / MIB:.0f} | "
                         f"{_ratio(mm['peak_rss'], base)} | {mm['peak_hwm_max'] / MIB:.0f} | "
                         f"{mm['ok']}/{mm['concurrent']} | {mm['wall_s']} | {_load(mm)} |")
    lines.append("")

    # bytes
    lines += ["## Output bytes (w=320, q=80)", "",
              "| source |" + "".join(f" {t} |" for t in names) + " Pillow ceiling |",
              "| --- |" + " ---: |" * (len(names) + 1)]
    sources = []
    for t in names:
        for s in (_get(data, t, "bytes") or {}):
            if s not in sources:
                sources.append(s)
    for s in sources:
        base = _get(data, thumbor, "bytes", s, "bytes") if thumbor else None
        row = f"| {s.lstrip('/')} |"
        for t in names:
            b = _get(data, t, "bytes", s)
            if not b or b["status"] != 200:
                row += f" HTTP {b['status'] if b else '–'} |"
                continue
            extra = f" ({_ratio(b['bytes'], base)})" if base and t != thumbor else ""
            dims = f"{b.get('format', '?')} {b.get('width', '?')}×{b.get('height', '?')}"
            if b.get("frames", 1) > 1:
                dims += f", {b['frames']} frames"
            row += f" {b['bytes']:,}{extra} {dims} |"
        ceil = data["ceiling"].get(s.lstrip("/"), {}).get("output_bytes")
        row += f" {ceil:,} |" if ceil else " – |"
        lines.append(row)
    lines.append("")

    lines += ["## Targets of issue 7 in this run", ""] + check_targets(data) + [""]
    lines += ["## Plots", "",
              "![cache hits](hits.png) ![fresh transforms](fresh.png)", "",
              "![latency of hits](latency-hits.png) "
              "![latency of fresh transforms](latency-fresh.png)", "",
              "![memory](memory.png)", ""]
    lines += ["## Exact commands", "", "```"]
    for _label, file in data["image_types"]:
        c = data["ceiling"].get(file)
        if c:
            lines.append(c["command"])
    for t in names:
        for key in ("hits",):
            r = _get(data, t, key)
            if r:
                lines.append(r["command"])
        for key in ("fresh", "fresh_uncached"):
            for r in (_get(data, t, key) or {}).values():
                lines.append(r["command"])
    lines += ["```", ""]
    return lines


def check_targets(data: dict) -> list[str]:
    """Each target of issue 7, measured against this run: holds, fails, or not measured."""
    out = []

    def line(ok: bool | None, text: str) -> None:
        mark = {True: "holds", False: "**does not hold**", None: "not measured"}[ok]
        out.append(f"- {text}: {mark}")

    th_hits = _get(data, "thumbor", "hits", "rps")
    for t, factor in (("imgproxy", 5), ("imgproxy-cluster", 2)):
        r = _get(data, t, "hits")
        if r and th_hits:
            ok = r["rps"] >= factor * th_hits and (t != "imgproxy" or r["p99_ms"] <= 25)
            extra = f", p99 {r['p99_ms']} ms (≤ 25)" if t == "imgproxy" else ""
            th_cpu = _get(data, "thumbor", "hits", "cpu_ms_per_req")
            if th_cpu and r.get("cpu_ms_per_req"):
                extra += f"; by CPU {th_cpu / r['cpu_ms_per_req']:.2f}×"
            line(ok, f"{t} cache hits ≥ {factor}× thumbor: {r['rps'] / th_hits:.2f}×{extra}")
        else:
            line(None, f"{t} cache hits ≥ {factor}× thumbor")
    for file in [f for _l, f in data["image_types"]]:
        r = _get(data, "imgproxy", "fresh", file, "rps")
        th = _get(data, "thumbor", "fresh", file, "rps")
        ceil = data["ceiling"].get(file, {}).get("img_per_s")
        if r and th and ceil:
            ok = r >= 2 * th and r >= 0.85 * ceil
            cpu = _get(data, "imgproxy", "fresh", file, "cpu_ms_per_req")
            th_cpu = _get(data, "thumbor", "fresh", file, "cpu_ms_per_req")
            ceil_cpu = data["ceiling"].get(file, {}).get("cpu_ms_per_img")
            extra = ""
            if cpu and th_cpu and ceil_cpu:
                extra = (f"; by CPU {th_cpu / cpu:.2f}× thumbor, "
                         f"{100 * ceil_cpu / cpu:.0f}% of the ceiling")
            line(ok, f"fresh transforms of {file} (source cached) ≥ 2× thumbor and ≥ 85% of the "
                     f"ceiling: {r / th:.2f}× thumbor, {100 * r / ceil:.0f}% of the ceiling{extra}")
        else:
            line(None, f"fresh transforms of {file} ≥ 2× thumbor and ≥ 85% of the ceiling")
    mem = _get(data, "imgproxy", "memory", "peak_rss")
    th_mem = _get(data, "thumbor", "memory", "peak_rss")
    if mem and th_mem:
        line(mem <= 300 * MIB and mem <= th_mem,
             f"peak memory ≤ 300 MB and ≤ thumbor's: {mem / MIB:.0f} MiB vs thumbor "
             f"{th_mem / MIB:.0f} MiB")
    else:
        line(None, "peak memory ≤ 300 MB and ≤ thumbor's")
    ours = _get(data, "imgproxy", "bytes") or {}
    theirs = _get(data, "thumbor", "bytes") or {}
    common = [s for s in ours if s in theirs and ours[s]["status"] == 200
              and theirs[s]["status"] == 200]
    if common:
        larger = [s.lstrip("/") for s in common if ours[s]["bytes"] > theirs[s]["bytes"]]
        line(not larger, "output bytes no larger than thumbor's"
             + (f" (larger for {', '.join(larger)})" if larger else ""))
    else:
        line(None, "output bytes no larger than thumbor's")
    return out


def plots(data: dict, out: Path) -> None:
    """hits.png, fresh.png, latency-hits.png, latency-fresh.png, memory.png."""
    # imported here so that the tables can be built (and tested) without matplotlib
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    names = _targets(data)

    # throughput: hits
    fig, ax = plt.subplots(figsize=(7, 4))
    vals = [(_get(data, t, "hits", "rps") or 0) for t in names]
    ax.bar(names, vals, color=[COLOURS[t] for t in names])
    ax.set_yscale("log")
    ax.set_ylabel("requests/s (log)")
    ax.set_title("Cache hits, 32 connections")
    for i, v in enumerate(vals):
        ax.text(i, v, f"{v:,.0f}", ha="center", va="bottom")
    fig.tight_layout()
    fig.savefig(out / "hits.png", dpi=100)
    plt.close(fig)

    # throughput: fresh, grouped by image type
    files = [(lab, f) for lab, f in data["image_types"] if f in data["ceiling"]
             or any(_get(data, t, "fresh", f) for t in names)]
    series = ["Pillow ceiling", *names]
    fig, ax = plt.subplots(figsize=(9, 4.5))
    width = 0.8 / max(1, len(series))
    for k, s in enumerate(series):
        ys = []
        for _lab, f in files:
            if s == "Pillow ceiling":
                ys.append(data["ceiling"].get(f, {}).get("img_per_s") or 0)
            else:
                ys.append(_get(data, s, "fresh", f, "rps") or 0)
        xs = [i + (k - (len(series) - 1) / 2) * width for i in range(len(files))]
        ax.bar(xs, ys, width, label=s, color=COLOURS.get(s))
    ax.set_xticks(range(len(files)), [lab for lab, _f in files])
    ax.set_ylabel("images/s")
    ax.set_title("Fresh transforms to w=320, source cached, 4 connections")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "fresh.png", dpi=100)
    plt.close(fig)

    # latency CDFs
    for fname, keys, title in (
        ("latency-hits.png", ("hits",), "Latency of cache hits (32 connections)"),
        ("latency-fresh.png", ("fresh", "progressive.jpg"),
         "Latency of fresh transforms, progressive JPEG (4 connections)"),
    ):
        fig, ax = plt.subplots(figsize=(7, 4))
        for t in names:
            r = _get(data, t, *keys)
            if not r:
                continue
            pts = r["percentiles_ms"]
            ax.plot([max(ms, 0.01) for _p, ms in pts], [p for p, _ms in pts], marker=".",
                    label=t, color=COLOURS[t])
        ax.set_xscale("log")
        ax.set_xlabel("latency, ms (log)")
        ax.set_ylabel("percentile")
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / fname, dpi=100)
        plt.close(fig)

    # memory over time
    fig, ax = plt.subplots(figsize=(7, 4))
    for t in names:
        mm = _get(data, t, "memory")
        if not mm:
            continue
        ax.plot([s[0] for s in mm["samples"]], [s[1] / MIB for s in mm["samples"]], label=t,
                color=COLOURS[t])
    ax.axhline(300, color="black", linestyle=":", linewidth=1, label="300 MB target")
    ax.set_xlabel("seconds since the 32 requests went out")
    ax.set_ylabel("resident MiB (process tree)")
    ax.set_title("Memory under 32 concurrent misses of the largest photo")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "memory.png", dpi=100)
    plt.close(fig)


def write(data: dict, out: Path) -> None:
    """Write proxy.md and the plots into ``out``."""
    plots(data, out)
    (out / "proxy.md").write_text("\n".join(tables(data)))
