"""Benchmarks: a registry of named benchmark modules run by ``python -m jobs.bench <name>``.

Every benchmark compares two (or more) paths *in the same run* and reports their ratio,
because absolute times on shared machines are noisy. A benchmark is a module that
defines:

* ``Config``: a dataclass (loaded strictly with :func:`d2vlm_ray.config.load_config`);
* ``run(cfg: Config) -> dict``: the measurements, JSON-serialisable, with at least a
  ``"summary"`` mapping and a ``"checks"`` mapping of named booleans (``False`` means the
  compared paths disagreed: a correctness failure, not a slow run);
* ``markdown(result: dict, cfg: Config) -> str``: a one-line Markdown summary of ``result``
  (``jobs.bench`` prefixes the date, benchmark name and machine load).

:mod:`d2vlm_ray.bench.common` adds the machine, package versions and timestamps around
``run``'s result. To add a benchmark, write ``d2vlm_ray/bench/<name>.py`` and point its
entry in :data:`REGISTRY` at it. Modules are imported only when their benchmark runs, so
a benchmark that needs Ray does not make the others import it.
"""

from __future__ import annotations

import importlib
from types import ModuleType

REGISTRY: dict[str, str | None] = {
    "decode": "d2vlm_ray.bench.decode",
    "pipeline": "d2vlm_ray.bench.pipeline",
    "train": "d2vlm_ray.bench.train",
    "serve": "d2vlm_ray.bench.serve",
    "gpu": "d2vlm_ray.bench.gpu",
}
"""Benchmark name -> module path; ``None`` for planned benchmarks not written yet."""


class UnknownBenchmarkError(LookupError):
    """The name is not in :data:`REGISTRY`."""


class BenchmarkNotImplementedError(LookupError):
    """The name is planned in :data:`REGISTRY` but has no module yet."""


_REQUIRED = ("Config", "run", "markdown")


def names() -> list[str]:
    """Every registered benchmark name, implemented or not."""
    return sorted(REGISTRY)


def implemented() -> list[str]:
    """The registered names that have a module."""
    return sorted(name for name, module in REGISTRY.items() if module is not None)


def load_benchmark(name: str) -> ModuleType:
    """Import the module of benchmark ``name`` and check that it has ``Config``, ``run``, ``markdown``.

    Raises:
        UnknownBenchmarkError: If ``name`` is not registered.
        BenchmarkNotImplementedError: If ``name`` is registered but not written yet.
        TypeError: If the module lacks part of the benchmark interface.
    """
    if name not in REGISTRY:
        raise UnknownBenchmarkError(f"unknown benchmark {name!r}; known: {', '.join(names())}")
    module_path = REGISTRY[name]
    if module_path is None:
        raise BenchmarkNotImplementedError(
            f"benchmark {name!r} is planned but not implemented yet; implemented: {', '.join(implemented())}"
        )
    module = importlib.import_module(module_path)
    missing = [attr for attr in _REQUIRED if not hasattr(module, attr)]
    if missing:
        raise TypeError(f"benchmark module {module_path} lacks {missing}")
    return module


__all__ = [
    "REGISTRY",
    "BenchmarkNotImplementedError",
    "UnknownBenchmarkError",
    "implemented",
    "load_benchmark",
    "names",
]
