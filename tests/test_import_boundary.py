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
