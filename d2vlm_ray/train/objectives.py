"""Training objectives as modules, the model set-up, and the optimizer of both stages.

DeepSpeed hooks its gradient bookkeeping onto the engine's ``forward``, so what the
engine wraps is the *objective*: a module whose ``forward(batch)`` runs the model and the
loss and returns ``{"loss": <scalar with grad>, <term>: <detached>...}``. The model itself
stays an attribute (``objective.model``) and is what checkpoints save.

Nothing here imports Ray or DeepSpeed.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from d2vlm_ray.config.schema import LoraSettings, ModelConfig
from d2vlm_ray.losses.fpo import fpo_loss
from d2vlm_ray.losses.sft import sft_loss
from d2vlm_ray.model.builders import Tokenizers
from d2vlm_ray.model.d2vlm import D2VLM
from d2vlm_ray.model.inputs import D2VLMBatch
from d2vlm_ray.model.lora import apply_lora, parameter_group
from d2vlm_ray.model.preference import PairBatch, pair_forward
from d2vlm_ray.train.config import LossSettings, OptimSettings


class SFTObjective(nn.Module):
    """D2VLM's SFT loss (LM + 10·grounding BCE + 10·consistency L1) around a model.

    Args:
        model: The D2VLM (LoRA applied).
        loss: Loss weights.
    """

    def __init__(self, model: D2VLM, loss: LossSettings) -> None:
        super().__init__()
        self.model = model
        self.grounding_weight = loss.grounding_weight
        self.consistency_weight = loss.consistency_weight

    def forward(self, batch: D2VLMBatch) -> dict[str, torch.Tensor]:
        """Loss and its detached terms for one micro-batch."""
        out = self.model(batch)
        terms = sft_loss(
            out.logits,
            out.labels,
            out.evidence_logits,
            out.evidence_queries,
            out.evidence_spans_idx,
            alpha=self.model.alpha,
            grounding_weight=self.grounding_weight,
            consistency_weight=self.consistency_weight,
        )
        return {"loss": terms.total, "lm": terms.lm, "grounding": terms.grounding, "consistency": terms.consistency}


class FPOObjective(nn.Module):
    """FPO: preference loss on (chosen, rejected) plus the chosen branch's SFT loss (spec §4.4).

    Args:
        model: The D2VLM with a fresh LoRA.
        loss: Loss weights, ``beta`` and ``variant``.
        reference: Frozen reference model for ``variant='dpo'`` (kept out of the module
            tree, so engines neither train nor checkpoint it).
    """

    def __init__(self, model: D2VLM, loss: LossSettings, reference: D2VLM | None = None) -> None:
        super().__init__()
        if model.family != "d2vlm":
            raise ValueError(f"stage fpo: FPO is defined for the d2vlm family only; this model is {model.family!r}")
        if loss.variant == "dpo" and reference is None:
            raise ValueError("loss.variant 'dpo' needs a reference model")
        self.model = model
        self.loss = loss
        self._reference = (reference,) if reference is not None else ()

    def forward(self, batch: PairBatch) -> dict[str, torch.Tensor]:
        """Loss and its detached terms (preference, SFT terms, log-probs, margin, reward accuracy)."""
        out = pair_forward(self.model, batch)
        ref_chosen = ref_rejected = None
        if self._reference:
            with torch.no_grad():
                ref = pair_forward(self._reference[0], batch)
            ref_chosen, ref_rejected = ref.chosen_logp, ref.rejected_logp
        terms = fpo_loss(
            out,
            beta=self.loss.beta,
            variant=self.loss.variant,
            ref_chosen_logp=ref_chosen,
            ref_rejected_logp=ref_rejected,
            alpha=self.model.alpha,
            grounding_weight=self.loss.grounding_weight,
            consistency_weight=self.loss.consistency_weight,
        )
        return {
            "loss": terms.total,
            "preference": terms.preference,
            "lm": terms.lm,
            "grounding": terms.grounding,
            "consistency": terms.consistency,
            "chosen_logp": terms.chosen_logp.mean(),
            "rejected_logp": terms.rejected_logp.mean(),
            "margin": terms.margin.mean(),
            "reward_accuracy": (terms.margin > 0).float().mean(),
        }


def check_fpo_family(model_dir: str | Path) -> None:
    """Refuse FPO before any worker starts when ``model_dir`` holds a family FPO is not defined for.

    FPO's factorized log-likelihood scores ``<evi>`` grounding with D2VLM's similarity head;
    a Grounded-VideoLLM has no such head (its spans are tokens).

    Raises:
        ValueError: Naming the family.
    """
    from d2vlm_ray.model.checkpoint import checkpoint_family

    family = checkpoint_family(model_dir)
    if family != "d2vlm":
        raise ValueError(f"stage fpo: FPO is defined for the d2vlm family only; {str(model_dir)!r} is {family!r}")


def load_model(init_dir: str | Path, lora: LoraSettings) -> tuple[D2VLM, Tokenizers, ModelConfig]:
    """Load a model directory (merged or adapter format) and give it a fresh LoRA.

    Any LoRA already in the checkpoint is merged first, so FPO starts from the SFT weights
    with new adapters (spec §4.2); the trainable-parameter policy is then applied.

    Returns:
        The model (float32, train-ready), its tokenizers, and its config with ``lora``
        set to the settings used (what a merged checkpoint records).
    """
    from d2vlm_ray.train.checkpointing import load_trained_model

    model, tokenizers, model_cfg = load_trained_model(init_dir)
    apply_lora(model, lora)
    return model, tokenizers, replace(model_cfg, lora=lora)


def param_groups(model: nn.Module, optim: OptimSettings) -> list[dict[str, Any]]:
    """AdamW groups: LoRA matrices at ``lora_lr``, the LLM's token embeddings and output
    head at ``embedding_lr``, the Q-Former compressor at ``compressor_lr`` (each ``lr``
    when 0), every other trainable at ``lr``.

    The frozen frame encoder (and any frozen weight) is in no group. Group order is
    lora, embedding, compressor, other: the training log reads the first and last group's rates.

    Raises:
        ValueError: If a frame-encoder parameter is trainable (the cache keys would lie).
    """
    lora, embedding, compressor, other = [], [], [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        group = parameter_group(name.removeprefix("model."))
        if group == "vision":
            raise ValueError(f"{name}: the frame encoder must stay frozen")
        if group == "lora":
            lora.append(param)
        elif group in ("embed", "lm_head") and optim.embedding_lr > 0:
            embedding.append(param)
        elif group in ("qformer", "qformer_frozen") and optim.compressor_lr > 0:
            compressor.append(param)
        else:
            other.append(param)
    if not lora and not embedding and not compressor and not other:
        raise ValueError("no trainable parameters")
    groups = []
    for name, params, lr in (
        ("lora", lora, optim.lora_lr),
        ("embedding", embedding, optim.embedding_lr),
        ("compressor", compressor, optim.compressor_lr),
        ("other", other, optim.lr),
    ):
        if params:
            groups.append({"params": params, "lr": lr, "weight_decay": optim.weight_decay, "name": name})
    return groups


def build_optimizer(model: nn.Module, optim: OptimSettings) -> torch.optim.AdamW:
    """AdamW over :func:`param_groups` (official: ``adamw_torch``, weight decay 0)."""
    return torch.optim.AdamW(param_groups(model, optim), betas=tuple(optim.betas), eps=optim.eps)


def build_scheduler(
    optimizer: torch.optim.Optimizer, total_steps: int, warmup: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup then cosine decay to 0 over ``total_steps`` optimizer steps (HF's ``cosine``)."""
    from transformers import get_cosine_schedule_with_warmup

    return get_cosine_schedule_with_warmup(optimizer, num_warmup_steps=warmup, num_training_steps=total_steps)
