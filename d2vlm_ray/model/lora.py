"""LoRA (via peft) and the trainable-parameter policy.

The official policy (``tuning_mode='attention'``, spec §1.9) trains: LoRA on Phi-3's
``qkv_proj`` and ``o_proj``; the full ``embed_tokens`` and ``lm_head``; both grounding
heads; and in the compressor every Q-Former attention block plus the learned queries,
``qformer_ln`` and the aggregator projections. BERT embeddings and FFNs stay frozen, and
the frame encoder is never trained.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

from d2vlm_ray.config.schema import LoraSettings
from d2vlm_ray.model.d2vlm import D2VLM

# Grounded-VideoLLM's compressor is its two stream projectors.
_PROJECTORS = ("spatial_proj", "temporal_proj")
_COMPRESSOR_EXTRAS = ("qformer_query", "qformer_ln", "qformer_proj", "qformer_q_proj", "qformer_k_proj", "qformer_v_proj")


def apply_lora(model: D2VLM, settings: LoraSettings) -> D2VLM:
    """Wrap the LLM with fresh LoRA adapters (peft) and apply the trainable policy.

    Returns the same model object, whose ``llm`` is now a ``PeftModel``.
    """
    from peft import LoraConfig, get_peft_model  # peft costs ~6 s to import; only trainers need it

    lora_cfg = LoraConfig(
        r=settings.r,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=list(settings.target_modules),
        bias="none",
        task_type="CAUSAL_LM",
    )
    model.llm = get_peft_model(model.llm, lora_cfg)
    set_trainable(model, settings.tuning_mode, settings.vocab_rows)
    return model


def merge_lora(model: D2VLM) -> D2VLM:
    """Fold LoRA weights into the base layers and drop the peft wrapper (no-op without LoRA)."""
    if hasattr(model.llm, "merge_and_unload"):
        model.llm = model.llm.merge_and_unload()
    return model


def parameter_group(name: str) -> str:
    """The group a parameter belongs to: lora, embed, lm_head, frm_head, evi_head, qformer,
    qformer_frozen, projector (Grounded-VideoLLM), vision, or llm (frozen base weights)."""
    if "lora_" in name:
        return "lora"
    if name.startswith("vision."):
        return "vision"
    if name.startswith(("frm_head.", "evi_head.")):
        return name.split(".", 1)[0]
    if name.startswith("compressor."):
        rest = name[len("compressor.") :]
        if rest.startswith(_PROJECTORS):
            return "projector"
        if rest.startswith(_COMPRESSOR_EXTRAS) or (rest.startswith("qformer.") and "attention" in rest):
            return "qformer"
        return "qformer_frozen"
    if "embed_tokens" in name:
        return "embed"
    if "lm_head" in name:
        return "lm_head"
    return "llm"


def set_trainable(model: D2VLM, tuning_mode: str, vocab_rows: str = "all") -> None:
    """Freeze everything, then unfreeze what ``tuning_mode`` trains.

    Modes: ``attention`` (official), ``full_compressor`` (official plus the whole Q-Former,
    for a Q-Former that starts random), ``heads`` (LoRA and heads), ``all`` (all but vision),
    and ``projectors`` (Grounded-VideoLLM's stage 1: the stream projectors alone). Every mode
    but ``heads`` trains the projectors of a Grounded-VideoLLM, which has no heads and no Q-Former.
    With ``vocab_rows="new"`` a trained ``embed_tokens``/``lm_head`` learns only the rows
    after ``model.pretrained_vocab_size`` (the tokens the project added).

    Raises:
        ValueError: On an unknown mode, or ``vocab_rows="new"`` for a model whose
            vocabulary has no pretrained rows.
    """
    trained = {
        "attention": {"lora", "embed", "lm_head", "frm_head", "evi_head", "qformer", "projector"},
        "full_compressor": {"lora", "embed", "lm_head", "frm_head", "evi_head", "qformer", "qformer_frozen", "projector"},
        "heads": {"lora", "frm_head", "evi_head"},
        "all": {"lora", "embed", "lm_head", "frm_head", "evi_head", "qformer", "qformer_frozen", "projector", "llm"},
        "projectors": {"projector"},
    }
    if tuning_mode not in trained:
        raise ValueError(f"model.lora.tuning_mode: unknown mode {tuning_mode!r}; choose from {sorted(trained)}")
    if vocab_rows not in ("all", "new"):
        raise ValueError(f"model.lora.vocab_rows: expected 'all' or 'new', got {vocab_rows!r}")
    for name, param in model.named_parameters():
        param.requires_grad_(parameter_group(name) in trained[tuning_mode])
    if vocab_rows == "new":
        _train_new_rows_only(model)


def _train_new_rows_only(model: D2VLM) -> None:
    """Zero the gradient of every pretrained row of the trained vocabulary matrices.

    A tensor hook acts before DeepSpeed or any optimizer sees the gradient; with zero
    gradients from the start AdamW's moments stay zero and (weight decay 0) the rows do not
    move at all.
    """
    first_new = int(getattr(model, "pretrained_vocab_size", 0))
    if first_new <= 0:
        raise ValueError(
            "model.lora.vocab_rows: 'new' needs a model whose vocabulary came from pretrained weights "
            "(llm.pretrained_vocab_size > 0, set when init_checkpoint loads llm.weights_dir)"
        )
    llm = model.causal_lm
    for weight in (llm.get_input_embeddings().weight, llm.get_output_embeddings().weight):
        if not weight.requires_grad or getattr(weight, "_d2vlm_new_rows_hook", False):
            continue
        mask = torch.zeros(weight.shape[0], 1, dtype=weight.dtype, device=weight.device)  # [V, 1]
        mask[first_new:] = 1.0
        weight.register_hook(lambda grad, mask=mask: grad * mask.to(grad.dtype))
        weight._d2vlm_new_rows_hook = True


def trainable_counts(model: nn.Module) -> OrderedDict[str, int]:
    """Trainable parameter counts by group, plus ``total`` (works on the meta device)."""
    counts: OrderedDict[str, int] = OrderedDict()
    for name, param in model.named_parameters():
        if param.requires_grad:
            group = parameter_group(name)
            counts[group] = counts.get(group, 0) + param.numel()
    counts["total"] = sum(counts.values())
    return counts
