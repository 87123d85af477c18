"""Training checkpoints: a loadable model directory plus the engine state for resume.

A checkpoint directory (one per saved step) holds:

- ``model/``: the model, loadable without the trainer, in one of two formats
  (``checkpoint.save_mode``):

  - ``merged``: a full d2vlm_ray checkpoint with LoRA merged into the base weights
    (:func:`d2vlm_ray.model.checkpoint.save_pretrained`); load it with ``from_pretrained``;
  - ``adapter``: ``adapter_config.json`` + ``adapter_model.safetensors`` (peft's format for
    the LoRA matrices), ``trainables.safetensors`` (every other trainable weight: heads,
    embeddings, Q-Former attention) and ``base.json`` naming the checkpoint they apply to;
    load it with :func:`load_trained_model`.

- ``engine/``: the engine state (weights, optimizer, LR scheduler; with DeepSpeed ZeRO one
  optimizer shard per rank) for exact resume;
- ``trainer_state.json``: optimizer steps done and samples consumed (the data-order resume point).

The frame encoder is never trained, and the model directory always stores it in the
float32 weights it was loaded with, so ``load_frame_encoder(<ckpt>/model).encoder_id``
equals the id that keys the feature cache.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any, Iterator

import torch
from safetensors.torch import load_file, save_file

from d2vlm_ray.config.load import from_dict
from d2vlm_ray.config.schema import LoraSettings, ModelConfig
from d2vlm_ray.model.builders import Tokenizers
from d2vlm_ray.model.d2vlm import D2VLM
from d2vlm_ray.model.lora import apply_lora, merge_lora, parameter_group
from d2vlm_ray.train.loop import TrainerState

MODEL_DIR = "model"
ENGINE_DIR = "engine"
ENGINE_TAG = "state"
STATE_NAME = "trainer_state.json"
ADAPTER_FORMAT = "d2vlm_ray-adapter"


@contextmanager
def _float32_vision(model: D2VLM, vision_state: dict[str, torch.Tensor] | None) -> Iterator[None]:
    """Temporarily put the original float32 frame-encoder weights into ``model`` (bf16 runs)."""
    if vision_state is None:
        yield
        return
    current = {k: v.detach().clone() for k, v in model.vision.state_dict().items()}
    model.vision.to(torch.float32)
    model.vision.load_state_dict(vision_state)
    try:
        yield
    finally:
        dtype = next(iter(current.values())).dtype
        model.vision.load_state_dict(current)
        model.vision.to(dtype)


def save_model_dir(
    model: D2VLM,
    model_cfg: ModelConfig,
    tokenizers: Tokenizers,
    out_dir: str | Path,
    *,
    mode: str = "merged",
    base_dir: str | Path | None = None,
    vision_state: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write the trained model as a loadable directory.

    Args:
        model: The model with its (unmerged) LoRA adapters; it is not modified.
        model_cfg: Its architecture config (``lora`` = the settings used).
        tokenizers: Its tokenizers.
        out_dir: Target directory.
        mode: ``merged`` or ``adapter``.
        base_dir: The checkpoint the run started from (``adapter`` mode records it).
        vision_state: Original float32 frame-encoder weights, when the engine cast the
            model to a lower precision.

    Raises:
        ValueError: On an unknown mode, or ``adapter`` without ``base_dir``.
    """
    from d2vlm_ray.model.checkpoint import save_pretrained

    out_dir = Path(out_dir)
    if mode == "merged":
        with _float32_vision(model, vision_state):
            return save_pretrained(model, model_cfg, tokenizers, out_dir)
    if mode != "adapter":
        raise ValueError(f"checkpoint.save_mode: expected 'merged' or 'adapter', got {mode!r}")
    if base_dir is None:
        raise ValueError("checkpoint.save_mode 'adapter' needs the base checkpoint directory")
    from peft import get_peft_model_state_dict

    out_dir.mkdir(parents=True, exist_ok=True)
    peft_cfg = model.llm.peft_config["default"]
    peft_cfg.save_pretrained(str(out_dir))
    adapter = {k: v.detach().cpu().contiguous() for k, v in get_peft_model_state_dict(model.llm).items()}
    save_file(adapter, str(out_dir / "adapter_model.safetensors"))
    trainables = {
        name: p.detach().cpu().contiguous()
        for name, p in model.named_parameters()
        if p.requires_grad and parameter_group(name) != "lora"
    }
    save_file(trainables, str(out_dir / "trainables.safetensors"))
    meta = {"format": ADAPTER_FORMAT, "base": str(Path(base_dir).resolve()), "lora": asdict(model_cfg.lora)}
    (out_dir / "base.json").write_text(json.dumps(meta, indent=2))
    return out_dir


def load_trained_model(
    model_dir: str | Path, *, device: str | torch.device = "cpu", dtype: torch.dtype | None = None
) -> tuple[D2VLM, Tokenizers, ModelConfig]:
    """Load a trained model directory of either format, LoRA merged, frozen, in eval mode.

    An adapter directory is applied on top of its base, which may itself be an adapter
    directory (FPO adapters over an SFT adapter).

    Raises:
        FileNotFoundError: If the directory holds neither format.
        ValueError: If adapter or trainable weights do not fit the base model.
    """
    from d2vlm_ray.model.checkpoint import CONFIG_NAME, from_pretrained

    model_dir = Path(model_dir)
    if (model_dir / CONFIG_NAME).is_file():
        model, tokenizers, cfg = from_pretrained(model_dir, device=device, dtype=dtype)
        model.requires_grad_(False)
        return model, tokenizers, cfg
    meta_path = model_dir / "base.json"
    if not meta_path.is_file():
        raise FileNotFoundError(
            f"{str(model_dir)!r} is neither a checkpoint (config.json) nor an adapter dir (base.json)"
        )
    meta = json.loads(meta_path.read_text())
    model, tokenizers, cfg = load_trained_model(meta["base"])
    lora = from_dict(LoraSettings, meta["lora"])
    apply_lora(model, lora)
    from peft import set_peft_model_state_dict

    result = set_peft_model_state_dict(model.llm, load_file(str(model_dir / "adapter_model.safetensors")))
    if getattr(result, "unexpected_keys", None):
        raise ValueError(f"{model_dir}: adapter weights do not match the base model: {result.unexpected_keys[:5]}")
    trainables = load_file(str(model_dir / "trainables.safetensors"))
    missing = set(trainables) - {n for n, _ in model.named_parameters()}
    if missing:
        raise ValueError(f"{model_dir}: trainable weights unknown to the base model: {sorted(missing)[:5]}")
    model.load_state_dict(trainables, strict=False)
    merge_lora(model)
    model.to(device=device)
    if dtype is not None:
        model.to(dtype=dtype)
    model.requires_grad_(False)
    model.eval()
    return model, tokenizers, replace(cfg, lora=lora)


def resolve_model_dir(path: str | Path) -> Path:
    """The model directory behind ``path``.

    ``path`` may be a model directory (either format), a checkpoint directory holding
    ``model/``, or a run directory whose newest ``checkpoint_*`` (Ray) or
    ``checkpoints/step_*`` (local) checkpoint is taken.

    Raises:
        FileNotFoundError: If nothing loadable is found.
    """
    from d2vlm_ray.model.checkpoint import CONFIG_NAME

    path = Path(path)
    if (path / CONFIG_NAME).is_file() or (path / "base.json").is_file():
        return path
    if (path / MODEL_DIR).is_dir():
        return resolve_model_dir(path / MODEL_DIR)
    found = sorted(p for p in path.glob("checkpoint_*") if p.is_dir()) or sorted(
        p for p in (path / "checkpoints").glob("step_*") if p.is_dir()
    )
    if found:
        return resolve_model_dir(found[-1])
    raise FileNotFoundError(
        f"{str(path)!r}: not a model directory, a checkpoint, or a run directory with checkpoints"
    )


def frame_encoder_dir(model_dir: str | Path) -> Path:
    """The full checkpoint directory whose frame encoder a model directory uses (follows adapter bases)."""
    from d2vlm_ray.model.checkpoint import CONFIG_NAME

    model_dir = Path(model_dir)
    while not (model_dir / CONFIG_NAME).is_file():
        meta_path = model_dir / "base.json"
        if not meta_path.is_file():
            raise FileNotFoundError(f"{str(model_dir)!r}: no config.json and no base.json")
        model_dir = Path(json.loads(meta_path.read_text())["base"])
    return model_dir


def write_trainer_state(ckpt_dir: str | Path, state: TrainerState) -> None:
    """Write ``trainer_state.json``."""
    (Path(ckpt_dir) / STATE_NAME).write_text(json.dumps(asdict(state), indent=2))


def read_trainer_state(ckpt_dir: str | Path) -> TrainerState:
    """Read ``trainer_state.json``.

    Raises:
        FileNotFoundError: If the checkpoint has none.
    """
    path = Path(ckpt_dir) / STATE_NAME
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(ckpt_dir)!r}: no {STATE_NAME}")
    return TrainerState(**json.loads(path.read_text()))


def save_training_checkpoint(
    ckpt_dir: str | Path,
    engine: Any,
    state: TrainerState,
    *,
    rank: int,
    write_model: Any,
) -> None:
    """Write one rank's part of a checkpoint (collective: every rank calls it).

    Every rank writes its engine shard under ``engine/``; rank 0 also writes the model
    directory (``write_model(path)``) and ``trainer_state.json``.
    """
    ckpt_dir = Path(ckpt_dir)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    engine.save_checkpoint(str(ckpt_dir / ENGINE_DIR), tag=ENGINE_TAG)
    if rank == 0:
        write_model(ckpt_dir / MODEL_DIR)
        write_trainer_state(ckpt_dir, state)


def restore_training_checkpoint(ckpt_dir: str | Path, engine: Any) -> TrainerState:
    """Load the engine state of a checkpoint and return where training stopped."""
    state = read_trainer_state(ckpt_dir)
    engine.load_checkpoint(str(Path(ckpt_dir) / ENGINE_DIR), tag=ENGINE_TAG)
    return state


