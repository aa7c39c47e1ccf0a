"""How much memory this process can still take: the machine's, or its container's.

A job runs in the node's own process, so a series too large for the memory left would
have the kernel kill the whole node (and, restarted, the same job would kill it again).
The runner checks first (:func:`memory_left`) and refuses with a reason instead.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["memory_left"]


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None  # "max": no limit


def _fields(path: Path, unit: int = 1) -> dict[str, int]:
    """``key value`` or ``key: value kB`` lines (meminfo, memory.stat) as a dict."""
    out: dict[str, int] = {}
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return out
    for line in lines:
        parts = line.replace(":", " ").split()
        if len(parts) >= 2 and parts[1].isdigit():
            out[parts[0]] = int(parts[1]) * unit
    return out


def memory_left(proc: Path = Path("/proc"),
                cgroup: Path = Path("/sys/fs/cgroup")) -> tuple[int, int] | None:
    """``(available, total)`` bytes for this process: the machine's MemAvailable and
    MemTotal, lowered to its cgroup's limit and what the cgroup has left of it (a
    container's memory limit; its reclaimable file cache counts as left); None where
    none of that can be read (not Linux)."""
    info = _fields(proc / "meminfo", unit=1024)  # kB
    if "MemAvailable" not in info or "MemTotal" not in info:
        return None
    available, total = info["MemAvailable"], info["MemTotal"]
    for limit_name, usage_name, cache_key, folder in (
            ("memory.max", "memory.current", "inactive_file", cgroup),  # v2
            ("memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file",
             cgroup / "memory")):  # v1
        limit = _read_int(folder / limit_name)
        if limit is None or limit >= total:  # no limit (v1 says so with a huge number)
            continue
        total = limit
        usage = _read_int(folder / usage_name)
        if usage is not None:
            cache = _fields(folder / "memory.stat").get(cache_key, 0)
            available = min(available, max(0, limit - usage + cache))
        break
    return available, total
