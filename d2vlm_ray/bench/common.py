"""What every benchmark shares: machine and version facts, repeated timing, the report, Markdown.

A report (``SCHEMA_VERSION`` 1) is one JSON object::

    {
      "schema_version": 1,
      "benchmark": "decode",
      "created_utc": "2026-11-23T18:40:00Z",
      "machine": {... machine_info() at the start, with "load_avg_end" added at the end ...},
      "versions": {... package_versions() ...},
      "config": {... the resolved benchmark config ...},
      "result": {... what the benchmark's run() returned: "summary", "checks", raw timings ...},
      "markdown": "one Markdown line"
    }

Timings are taken by :func:`time_paths`, which runs the compared paths in interleaved
rounds (the order rotates every round) so that a burst of load from other jobs on a
shared machine hits every path alike; it records wall time and this process's CPU time
(all threads) of every run, and medians.
"""

from __future__ import annotations

import datetime as dt
import importlib.metadata
import os
import platform
import statistics
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SCHEMA_VERSION = 1
"""Version of the report layout described in the module docstring."""

REPORT_KEYS = ("schema_version", "benchmark", "created_utc", "machine", "versions", "config", "result", "markdown")
"""Top-level keys of every report."""

DEFAULT_PACKAGES = ("torch", "numpy", "av", "eva-decord", "decord", "ray", "transformers", "deepspeed", "pyarrow")
"""Packages whose versions go into every report (those not installed are left out)."""

BENCHMARKS_MD_HEADER = """# Benchmarks

Figures appended by `python -m jobs.bench <name> --append`, one line per run, newest last.
Each line compares paths measured in the same run; the **ratio** is the figure to read,
absolute times depend on the machine and on its load (given as the 1-minute load
average at the start and at the end of the run). The run's JSON report (raw timings of
every repeat, machine, versions, config) is written under `runs/bench/`.

"""


def machine_info() -> dict[str, Any]:
    """CPU, memory, OS and current load of this machine (no identifying host name)."""
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "machine": platform.machine(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "cpu_model": _cpu_model(),
        "memory_gib": _memory_gib(),
        "load_avg_start": _load_avg(),
    }
    return info


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _memory_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 2**20, 1)
    except (OSError, ValueError):
        pass
    return None


def _load_avg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def package_versions(packages: tuple[str, ...] = DEFAULT_PACKAGES) -> dict[str, str]:
    """Installed versions of ``packages`` (distribution names); missing ones are omitted."""
    versions: dict[str, str] = {}
    for name in packages:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return versions


@dataclass
class PathTiming:
    """Every timed run of one path.

    Attributes:
        wall_s: Wall-clock seconds of each repeat (warm-up runs excluded).
        cpu_s: CPU seconds of this process (all its threads) during each repeat.
        output: What the path returned on its last run (not serialised).
    """

    wall_s: list[float] = field(default_factory=list)
    cpu_s: list[float] = field(default_factory=list)
    output: Any = None

    @property
    def median_wall_s(self) -> float:
        """Median wall seconds over the repeats."""
        return float(statistics.median(self.wall_s))

    @property
    def median_cpu_s(self) -> float:
        """Median CPU seconds over the repeats."""
        return float(statistics.median(self.cpu_s))

    def to_dict(self) -> dict[str, Any]:
        """Raw and median timings, rounded to microseconds."""
        return {
            "wall_s": [round(x, 6) for x in self.wall_s],
            "cpu_s": [round(x, 6) for x in self.cpu_s],
            "median_wall_s": round(self.median_wall_s, 6),
            "median_cpu_s": round(self.median_cpu_s, 6),
        }


def time_paths(
    paths: Mapping[str, Callable[[], Any]], *, repeats: int, warmup: int = 0
) -> dict[str, PathTiming]:
    """Run each path ``warmup + repeats`` times in interleaved, rotating rounds.

    Args:
        paths: Name -> zero-argument callable doing the work once.
        repeats: Timed runs per path (at least 1).
        warmup: Untimed runs per path before the timed ones (imports, page cache).

    Returns:
        Name -> :class:`PathTiming` with ``output`` from the last run.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be at least 1, got {repeats}")
    if warmup < 0:
        raise ValueError(f"warmup must be non-negative, got {warmup}")
    names = list(paths)
    timings = {name: PathTiming() for name in names}
    for round_idx in range(warmup + repeats):
        shift = round_idx % len(names)
        for name in names[shift:] + names[:shift]:
            wall0, cpu0 = time.perf_counter(), time.process_time()
            output = paths[name]()
            wall_s, cpu_s = time.perf_counter() - wall0, time.process_time() - cpu0
            timings[name].output = output
            if round_idx >= warmup:
                timings[name].wall_s.append(wall_s)
                timings[name].cpu_s.append(cpu_s)
    return timings


def utc_now() -> str:
    """The current UTC time as ``YYYY-MM-DDTHH:MM:SSZ``."""
    return dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def build_report(
    benchmark: str, config: Mapping[str, Any], result: Mapping[str, Any], markdown: str, machine: Mapping[str, Any]
) -> dict[str, Any]:
    """Assemble the report (see the module docstring); the end load is read now."""
    machine = dict(machine)
    machine["load_avg_end"] = _load_avg()
    return {
        "schema_version": SCHEMA_VERSION,
        "benchmark": benchmark,
        "created_utc": utc_now(),
        "machine": machine,
        "versions": package_versions(),
        "config": dict(config),
        "result": dict(result),
        "markdown": markdown,
    }


def load_note(machine: Mapping[str, Any]) -> str:
    """``"2 CPUs, load 3.1→4.2"``: the machine size and 1-minute load at start and end."""
    start = machine.get("load_avg_start")
    end = machine.get("load_avg_end")
    load = ""
    if start:
        load = f", load {start[0]:.1f}" + (f"→{end[0]:.1f}" if end else "")
    return f"{machine.get('cpus_usable')} CPUs{load}"


def write_report(report: Mapping[str, Any], out_dir: str | Path) -> Path:
    """Write ``report`` as ``<out_dir>/<benchmark>.json`` and return the path."""
    import json

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{report['benchmark']}.json"
    path.write_text(json.dumps(report, indent=2) + "\n")
    return path


def append_markdown(path: str | Path, line: str) -> Path:
    """Append ``line`` to the Markdown file at ``path``, creating it with a header first.

    Raises:
        ValueError: If ``line`` spans several lines (one run, one line).
    """
    if "\n" in line.strip():
        raise ValueError("a benchmark's Markdown summary must be a single line")
    path = Path(path)
    if not path.exists() or path.stat().st_size == 0:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(BENCHMARKS_MD_HEADER)
    text = path.read_text()
    with path.open("a") as handle:
        if text and not text.endswith("\n"):
            handle.write("\n")
        handle.write(line.strip() + "\n")
    return path
