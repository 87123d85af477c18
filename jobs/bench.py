"""Run a benchmark: JSON report (machine, versions, raw timings, medians) and a Markdown line.

Each benchmark compares two or more paths in the same run and reports their ratio
(absolute times on shared machines are noisy). Benchmarks are registered in
:data:`d2vlm_ray.bench.REGISTRY`: ``decode``, ``pipeline``, ``train``, ``serve`` and ``gpu``
(skipped without CUDA). An unknown name, or a registered one without a module yet, exits
with status 2; a run whose target checks fail exits with status 1.

Local::

    python -m jobs.bench decode                              # report + line, BENCHMARKS.md untouched
    python -m jobs.bench decode --append                     # also append the line to BENCHMARKS.md
    python -m jobs.bench decode repeats=3 cases=[long_gop]   # config overrides (key.sub=value)
    python -m jobs.bench decode --config my_decode.yaml --out-dir runs/bench --benchmarks-md /tmp/B.md --append

On a running cluster (the benchmark runs in the job's driver process)::

    ray job submit --working-dir . -- python -m jobs.bench decode

(Under ``ray job submit`` the working directory is an uploaded copy: ``--append`` and
``--out-dir`` write into that copy unless given absolute paths on the driver's machine.)

Outputs: ``<out-dir>/<name>-<UTC time>/{config.yaml,<name>.json}``; the Markdown line and
the report's path are printed last. Exit status: 0 when the run finished and its checks
passed, 1 when a check failed (e.g. two paths returned different frames), 2 on an unknown
or not yet implemented benchmark or a bad config.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

from d2vlm_ray.bench import BenchmarkNotImplementedError, UnknownBenchmarkError, load_benchmark, names
from d2vlm_ray.bench.common import append_markdown, build_report, load_note, machine_info, write_report
from d2vlm_ray.config import ConfigError, dump_config, load_config, to_dict

log = logging.getLogger("jobs.bench")


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m jobs.bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("name", help=f"benchmark: one of {', '.join(names())}")
    parser.add_argument("--config", default=None, help="YAML file for the benchmark's Config")
    parser.add_argument("--out-dir", default="runs/bench", help="parent of the run directory (default runs/bench)")
    parser.add_argument("--append", action="store_true", help="append the Markdown line to --benchmarks-md")
    parser.add_argument("--benchmarks-md", default="BENCHMARKS.md", help="file --append writes (default BENCHMARKS.md)")
    parser.add_argument("overrides", nargs="*", help="key.sub=value config overrides")
    return parser.parse_intermixed_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Run one benchmark; see the module docstring for the options and exit codes."""
    args = _parse(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        module = load_benchmark(args.name)
        cfg = load_config(module.Config, args.config, args.overrides)
    except (UnknownBenchmarkError, BenchmarkNotImplementedError, ConfigError) as exc:
        print(f"jobs.bench: {exc}", file=sys.stderr)
        return 2

    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    run_dir = Path(args.out_dir) / f"{args.name}-{stamp}"
    dump_config(cfg, run_dir)
    machine = machine_info()
    log.info("running benchmark %s (load %s)", args.name, machine.get("load_avg_start"))
    result = module.run(cfg)
    fragment = module.markdown(result, cfg)
    report = build_report(args.name, to_dict(cfg), result, "", machine)
    line = f"- {report['created_utc'][:10]} **{args.name}** ({load_note(report['machine'])}): {fragment}"
    report["markdown"] = line
    path = write_report(report, run_dir)
    if args.append:
        append_markdown(args.benchmarks_md, line)
        log.info("appended to %s", args.benchmarks_md)
    print(line)
    print(f"report: {path}")
    failed = [name for name, ok in result.get("checks", {}).items() if not ok]
    if failed:
        print(f"jobs.bench: checks failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
