"""py-spy's collapsed stacks -> a short markdown summary of where the time went."""

from __future__ import annotations

from pathlib import Path


def summarise_stacks(raw: Path, top: int = 15) -> list[str]:
    """Markdown tables of the busiest functions in py-spy's collapsed stacks.

    Each line of the file is ``frame;frame;...;frame COUNT`` (outermost first); "self" counts
    the samples in which a function was the innermost frame, "total" those it was anywhere in.
    Idle threads are left out of both.
    """
    try:
        lines = raw.read_text().splitlines()
    except OSError:
        return ["(no profile: py-spy failed; it needs ptrace permission)"]
    self_n: dict[str, int] = {}
    total_n: dict[str, int] = {}
    samples = 0
    for line in lines:
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = stack.split(";")
        if frames and frames[0].startswith(("thread ", "process ")):
            frames = [f for f in frames if not f.startswith(("thread ", "process "))]
        if not frames or _idle(frames[-1]):
            continue
        n = int(count)
        samples += n
        self_n[frames[-1]] = self_n.get(frames[-1], 0) + n
        for f in set(frames):
            total_n[f] = total_n.get(f, 0) + n
    if not samples:
        return ["(no busy samples)"]
    out = [f"{samples} busy samples.", "",
           "| self % | total % | function |", "| ---: | ---: | --- |"]
    for f, n in sorted(self_n.items(), key=lambda kv: -kv[1])[:top]:
        out.append(f"| {100 * n / samples:.1f} | {100 * total_n[f] / samples:.1f} | `{f}` |")
    out += ["", "| total % | function (most inclusive) |", "| ---: | --- |"]
    for f, n in sorted(total_n.items(), key=lambda kv: -kv[1])[:top]:
        out.append(f"| {100 * n / samples:.1f} | `{f}` |")
    return out


def _idle(frame: str) -> bool:
    # threads parked in the pool's queue or the reactor's poll are not work
    return any(k in frame for k in ("wait (threading.py", "get (queue.py", "doPoll (", "poll (",
                                    "_worker (concurrent", "select ("))
