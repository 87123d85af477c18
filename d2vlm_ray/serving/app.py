"""The Serve application: ``build_app`` (the config's ``import_path``) and start/stop helpers.

``serve run serve/local.yaml`` (or ``serve deploy serve/local.yaml``) calls
``build_app(args)`` with the config's ``args:`` block; per-deployment replicas, autoscaling,
``max_ongoing_requests`` and CPUs/GPUs come from its ``deployments:`` block and override
the defaults on the deployment classes. The quickstart and the tests use
:func:`start_app` / :func:`stop_app` instead of the CLI.
"""

from __future__ import annotations

from typing import Any

from ray import serve
from ray.serve import Application

from d2vlm_ray.serving.args import ServeArgs
from d2vlm_ray.serving.deployments import Answerer, FrameEncoder, Grounder, Ingress

DEFAULT_APP_NAME = "d2vlm"
DEPLOYMENTS = {"FrameEncoder": FrameEncoder, "Grounder": Grounder, "Answerer": Answerer, "Ingress": Ingress}


def build_app(args: dict[str, Any]) -> Application:
    """The Serve config's ``import_path`` target: validate ``args`` and compose the deployments.

    Serve requires builders to take exactly one argument; per-deployment settings come
    from the config's ``deployments:`` block.

    Raises:
        pydantic.ValidationError: On unknown or ill-typed arguments.
        FileNotFoundError: If the checkpoint is missing (the message says what to run).
    """
    return compose_app(args)


def compose_app(args: dict[str, Any], deployment_options: dict[str, dict[str, Any]] | None = None) -> Application:
    """Validate ``args`` as :class:`ServeArgs` and compose the four deployments.

    Args:
        args: Serve args (relative paths are resolved against the working directory).
        deployment_options: Optional ``{deployment name: Deployment.options(...) kwargs}``,
            e.g. the ``deployments:`` entries of a Serve config without their ``name``.

    Raises:
        pydantic.ValidationError: On unknown or ill-typed arguments.
        FileNotFoundError: If the checkpoint is missing (the message says what to run).
        ValueError: If ``deployment_options`` names an unknown deployment.
    """
    parsed = ServeArgs.load(args).model_dump()
    options = deployment_options or {}
    unknown = set(options) - set(DEPLOYMENTS)
    if unknown:
        raise ValueError(f"deployment_options: unknown deployments {sorted(unknown)}; known: {sorted(DEPLOYMENTS)}")

    def dep(name: str) -> Any:
        deployment = DEPLOYMENTS[name]
        return deployment.options(**options[name]) if name in options else deployment

    encoder = dep("FrameEncoder").bind(parsed)
    grounder = dep("Grounder").bind(parsed)
    answerer = dep("Answerer").bind(parsed)
    return dep("Ingress").bind(parsed, encoder, grounder, answerer)


def start_app(
    args: dict[str, Any],
    *,
    port: int = 8000,
    host: str = "127.0.0.1",
    name: str = DEFAULT_APP_NAME,
    deployment_options: dict[str, dict[str, Any]] | None = None,
) -> str:
    """Start Serve's HTTP proxy on ``host:port`` (if not running) and deploy the app at ``/``.

    Needs a connected Ray (``ray.init`` first, or let Serve start a local one).

    Returns:
        The base URL, e.g. ``http://127.0.0.1:8000`` (the running proxy's, if Serve was
        already started with other HTTP options).
    """
    serve.start(http_options={"host": host, "port": port})
    serve.run(compose_app(args, deployment_options), name=name, route_prefix="/")
    try:
        from ray.serve.context import _get_global_client

        http = _get_global_client().http_config
        host, port = http.host, http.port
    except Exception:  # noqa: BLE001 - the options we asked for are the best answer left
        pass
    return f"http://{host}:{port}"


def stop_app(name: str = DEFAULT_APP_NAME, *, shutdown_serve: bool = False) -> None:
    """Delete the app (and optionally shut Serve down, ~6 s)."""
    serve.delete(name)
    if shutdown_serve:
        serve.shutdown()
