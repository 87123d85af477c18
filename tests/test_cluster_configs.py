"""The deployment files in ``cluster/`` are valid and agree with the project's pins.

* The cluster-launcher YAMLs (``cluster/aws.yaml``, ``cluster/gcp.yaml``) pass Ray's own
  cluster-config schema (``ray/autoscaler/ray-schema.json``, before and after Ray merges its
  provider defaults, the way ``ray up`` does), run the pinned Ray version in their images and
  install the project with ``constraints.txt``.
* The KubeRay manifests (``cluster/kuberay/*.yaml``) are structurally valid ``ray.io/v1``
  objects on the pinned Ray version; the RayService's Serve config passes Ray Serve's schema
  and the project's ``ServeArgs``.
* Every entrypoint these files or ``cluster/README.md`` name (``python -m jobs.<name> --config
  ... key=value``, a Serve ``import_path``) imports, and its config file plus overrides load
  with the job's own config class.

Each check returns a list of problems, so the negative tests can show that a mutated file
(wrong Ray version, unknown key, missing module, unknown override) is rejected.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib
import importlib.util
import re
import shlex
import sys
import tomllib
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO_ROOT = Path(__file__).resolve().parents[1]
CLUSTER_DIR = REPO_ROOT / "cluster"
LAUNCHER_FILES = ("aws.yaml", "gcp.yaml")
KUBERAY_FILES = {
    "kuberay/raycluster.yaml": "RayCluster",
    "kuberay/rayjob-sft-fpo-eval.yaml": "RayJob",
    "kuberay/rayservice.yaml": "RayService",
}
DOCKERFILE = CLUSTER_DIR / "image" / "Dockerfile"
README = CLUSTER_DIR / "README.md"
# Deployments of the Serve app; a RayService must configure exactly these.
SERVE_DEPLOYMENTS = {"FrameEncoder", "Grounder", "Answerer", "Ingress"}

# Fields of the KubeRay ray.io/v1 CRDs (KubeRay v1.5/1.6 API reference). A key outside these
# sets is a typo or a field of another KubeRay version, which the operator would drop silently.
RAYCLUSTER_SPEC_KEYS = {
    "authOptions", "autoscalerOptions", "enableInTreeAutoscaling", "gcsFaultToleranceOptions",
    "headGroupSpec", "headServiceAnnotations", "managedBy", "rayVersion", "suspend",
    "upgradeStrategy", "workerGroupSpecs",
}
RAYJOB_SPEC_KEYS = {
    "activeDeadlineSeconds", "backoffLimit", "clusterSelector", "deletionStrategy", "entrypoint",
    "entrypointNumCpus", "entrypointNumGpus", "entrypointResources", "jobId", "managedBy", "metadata",
    "rayClusterSpec", "runtimeEnvYAML", "shutdownAfterJobFinishes", "submissionMode",
    "submitterConfig", "submitterPodTemplate", "suspend", "ttlSecondsAfterFinished",
}
RAYSERVICE_SPEC_KEYS = {
    "deploymentUnhealthySecondThreshold", "excludeHeadPodFromServeSvc", "rayClusterConfig",
    "rayClusterDeletionDelaySeconds", "serveConfigV2", "serveService", "serviceUnhealthySecondThreshold",
    "upgradeStrategy",
}
AUTOSCALER_OPTION_KEYS = {
    "env", "envFrom", "idleTimeoutSeconds", "image", "imagePullPolicy", "resources", "securityContext",
    "upscalingMode", "version", "volumeMounts",
}
HEAD_GROUP_KEYS = {"enableIngress", "headService", "rayStartParams", "serviceType", "template"}
WORKER_GROUP_KEYS = {
    "groupName", "idleTimeoutSeconds", "maxReplicas", "minReplicas", "numOfHosts", "rayStartParams",
    "replicas", "scaleStrategy", "suspend", "template",
}
RAY_IMAGE = re.compile(r"^rayproject/ray:(?P<ray>\d+\.\d+\.\d+)-py(?P<py>\d{2,3})-(?P<variant>cpu|gpu|cu\d+)$")
# The project image of cluster/image/Dockerfile: <registry>/d2vlm-ray:<project>-ray<ver>-py<xy>-<variant>.
PROJECT_IMAGE = re.compile(
    r"^(?:[\w.\-]+/)*d2vlm-ray:[\w.]+-ray(?P<ray>\d+\.\d+\.\d+)-py(?P<py>\d{2,3})-(?P<variant>cpu|gpu)$"
)


# --- the project's pins -------------------------------------------------------------------


@cache
def pins() -> dict[str, Any]:
    """Ray version, Python range and exact versions from pyproject.toml and constraints.txt."""
    pyproject = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())
    project = pyproject["project"]
    ray_extra = [
        req for reqs in project["optional-dependencies"].values() for req in reqs if re.match(r"ray\[", req)
    ]
    assert len(ray_extra) == 1, f"pyproject.toml: expected one ray[...] requirement, found {ray_extra}"
    match = re.fullmatch(r"ray\[[\w,\s]+\]==(\d+\.\d+\.\d+)", ray_extra[0].strip())
    assert match, f"pyproject.toml: ray must be pinned exactly (ray[...]==X.Y.Z), got {ray_extra[0]!r}"
    constraints: dict[str, str] = {}
    for line in (REPO_ROOT / "constraints.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if "==" in line:
            name, version = line.split("==", 1)
            constraints[_canonical(name)] = version.strip()
    return {
        "ray": match.group(1),
        "requires_python": project["requires-python"],
        "constraints": constraints,
    }


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower().strip()


def _base_version(version: str) -> str:
    """``2.13.0+cpu`` -> ``2.13.0``: a CUDA and a CPU build of one release satisfy the same pin."""
    return version.split("+", 1)[0]


def image_problems(image: str, where: str, *, gpu: bool | None = None) -> list[str]:
    """Problems of one container image reference: Ray version, Python tag, CPU/GPU variant."""
    from packaging.specifiers import SpecifierSet

    match = RAY_IMAGE.match(image) or PROJECT_IMAGE.match(image)
    if match is None:
        return [f"{where}: image {image!r} is neither rayproject/ray:<ver>-py<xy>-<variant> nor a d2vlm-ray image"]
    problems = []
    if match["ray"] != pins()["ray"]:
        problems.append(f"{where}: image {image!r} runs Ray {match['ray']}, the project pins ray=={pins()['ray']}")
    python = f"{match['py'][0]}.{match['py'][1:]}"
    if not SpecifierSet(pins()["requires_python"]).contains(python):
        allowed = pins()["requires_python"]
        problems.append(f"{where}: image {image!r} has Python {python}, outside requires-python {allowed}")
    is_gpu_image = match["variant"] != "cpu"
    if gpu is not None and gpu != is_gpu_image:
        problems.append(f"{where}: a {'GPU' if gpu else 'CPU'} node uses the {match['variant']} image {image!r}")
    return problems


# --- shell commands and entrypoints -------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Entrypoint:
    """One ``python -m module [args]`` command, or a ``module:attr`` Serve import path."""

    module: str
    args: tuple[str, ...] = ()
    attr: str = ""
    source: str = ""

    @property
    def label(self) -> str:
        return f"{self.module}:{self.attr}" if self.attr else self.module


def _segments(command: str) -> Iterator[list[str]]:
    """Simple commands of a shell line: split at ``&&``, ``||``, ``;`` and ``|``, descend into ``bash -c``."""
    lexer = shlex.shlex(command, posix=True, punctuation_chars=";&|")
    lexer.whitespace_split = True
    current: list[str] = []
    for token in [*lexer, ";"]:
        if token and set(token) <= set(";&|"):
            if len(current) >= 3 and current[0] in ("bash", "sh") and current[1] in ("-c", "-ce", "-ec"):
                yield from _segments(current[2])
            elif current:
                yield current
            current = []
        else:
            current.append(token)


def entrypoints_in(command: str, source: str) -> list[Entrypoint]:
    """Every ``python -m module args...`` in a shell command."""
    found = []
    for tokens in _segments(command):
        for i, token in enumerate(tokens[:-2]):
            if re.fullmatch(r"python(3(\.\d+)?)?", token) and tokens[i + 1] == "-m":
                found.append(Entrypoint(tokens[i + 2], tuple(tokens[i + 3 :]), source=source))
                break
    return found


class _ConfigLoaded(BaseException):
    """Raised once a job's config has loaded, to stop ``main`` before it starts any work.

    A BaseException, so that a job's ``except ValueError`` / ``except Exception`` cannot swallow it.
    """

    def __init__(self, cls: type) -> None:
        super().__init__(cls.__name__)
        self.cls = cls


def check_job_config(module: Any, argv: list[str]) -> str | None:
    """Run ``module.main(argv)`` up to the point where its config has loaded; None if it loaded.

    Every job loads its config through ``d2vlm_ray.config.load_config``, which ends in the
    module-level ``from_dict``; wrapping that function lets the job's own argument parsing and
    config class do the checking (whatever helper the job delegates to), and the sentinel stops
    the job before it starts Ray. Returns the job's error output when the config is rejected.
    """
    import contextlib
    import io
    from unittest import mock

    import d2vlm_ray.config.load as config_load

    original = config_load.from_dict
    depth = 0

    def from_dict(cls: type, data: Any, prefix: str = "") -> Any:
        nonlocal depth
        depth += 1
        try:
            result = original(cls, data, prefix)
        finally:
            depth -= 1
        if depth == 0:  # the root config, after every nested section validated
            raise _ConfigLoaded(cls)
        return result

    out = io.StringIO()
    try:
        with mock.patch.object(config_load, "from_dict", from_dict):
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
                code = module.main(argv)
    except _ConfigLoaded:
        return None
    except SystemExit as exc:  # argparse rejected the command line
        code = exc.code
    return f"exit code {code}: {out.getvalue().strip()[-600:]}"


def entrypoint_problems(entry: Entrypoint) -> list[str]:
    """Import the module (and attribute); for a job, load its ``--config`` with the overrides."""
    where = f"{entry.label} (named by {entry.source})"
    try:
        spec = importlib.util.find_spec(entry.module)
    except ModuleNotFoundError:
        spec = None
    if spec is None:
        return [f"{where}: module {entry.module!r} does not exist"]
    try:
        module = importlib.import_module(entry.module)
    except Exception as exc:  # any import failure is the finding, whatever its type
        return [f"{where}: import failed: {type(exc).__name__}: {exc}"]
    if entry.attr:
        if not callable(getattr(module, entry.attr, None)):
            return [f"{where}: {entry.module} has no callable {entry.attr!r}"]
        return []
    if entry.module.startswith("jobs.") and not callable(getattr(module, "main", None)):
        return [f"{where}: job module has no main()"]
    args = list(entry.args)
    if "--config" not in args:
        return []
    idx = args.index("--config")
    if idx + 1 >= len(args):
        return [f"{where}: --config without a path"]
    config_path = REPO_ROOT / args[idx + 1]
    if not config_path.is_file():
        return [f"{where}: config file {args[idx + 1]!r} does not exist"]
    if not callable(getattr(module, "main", None)):
        return [f"{where}: takes --config but has no main() to check it with"]
    # The job resolves the path against the working directory; the test may run elsewhere.
    error = check_job_config(module, [*args[: idx + 1], str(config_path), *args[idx + 2 :]])
    if error is not None:
        return [f"{where}: {args[idx + 1]} with {args[idx + 2 :]} is rejected by the job: {error}"]
    return []


# --- cluster-launcher configs ---------------------------------------------------------------


@cache
def ray_schema() -> dict[str, Any]:
    import json

    import ray.autoscaler

    return json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())


def _pip_pins(command: str) -> dict[str, str]:
    """``name==version`` requirements named on a pip command line."""
    found = {}
    for match in re.finditer(r"(?<![\w.\-])([A-Za-z][\w.\-]*)(?:\[[\w,]+\])?==([\w.+]+)", command):
        found[_canonical(match.group(1))] = match.group(2)
    return found


def install_problems(commands: list[str], where: str, *, gpu: bool) -> list[str]:
    """The setup commands install the project with the constraints file and the pinned versions."""
    text = "\n".join(commands)
    problems = []
    project_install = [c for c in commands if re.search(r"pip install .*-e '?\.\[", c)]
    if not project_install:
        return [f"{where}: no `pip install ... -e '.[...]'` of the project in {commands}"]
    for command in project_install:
        if not re.search(r"-c \S*constraints\S*\.txt", command):
            problems.append(f"{where}: project install without the constraints file: {command!r}")
        extras = re.search(r"-e '?\.\[([\w,\-]+)\]", command).group(1).split(",")
        if not {"all", "ray"} & set(extras):
            problems.append(f"{where}: project install lacks the ray extra (.[all] or .[ray]): {command!r}")
    constraints = pins()["constraints"]
    for name, version in _pip_pins(text).items():
        if name in ("s3fs", "gcsfs"):
            if version != constraints.get("fsspec"):
                problems.append(f"{where}: {name}=={version} must equal fsspec=={constraints.get('fsspec')}")
        elif name in constraints and _base_version(version) != _base_version(constraints[name]):
            problems.append(f"{where}: {name}=={version} but constraints.txt pins {name}=={constraints[name]}")
    if gpu:
        if not re.search(r"download\.pytorch\.org/whl/cu\d+", text):
            problems.append(f"{where}: GPU node does not install a CUDA build of torch first")
        if not re.search(r"grep -v '\^torch==' \S*constraints\.txt", text):
            problems.append(f"{where}: GPU node must drop constraints.txt's CPU torch pin before installing")
    return problems


def launcher_problems(config: dict[str, Any], where: str) -> list[str]:
    """Ray's schema and validator, images, node types, install and start commands of one config."""
    import jsonschema
    from ray.autoscaler._private.util import prepare_config, validate_config

    # The file as written: unknown top-level keys, wrong types.
    problems = [
        f"{where}: ray-schema.json: {'/'.join(map(str, e.absolute_path)) or '<top>'}: {e.message}"
        for e in jsonschema.Draft7Validator(ray_schema()).iter_errors(config)
    ]
    if problems:
        return problems
    # What `ray up` validates: the config merged with the provider's defaults.
    try:
        full = prepare_config(copy.deepcopy(config))
        validate_config(full)
    except Exception as exc:  # Ray raises ValueError, RuntimeError or jsonschema errors here
        return [f"{where}: Ray's validate_config: {type(exc).__name__}: {exc}"]

    docker = config.get("docker") or {}
    for key in ("image", "head_image", "worker_image"):
        if key in docker:
            problems += image_problems(docker[key], f"{where}: docker.{key}", gpu=False)
    if "image" not in docker:
        problems.append(f"{where}: docker.image is not set (the Ray image must be pinned)")
    if "idle_timeout_minutes" not in config:
        problems.append(f"{where}: idle_timeout_minutes is not set")

    node_types = config["available_node_types"]
    head = config["head_node_type"]
    kinds = {"cpu": [], "gpu": []}
    for name, node in node_types.items():
        node_where = f"{where}: available_node_types.{name}"
        worker_image = (node.get("docker") or {}).get("worker_image")
        gpu = bool(worker_image and not worker_image.endswith("-cpu"))
        if worker_image:
            problems += image_problems(worker_image, f"{node_where}.docker.worker_image", gpu=gpu)
        if name == head:
            continue
        kinds["gpu" if gpu else "cpu"].append(name)
        if "min_workers" not in node or "max_workers" not in node:
            problems.append(f"{node_where}: min_workers and max_workers must be set")
        elif not 0 <= node["min_workers"] <= node["max_workers"]:
            problems.append(f"{node_where}: min_workers {node['min_workers']} > max_workers {node['max_workers']}")
        commands = node.get("worker_setup_commands", full["worker_setup_commands"])
        problems += install_problems(commands, node_where, gpu=gpu)
    problems += install_problems(full["head_setup_commands"], f"{where}: head setup", gpu=False)
    for kind, names in kinds.items():
        if not names:
            problems.append(f"{where}: no {kind.upper()} worker type")

    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        start = " ".join(full[key])
        if "ray start" not in start:
            problems.append(f"{where}: {key} does not run `ray start`")
        if "RAY_AUTH_MODE=token" not in start:
            problems.append(f"{where}: {key} must set RAY_AUTH_MODE=token (the same on every node)")
    return problems


# --- KubeRay manifests ----------------------------------------------------------------------


def _containers(template: Any, where: str) -> tuple[list[dict[str, Any]], list[str]]:
    try:
        containers = template["spec"]["containers"]
    except (KeyError, TypeError):
        return [], [f"{where}: template.spec.containers is missing"]
    if not containers or not all(isinstance(c, dict) and c.get("image") and c.get("name") for c in containers):
        return [], [f"{where}: every container needs a name and an image"]
    return containers, []


def _unknown(obj: dict[str, Any], allowed: set[str], where: str) -> list[str]:
    extra = sorted(set(obj) - allowed)
    return [f"{where}: unknown field(s) {extra}"] if extra else []


def ray_cluster_spec_problems(spec: Any, where: str) -> list[str]:
    """A RayClusterSpec (standalone, or inside a RayJob / RayService)."""
    if not isinstance(spec, dict):
        return [f"{where}: must be a mapping"]
    problems = _unknown(spec, RAYCLUSTER_SPEC_KEYS, where)
    if str(spec.get("rayVersion")) != pins()["ray"]:
        problems.append(f"{where}.rayVersion: {spec.get('rayVersion')!r}, the project pins ray=={pins()['ray']}")
    if spec.get("enableInTreeAutoscaling") is not True:
        problems.append(f"{where}.enableInTreeAutoscaling: must be true (autoscaling cluster)")
    problems += _unknown(spec.get("autoscalerOptions") or {}, AUTOSCALER_OPTION_KEYS, f"{where}.autoscalerOptions")
    if (spec.get("authOptions") or {}).get("mode") != "token":
        problems.append(f"{where}.authOptions.mode: must be token (Ray 2.60 token auth)")
    head = spec.get("headGroupSpec")
    if not isinstance(head, dict):
        return problems + [f"{where}.headGroupSpec: missing"]
    problems += _unknown(head, HEAD_GROUP_KEYS, f"{where}.headGroupSpec")
    if not isinstance(head.get("rayStartParams", {}), dict):
        problems.append(f"{where}.headGroupSpec.rayStartParams: must be a mapping of strings")
    containers, found = _containers(head.get("template"), f"{where}.headGroupSpec")
    problems += found
    for c in containers:
        problems += image_problems(c["image"], f"{where}.headGroupSpec {c['name']}", gpu=False)
    groups = spec.get("workerGroupSpecs") or []
    if not groups:
        problems.append(f"{where}.workerGroupSpecs: no worker groups")
    gpu_groups = 0
    for i, group in enumerate(groups):
        group_where = f"{where}.workerGroupSpecs[{i}]"
        problems += _unknown(group, WORKER_GROUP_KEYS, group_where)
        if not group.get("groupName"):
            problems.append(f"{group_where}: groupName is missing")
        lo, n, hi = group.get("minReplicas"), group.get("replicas", group.get("minReplicas")), group.get("maxReplicas")
        if not all(isinstance(v, int) for v in (lo, n, hi)) or not 0 <= lo <= n <= hi:
            problems.append(f"{group_where}: need integers minReplicas <= replicas <= maxReplicas, got {lo}, {n}, {hi}")
        containers, found = _containers(group.get("template"), group_where)
        problems += found
        for c in containers:
            limits = {**(c.get("resources") or {}).get("requests", {}), **(c.get("resources") or {}).get("limits", {})}
            gpu = "nvidia.com/gpu" in limits
            gpu_groups += gpu
            problems += image_problems(c["image"], f"{group_where} {c['name']}", gpu=gpu)
    if groups and not gpu_groups:
        problems.append(f"{where}.workerGroupSpecs: no GPU worker group")
    return problems


def _defined_deployments(module_name: str) -> set[str] | None:
    """Names of the Serve deployments defined in ``module_name``'s package (None: not importable).

    An import failure is reported by the entrypoint test; here it only skips the name check.
    """
    from ray.serve import Deployment

    try:
        importlib.import_module(module_name)
    except Exception:  # any import failure: see the docstring
        return None
    package = module_name.rpartition(".")[0] or module_name
    modules = [m for n, m in list(sys.modules.items()) if n == package or n.startswith(package + ".")]
    return {v.name for m in modules for v in vars(m).values() if isinstance(v, Deployment)}


def serve_config_problems(text: Any, where: str) -> tuple[list[str], list[Entrypoint]]:
    """A serveConfigV2 string: Ray Serve's schema, autoscaling configs, ServeArgs, deployment names."""
    from pydantic import ValidationError
    from ray.serve.config import AutoscalingConfig
    from ray.serve.schema import ServeDeploySchema

    if not isinstance(text, str):
        return [f"{where}: serveConfigV2 must be a YAML string"], []
    try:
        config = yaml.safe_load(text)
        schema = ServeDeploySchema.model_validate(config)
    except (yaml.YAMLError, ValueError) as exc:  # pydantic's ValidationError is a ValueError
        return [f"{where}: serveConfigV2 is not a valid Serve config: {exc}"], []
    problems: list[str] = []
    entries = []
    for app in schema.applications:
        app_where = f"{where}: application {app.name!r}"
        module, _, attr = app.import_path.partition(":")
        entries.append(Entrypoint(module, attr=attr, source=where))
        names = {d.name for d in app.deployments}
        if names != SERVE_DEPLOYMENTS:
            problems.append(f"{app_where}: deployments {sorted(names)}, expected {sorted(SERVE_DEPLOYMENTS)}")
        defined = _defined_deployments(module)
        if defined is not None and not names <= defined:
            problems.append(f"{app_where}: {sorted(names - defined)} are not deployments of {module}")
        for d in app.deployments:
            autoscaling = d.autoscaling_config if isinstance(d.autoscaling_config, dict) else None
            if not autoscaling:
                problems.append(f"{app_where}: deployment {d.name} has no autoscaling_config")
                continue
            try:
                AutoscalingConfig(**autoscaling)
            except (ValidationError, ValueError, TypeError) as exc:
                problems.append(f"{app_where}: deployment {d.name} autoscaling_config: {exc}")
        if app.import_path == "d2vlm_ray.serving.app:build_app":
            try:
                from d2vlm_ray.serving.args import ServeArgs

                ServeArgs.model_validate(app.args or {})
            except (ValidationError, ImportError) as exc:
                problems.append(f"{app_where}: args do not validate as ServeArgs: {exc}")
    return problems, entries


def kuberay_problems(doc: Any, kind: str, where: str) -> tuple[list[str], list[Entrypoint]]:
    """Structure of one KubeRay object; returns its problems and the entrypoints it names."""
    if not isinstance(doc, dict):
        return [f"{where}: not a mapping"], []
    problems = []
    if doc.get("apiVersion") != "ray.io/v1":
        problems.append(f"{where}: apiVersion {doc.get('apiVersion')!r}, expected ray.io/v1")
    if doc.get("kind") != kind:
        problems.append(f"{where}: kind {doc.get('kind')!r}, expected {kind}")
    if not (doc.get("metadata") or {}).get("name"):
        problems.append(f"{where}: metadata.name is missing")
    problems += _unknown(doc, {"apiVersion", "kind", "metadata", "spec"}, where)
    spec = doc.get("spec")
    if not isinstance(spec, dict):
        return problems + [f"{where}: spec is missing"], []
    entries: list[Entrypoint] = []
    if kind == "RayCluster":
        problems += ray_cluster_spec_problems(spec, f"{where}: spec")
    elif kind == "RayJob":
        problems += _unknown(spec, RAYJOB_SPEC_KEYS, f"{where}: spec")
        problems += ray_cluster_spec_problems(spec.get("rayClusterSpec"), f"{where}: spec.rayClusterSpec")
        if not isinstance(spec.get("entrypoint"), str) or not spec["entrypoint"].strip():
            problems.append(f"{where}: spec.entrypoint is missing")
        else:
            entries = entrypoints_in(spec["entrypoint"], where)
            if not entries:
                problems.append(f"{where}: spec.entrypoint runs no `python -m ...`")
        if "runtimeEnvYAML" in spec and not isinstance(yaml.safe_load(spec["runtimeEnvYAML"]), dict):
            problems.append(f"{where}: spec.runtimeEnvYAML must be a YAML mapping")
    elif kind == "RayService":
        problems += _unknown(spec, RAYSERVICE_SPEC_KEYS, f"{where}: spec")
        problems += ray_cluster_spec_problems(spec.get("rayClusterConfig"), f"{where}: spec.rayClusterConfig")
        found, entries = serve_config_problems(spec.get("serveConfigV2"), f"{where}: spec.serveConfigV2")
        problems += found
    return problems, entries


# --- collecting what the files name ---------------------------------------------------------


def _load(rel: str) -> Any:
    return yaml.safe_load((CLUSTER_DIR / rel).read_text())


def _readme_commands() -> list[str]:
    """Shell lines of the README's fenced code blocks (backslash continuations joined)."""
    if not README.is_file():
        return []
    commands, block = [], False
    for line in README.read_text().replace("\\\n", " ").splitlines():
        if line.strip().startswith("```"):
            block = not block
        elif block and line.strip() and not line.lstrip().startswith("#"):
            commands.append(line.strip())
    return commands


def manifest_entrypoints(doc: dict[str, Any], source: str) -> list[Entrypoint]:
    """Entrypoints a KubeRay object names: a RayJob's commands, a RayService's import paths."""
    spec = doc.get("spec") or {}
    if isinstance(spec.get("entrypoint"), str):
        return entrypoints_in(spec["entrypoint"], source)
    if isinstance(spec.get("serveConfigV2"), str):
        apps = (yaml.safe_load(spec["serveConfigV2"]) or {}).get("applications") or []
        paths = [app.get("import_path", "") for app in apps]
        return [Entrypoint(p.partition(":")[0], attr=p.partition(":")[2], source=source) for p in paths]
    return []


def all_entrypoints() -> list[Entrypoint]:
    """Every entrypoint named by the launcher configs, the KubeRay manifests and the README."""
    entries: list[Entrypoint] = []
    for rel in LAUNCHER_FILES:
        config = _load(rel)
        commands = [c for key, value in config.items() if key.endswith("_commands") for c in value]
        for node in config["available_node_types"].values():
            commands += node.get("worker_setup_commands", [])
        for command in commands:
            entries += entrypoints_in(command, f"cluster/{rel}")
    for rel in KUBERAY_FILES:
        entries += manifest_entrypoints(_load(rel), f"cluster/{rel}")
    for command in _readme_commands():
        entries += entrypoints_in(command, "cluster/README.md")
    return entries


def _entrypoint_params() -> list[Any]:
    """One test per distinct entrypoint command; an unreadable file still yields a failing test."""
    try:
        entries = all_entrypoints()
    except Exception as exc:  # a broken file becomes one failing test, not a collection error
        return [pytest.param(f"cannot collect entrypoints: {type(exc).__name__}: {exc}", id="unreadable")]
    seen: dict[tuple[str, tuple[str, ...], str], Entrypoint] = {}
    for entry in entries:
        seen.setdefault((entry.module, entry.args, entry.attr), entry)
    return [pytest.param(e, id=f"{e.label}-{i}") for i, e in enumerate(seen.values())]


# --- tests -------------------------------------------------------------------------------------


def _assert_no_problems(problems: list[str]) -> None:
    if problems:
        pytest.fail("\n".join(problems), pytrace=False)


def test_pins_agree() -> None:
    """pyproject.toml's ray extra, constraints.txt and the image Dockerfile name one Ray version."""
    ray_version = pins()["ray"]
    assert _base_version(pins()["constraints"].get("ray", "")) == ray_version, "constraints.txt pins another ray"
    dockerfile = DOCKERFILE.read_text()
    defaults = re.findall(r"^ARG RAY_VERSION=(\S+)$", dockerfile, flags=re.M)
    assert defaults and set(defaults) == {ray_version}, f"{DOCKERFILE}: ARG RAY_VERSION {defaults} != {ray_version}"
    assert re.search(r"^FROM rayproject/ray:\$\{RAY_VERSION\}-py311-\$\{VARIANT\}$", dockerfile, flags=re.M)
    assert "-c /tmp/constraints-notorch.txt" in dockerfile and "grep -v '^torch==' constraints.txt" in dockerfile


@pytest.mark.timeout(60)
@pytest.mark.parametrize("rel", LAUNCHER_FILES)
def test_launcher_config_is_valid(rel: str) -> None:
    """Ray's schema and validate_config accept the file; images and installs match the pins."""
    _assert_no_problems(launcher_problems(_load(rel), f"cluster/{rel}"))


@pytest.mark.timeout(60)
@pytest.mark.parametrize(("rel", "kind"), list(KUBERAY_FILES.items()))
def test_kuberay_manifest_is_valid(rel: str, kind: str) -> None:
    """Structure, Ray version and images of a KubeRay manifest."""
    problems, entries = kuberay_problems(_load(rel), kind, f"cluster/{rel}")
    _assert_no_problems(problems)
    if kind != "RayCluster":  # a bare cluster runs whatever is submitted to it
        assert entries, f"cluster/{rel} names no entrypoint"


def test_recipe_runs_sft_fpo_eval_in_order() -> None:
    """The RayJob chains SFT -> FPO -> evaluation with the phi3-mini configs and s3:// data."""
    spec = _load("kuberay/rayjob-sft-fpo-eval.yaml")["spec"]
    entries = entrypoints_in(spec["entrypoint"], "rayjob")
    assert [e.module for e in entries] == ["jobs.sft", "jobs.fpo", "jobs.evaluate"]
    configs = [e.args[e.args.index("--config") + 1] for e in entries]
    assert configs == [f"jobs/configs/{n}_phi3_mini.yaml" for n in ("sft", "fpo", "evaluate")]
    assert all(any("=s3://" in a for a in e.args) for e in entries), "every stage reads data from s3://"


@pytest.mark.timeout(120)
@pytest.mark.parametrize("entry", _entrypoint_params())
def test_named_entrypoint_imports(entry: Entrypoint | str) -> None:
    """Each module the files name exists and imports; its --config and overrides load."""
    if isinstance(entry, str):
        pytest.fail(entry)
    _assert_no_problems(entrypoint_problems(entry))


def test_expected_entrypoints_are_named() -> None:
    """The files name the project's jobs and the Serve builder (so the import test covers them)."""
    named = {e.label for e in all_entrypoints()}
    expected = {
        "jobs.quickstart", "jobs.sft", "jobs.fpo", "jobs.evaluate", "jobs.build_cache", "jobs.synth_pairs",
        "d2vlm_ray.serving.app:build_app",
    }
    assert expected <= named, f"not named anywhere in cluster/: {sorted(expected - named)}"


# --- negative tests: the same checks reject broken files --------------------------------------


@pytest.mark.timeout(60)
def test_launcher_checks_reject_broken_configs() -> None:
    base = _load("aws.yaml")
    wrong_ray = copy.deepcopy(base)
    wrong_ray["docker"]["image"] = "rayproject/ray:2.59.0-py311-cpu"
    assert any("Ray 2.59.0" in p for p in launcher_problems(wrong_ray, "aws"))

    unknown_key = copy.deepcopy(base)
    unknown_key["idle_timeout_minute"] = 5
    assert any("idle_timeout_minute" in p for p in launcher_problems(unknown_key, "aws"))

    cpu_image_on_gpu = copy.deepcopy(base)
    cpu_image_on_gpu["available_node_types"]["gpu_worker"]["docker"]["worker_image"] = "rayproject/ray:2.60.0-py311-cpu"
    assert any("no GPU worker type" in p for p in launcher_problems(cpu_image_on_gpu, "aws"))

    no_constraints = copy.deepcopy(base)
    no_constraints["setup_commands"] = ["cd /home/ray/d2vlm_ray && pip install -e '.[all]'"]
    assert any("without the constraints file" in p for p in launcher_problems(no_constraints, "aws"))

    wrong_pin = copy.deepcopy(base)
    wrong_pin["setup_commands"] = [base["setup_commands"][0] + " ray==2.59.0 's3fs==2026.10.1'"]
    problems = launcher_problems(wrong_pin, "aws")
    assert any("ray==2.59.0" in p for p in problems) and any("s3fs==2026.10.1" in p for p in problems)

    min_over_max = copy.deepcopy(base)
    min_over_max["available_node_types"]["cpu_worker"]["min_workers"] = 20
    assert launcher_problems(min_over_max, "aws"), "sum of min_workers above max_workers must be rejected"

    no_auth = copy.deepcopy(base)
    no_auth["worker_start_ray_commands"] = ["ray stop", "ray start --address=$RAY_HEAD_IP:6379"]
    assert any("RAY_AUTH_MODE=token" in p for p in launcher_problems(no_auth, "aws"))


@pytest.mark.timeout(60)
def test_kuberay_checks_reject_broken_manifests() -> None:
    cluster = _load("kuberay/raycluster.yaml")
    wrong_version = copy.deepcopy(cluster)
    wrong_version["spec"]["rayVersion"] = "2.59.0"
    assert any("rayVersion" in p for p in kuberay_problems(wrong_version, "RayCluster", "rc")[0])

    wrong_image = copy.deepcopy(cluster)
    wrong_image["spec"]["workerGroupSpecs"][1]["template"]["spec"]["containers"][0]["image"] = (
        "rayproject/ray:2.59.0-py311-gpu"
    )
    assert any("Ray 2.59.0" in p for p in kuberay_problems(wrong_image, "RayCluster", "rc")[0])

    typo = copy.deepcopy(cluster)
    typo["spec"]["enableInTreeAutoscaler"] = typo["spec"].pop("enableInTreeAutoscaling")
    problems = kuberay_problems(typo, "RayCluster", "rc")[0]
    assert any("enableInTreeAutoscaler" in p for p in problems)

    assert any("kind" in p for p in kuberay_problems(cluster, "RayJob", "rc")[0])
    old_api = {**cluster, "apiVersion": "ray.io/v1alpha1"}
    assert any("apiVersion" in p for p in kuberay_problems(old_api, "RayCluster", "rc")[0])

    service = _load("kuberay/rayservice.yaml")
    bad_serve = copy.deepcopy(service)
    serve_config = yaml.safe_load(bad_serve["spec"]["serveConfigV2"])
    serve_config["applications"][0]["args"]["checkpoint_directory"] = "/x"
    serve_config["applications"][0]["deployments"][0]["autoscaling_config"]["min_replicas"] = -1
    serve_config["applications"][0]["deployments"][1]["name"] = "FrameEncoderV2"
    bad_serve["spec"]["serveConfigV2"] = yaml.safe_dump(serve_config)
    problems = kuberay_problems(bad_serve, "RayService", "rs")[0]
    assert any("ServeArgs" in p for p in problems) and any("autoscaling_config" in p for p in problems)
    assert any("'FrameEncoderV2'] are not deployments of d2vlm_ray.serving.app" in p for p in problems)


@pytest.mark.timeout(60)
def test_entrypoint_checks_reject_missing_modules_and_bad_overrides() -> None:
    missing = entrypoints_in('bash -c "cd /x && python -m jobs.no_such_job --config a.yaml"', "test")
    assert [e.module for e in missing] == ["jobs.no_such_job"]
    assert any("does not exist" in p for p in entrypoint_problems(missing[0]))

    config = ("--config", "jobs/configs/evaluate_tiny.yaml")
    good = Entrypoint("jobs.evaluate", (*config, "features.cache_root=s3://b/c"), source="t")
    _assert_no_problems(entrypoint_problems(good))
    unknown = Entrypoint("jobs.evaluate", (*config, "data.root=s3://b"), source="t")
    assert any("is rejected by the job" in p and "data" in p for p in entrypoint_problems(unknown))
    no_file = Entrypoint("jobs.evaluate", ("--config", "jobs/configs/nope.yaml"), source="t")
    assert any("does not exist" in p for p in entrypoint_problems(no_file))
    bad_attr = Entrypoint("d2vlm_ray.serving.args", attr="build_app", source="t")
    assert any("no callable" in p for p in entrypoint_problems(bad_attr))
