"""Ray stays at the edges: the core packages import with ray, deepspeed and fastapi blocked."""

from __future__ import annotations

import subprocess
import sys
import textwrap

CORE_PACKAGES = ["d2vlm_ray.config", "d2vlm_ray.model", "d2vlm_ray.losses", "d2vlm_ray.data", "d2vlm_ray.cache", "d2vlm_ray.eval"]
BLOCKED = ["ray", "deepspeed", "fastapi", "starlette", "uvicorn"]


def test_core_packages_import_without_ray_deepspeed_fastapi() -> None:
    script = textwrap.dedent(
        f"""
        import importlib, pkgutil, sys

        BLOCKED = {BLOCKED!r}

        class Hide:
            # Wraps a finder so blocked packages look uninstalled (find_spec gives None).

            def __init__(self, inner):
                self.inner = inner

            def __getattr__(self, attr):
                return getattr(self.inner, attr)

            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in BLOCKED:
                    return None
                return self.inner.find_spec(name, path, target)

        sys.meta_path[:] = [Hide(f) if hasattr(f, "find_spec") else f for f in sys.meta_path]
        imported = []
        for pkg_name in {CORE_PACKAGES!r}:
            try:
                pkg = importlib.import_module(pkg_name)
            except ModuleNotFoundError as exc:
                if exc.name == pkg_name:
                    continue
                raise
            imported.append(pkg_name)
            for info in pkgutil.walk_packages(pkg.__path__, pkg_name + "."):
                importlib.import_module(info.name)
                imported.append(info.name)
        leaked = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
        assert not leaked, leaked
        print(len(imported))
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert int(result.stdout.strip().splitlines()[-1]) >= 20


def test_blocker_really_blocks() -> None:
    """The check above can fail: a Ray-side module cannot be imported under the same wrapper."""
    script = textwrap.dedent(
        """
        import sys
        class Hide:
            def __init__(self, inner):
                self.inner = inner
            def __getattr__(self, attr):
                return getattr(self.inner, attr)
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] == "ray":
                    return None
                return self.inner.find_spec(name, path, target)
        sys.meta_path[:] = [Hide(f) if hasattr(f, "find_spec") else f for f in sys.meta_path]
        import ray.data
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and "No module named 'ray'" in result.stderr


def _package_import_graph() -> dict[str, set[str]]:
    """``{subpackage: subpackages it imports}`` over every ``import`` in ``d2vlm_ray``, lazy ones too.

    Top-level modules (``types``, ``telemetry``, ``cli``) count as packages of their own.
    """
    import ast
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "d2vlm_ray"

    def package(module: str) -> str | None:
        parts = module.split(".")
        return parts[1] if parts[0] == "d2vlm_ray" and len(parts) > 1 else None

    graph: dict[str, set[str]] = {}
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root.parent).with_suffix("")
        source = package(".".join(rel.parts))
        if source is None or source == "__init__":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
            elif isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            else:
                continue
            for name in names[:1] if isinstance(node, ast.ImportFrom) else names:
                target = package(name)
                if target is not None and target != source:
                    graph.setdefault(source, set()).add(target)
    return graph


def _find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as a path ``[a, b, ..., a]``, or None if it is acyclic."""
    state: dict[str, str] = {}  # "open" while on the DFS stack, "done" after
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)) is not None:
                return cycle
        stack.pop()
        state[node] = "done"
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start)) is not None:
            return cycle
    return None


def test_package_import_graph_has_no_cycle() -> None:
    """model may use the losses' maths, never the reverse (losses used to import model.grounding)."""
    graph = _package_import_graph()
    assert "losses" in graph.get("model", set())  # the graph really is read: model.preference uses losses
    assert _find_cycle(graph) is None, _find_cycle(graph)


def test_cycle_finder_finds_a_cycle() -> None:
    assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert _find_cycle({"a": {"b"}, "b": {"c"}, "d": {"a"}}) is None


def test_importing_losses_loads_no_model_module() -> None:
    script = textwrap.dedent(
        """
        import importlib, pkgutil, sys
        import d2vlm_ray.losses as pkg
        for info in pkgutil.walk_packages(pkg.__path__, "d2vlm_ray.losses."):
            importlib.import_module(info.name)
        print(sorted(m for m in sys.modules if m.startswith("d2vlm_ray.model")))
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().splitlines()[-1] == "[]"
