"""Checkpoint directories (safetensors + config.json + tokenizers) and the official key map.

A d2vlm_ray checkpoint directory holds:

- ``model.safetensors``: the full state dict under this project's module names, LoRA
  merged into the base weights;
- ``config.json``: ``{"format": "d2vlm_ray", "model": <ModelConfig>, "evi_token_id", "pad_token_id"}``;
- ``tokenizer/`` and ``qformer_tokenizer/``: both tokenizers in HF format.

The official D2VLM release is a merged HF checkpoint (``model-*.safetensors``) whose keys
follow the E.T. Chat layout (spec §7.2). :func:`to_official_state_dict` and
:func:`from_official_state_dict` translate between the two layouts:

==================================================  =====================================================
d2vlm_ray                                           official
==================================================  =====================================================
``llm.model.*``, ``llm.lm_head.weight``             ``model.*``, ``lm_head.weight``
``vision.embeddings.class_embedding``               ``model.vision_tower.vision_tower.cls_token``
``vision.embeddings.position_embedding``            ``...vision_tower.pos_embed``
``vision.embeddings.patch_embedding.*``             ``...vision_tower.patch_embed.proj.*``
``vision.encoder.layers.{i}.layer_norm{1,2}.*``     ``...vision_tower.blocks.{i}.norm{1,2}.*``
``vision.encoder.layers.{i}.self_attn.qkv.weight``  ``...blocks.{i}.attn.qkv.weight``
``vision.encoder.layers.{i}.self_attn.qkv.bias``    ``...blocks.{i}.attn.q_bias`` + ``v_bias`` (k bias is 0)
``vision.encoder.layers.{i}.self_attn.projection``  ``...blocks.{i}.attn.proj``
``vision.encoder.layers.{i}.mlp.fc{1,2}``           ``...blocks.{i}.mlp.fc{1,2}``
``compressor.qformer.embeddings.layernorm``         ``model.qformer_bert.bert.embeddings.LayerNorm``
``compressor.qformer.encoder.layer.{i}.{attention,crossattention}.attention.*``
                                                    ``model.qformer_bert.bert.encoder.layer.{i}.{attention,crossattention}.self.*``
other ``compressor.qformer.*``                      ``model.qformer_bert.bert.*``
``compressor.qformer_{query,ln,proj,q_proj,k_proj,v_proj}*``  ``model.qformer_*``
``frm_head.*``, ``evi_head.*``                      unchanged
==================================================  =====================================================
"""

from __future__ import annotations

import json
from dataclasses import replace
import math
import re
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from d2vlm_ray.config.load import from_dict, to_dict
from d2vlm_ray.config.schema import ModelConfig
from d2vlm_ray.model.builders import Tokenizers, build_frame_encoder, build_model, resolve_vocab_sizes
from d2vlm_ray.model.d2vlm import D2VLM
from d2vlm_ray.model.grounded_videollm import GroundedVideoLLM
from d2vlm_ray.model.tokenizer import TokenIds, load_llm_tokenizer, load_qformer_tokenizer
from d2vlm_ray.model.two_stream import TwoStreamFrameEncoder, build_two_stream_vision
from d2vlm_ray.model.vision import VisionFrameEncoder, build_vision_model
from d2vlm_ray.types import FrameEncoder

FORMAT = "d2vlm_ray"
WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
_VIT = "model.vision_tower.vision_tower."
_BERT = "model.qformer_bert.bert."

# (pattern over d2vlm_ray names, replacement in official names); the first match wins.
_TO_OFFICIAL: list[tuple[str, str]] = [
    (r"^llm\.model\.", "model."),
    (r"^llm\.lm_head\.", "lm_head."),
    (r"^vision\.embeddings\.class_embedding$", _VIT + "cls_token"),
    (r"^vision\.embeddings\.position_embedding$", _VIT + "pos_embed"),
    (r"^vision\.embeddings\.patch_embedding\.", _VIT + "patch_embed.proj."),
    (r"^vision\.encoder\.layers\.(\d+)\.layer_norm(\d)\.", _VIT + r"blocks.\1.norm\2."),
    (r"^vision\.encoder\.layers\.(\d+)\.self_attn\.qkv\.weight$", _VIT + r"blocks.\1.attn.qkv.weight"),
    (r"^vision\.encoder\.layers\.(\d+)\.self_attn\.projection\.", _VIT + r"blocks.\1.attn.proj."),
    (r"^vision\.encoder\.layers\.(\d+)\.mlp\.", _VIT + r"blocks.\1.mlp."),
    (r"^compressor\.qformer\.embeddings\.layernorm\.", _BERT + "embeddings.LayerNorm."),
    (
        r"^compressor\.qformer\.encoder\.layer\.(\d+)\.(attention|crossattention)\.attention\.",
        _BERT + r"encoder.layer.\1.\2.self.",
    ),
    (r"^compressor\.qformer\.", _BERT),
    (r"^compressor\.(qformer_\w+)", r"model.\1"),
    (r"^(frm_head|evi_head)\.", r"\1."),
]
_QKV_BIAS = re.compile(r"^vision\.encoder\.layers\.(\d+)\.self_attn\.qkv\.bias$")


def _rename(name: str, rules: list[tuple[str, str]]) -> str | None:
    for pattern, repl in rules:
        if re.search(pattern, name):
            return re.sub(pattern, repl, name)
    return None


def to_official_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Translate a (LoRA-merged) d2vlm_ray state dict into the official key layout.

    Raises:
        KeyError: On a key the map does not know (e.g. unmerged LoRA weights).
    """
    out: dict[str, torch.Tensor] = {}
    for name, tensor in state.items():
        match = _QKV_BIAS.match(name)
        if match:
            width = tensor.shape[0] // 3
            prefix = f"{_VIT}blocks.{match.group(1)}.attn."
            out[prefix + "q_bias"] = tensor[:width]
            out[prefix + "v_bias"] = tensor[2 * width :]
            continue
        new = _rename(name, _TO_OFFICIAL)
        if new is None:
            raise KeyError(f"no official name for {name!r}")
        out[new] = tensor
    # Official checkpoints carry the Q-Former's persistent position_ids buffer (BERT's
    # 0..max_position-1); transformers' Q-Former keeps it out of the state dict.
    pos_rows = out.get(_BERT + "embeddings.position_embeddings.weight")
    if pos_rows is not None and _QFORMER_POSITION_IDS not in out:
        out[_QFORMER_POSITION_IDS] = torch.arange(pos_rows.shape[0], dtype=torch.long)[None]
    return out


def _from_official_rules() -> list[tuple[str, str]]:
    """Invert the literal renames; the two regex-with-group rules are inverted by hand."""
    return [
        (r"^lm_head\.", "llm.lm_head."),
        (re.escape(_VIT) + r"cls_token$", "vision.embeddings.class_embedding"),
        (re.escape(_VIT) + r"pos_embed$", "vision.embeddings.position_embedding"),
        (re.escape(_VIT) + r"patch_embed\.proj\.", "vision.embeddings.patch_embedding."),
        (re.escape(_VIT) + r"blocks\.(\d+)\.norm(\d)\.", r"vision.encoder.layers.\1.layer_norm\2."),
        (re.escape(_VIT) + r"blocks\.(\d+)\.attn\.qkv\.weight$", r"vision.encoder.layers.\1.self_attn.qkv.weight"),
        (re.escape(_VIT) + r"blocks\.(\d+)\.attn\.proj\.", r"vision.encoder.layers.\1.self_attn.projection."),
        (re.escape(_VIT) + r"blocks\.(\d+)\.mlp\.", r"vision.encoder.layers.\1.mlp."),
        (re.escape(_BERT) + r"embeddings\.LayerNorm\.", "compressor.qformer.embeddings.layernorm."),
        (
            re.escape(_BERT) + r"encoder\.layer\.(\d+)\.(attention|crossattention)\.self\.",
            r"compressor.qformer.encoder.layer.\1.\2.attention.",
        ),
        (re.escape(_BERT), "compressor.qformer."),
        (r"^model\.(qformer_\w+)", r"compressor.\1"),
        (r"^model\.", "llm.model."),
        (r"^(frm_head|evi_head)\.", r"\1."),
    ]


def from_official_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Translate an official D2VLM state dict into d2vlm_ray names.

    EVA's separate ``q_bias``/``v_bias`` become the BLIP-2 ``qkv.bias`` with a zero key
    part. Buffers the official layout may carry (``position_ids``) are dropped.
    """
    rules = _from_official_rules()
    out: dict[str, torch.Tensor] = {}
    biases: dict[str, dict[str, torch.Tensor]] = {}
    for name, tensor in state.items():
        if name.endswith("position_ids"):
            continue
        bias = re.match(re.escape(_VIT) + r"blocks\.(\d+)\.attn\.(q|v)_bias$", name)
        if bias:
            biases.setdefault(bias.group(1), {})[bias.group(2)] = tensor
            continue
        new = _rename(name, rules)
        if new is None:
            raise KeyError(f"unknown official key {name!r}")
        out[new] = tensor
    for idx, parts in biases.items():
        q, v = parts["q"], parts["v"]
        out[f"vision.encoder.layers.{idx}.self_attn.qkv.bias"] = torch.cat([q, torch.zeros_like(q), v])
    return out


# Sizes the official code does not write into config.json but fixes in code: EVA's heads
# are ``width // 88`` (eva_vit.py) and the Q-Former is BERT with 64-wide heads.
_EVA_HEAD_DIM = 88
_BERT_HEAD_DIM = 64
# The official model reads hidden_states[6] for <evi> injection (``hidden_add_index``).
_OFFICIAL_INJECT_LAYER_IDX = 6
# Keys that checkpoints written by earlier versions carry in their "model" config but that
# are no longer model settings: the SFT/FPO loss weights are training settings
# (``train.config.LossSettings``), and were never read from the model config.
_RETIRED_MODEL_KEYS = ("grounding_loss_weight", "consistency_loss_weight")
_QFORMER_POSITION_IDS = _BERT + "embeddings.position_ids"


def _count_blocks(state: dict[str, torch.Tensor], pattern: str) -> int:
    found = {int(m.group(1)) for name in state if (m := re.match(pattern, name))}
    return max(found) + 1 if found else 0


def official_model_config(
    meta: dict[str, Any], state: dict[str, torch.Tensor], *, tokenizer_dir: str = "", qformer_tokenizer_dir: str = ""
) -> ModelConfig:
    """The :class:`ModelConfig` of an official-layout checkpoint, from its own files.

    The LLM sizes come from the HF ``config.json`` (``meta``); the frame encoder and the
    Q-Former, whose sizes the official code fixes in code rather than in the config, are
    read off the weight shapes in official key names (``state``), with the official head
    widths (EVA 88, BERT 64). Any official-layout checkpoint therefore loads, not just the
    phi3-mini release.

    Raises:
        ValueError: If a size is missing from both the config and the weights, or the
            checkpoint uses a feature this project does not implement (RoPE scaling).
    """
    required = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size")
    missing = [k for k in required if k not in meta]
    if missing:
        raise ValueError(f"official config.json lacks {missing}; cannot size the language model")
    if meta.get("rope_scaling"):
        raise ValueError(f"official config.json: rope_scaling {meta['rope_scaling']!r} is not supported (4k Phi-3 only)")
    try:
        cls_token = state[_VIT + "cls_token"]
        pos_embed = state[_VIT + "pos_embed"]
        patch_w = state[_VIT + "patch_embed.proj.weight"]
        fc1 = state[_VIT + "blocks.0.mlp.fc1.weight"]
        query = state["model.qformer_query"]
        word_emb = state[_BERT + "embeddings.word_embeddings.weight"]
        q_ffn = state[_BERT + "encoder.layer.0.intermediate_query.dense.weight"]
    except KeyError as exc:
        raise ValueError(f"official checkpoint lacks {exc.args[0]!r}; cannot size the frame encoder/Q-Former") from None
    vision_width = int(cls_token.shape[-1])
    patch_size = int(patch_w.shape[-1])
    grid = round(math.sqrt(pos_embed.shape[1] - 1))
    q_width = int(query.shape[-1])
    q_layers = _count_blocks(state, re.escape(_BERT) + r"encoder\.layer\.(\d+)\.")
    cross = sorted(
        {int(m.group(1)) for n in state if (m := re.match(re.escape(_BERT) + r"encoder\.layer\.(\d+)\.crossattention\.", n))}
    )
    cross_freq = cross[1] - cross[0] if len(cross) > 1 else max(q_layers, 1)
    llm_layers = int(meta["num_hidden_layers"])
    data: dict[str, Any] = {
        # Every size below overrides the preset; it only names where the values started.
        "preset": "phi3-mini",
        "tokenizer_dir": tokenizer_dir,
        "vision": {
            "image_size": patch_size * grid,
            "patch_size": patch_size,
            "hidden_size": vision_width,
            "num_layers": _count_blocks(state, re.escape(_VIT) + r"blocks\.(\d+)\."),
            "num_heads": vision_width // _EVA_HEAD_DIM,
            "intermediate_size": int(fc1.shape[0]),
            "layer_norm_eps": 1e-6,
        },
        "qformer": {
            "hidden_size": q_width,
            "num_layers": q_layers,
            "num_heads": max(q_width // _BERT_HEAD_DIM, 1),
            "intermediate_size": int(q_ffn.shape[0]),
            "cross_attention_frequency": cross_freq,
            "num_queries": int(query.shape[1]),
            "vocab_size": int(word_emb.shape[0]),
            "tokenizer_dir": qformer_tokenizer_dir,
        },
        "llm": {
            "hidden_size": int(meta["hidden_size"]),
            "num_layers": llm_layers,
            "num_heads": int(meta["num_attention_heads"]),
            "num_kv_heads": int(meta.get("num_key_value_heads") or meta["num_attention_heads"]),
            "intermediate_size": int(meta["intermediate_size"]),
            "vocab_size": int(meta["vocab_size"]),
            "max_position_embeddings": int(meta.get("max_position_embeddings", 4096)),
            "rope_theta": float(meta.get("rope_theta", 10000.0)),
            "rms_norm_eps": float(meta.get("rms_norm_eps", 1e-5)),
            "sliding_window": meta.get("sliding_window"),
        },
        "inject_layer_idx": _OFFICIAL_INJECT_LAYER_IDX,
        # The official heads read hidden_states[-2], the input of the last block.
        "ground_layer_idx": llm_layers - 1,
        "alpha": float(meta.get("alpha", 2.0)),
        "bidirectional_frames": bool(meta.get("bi_attention", True)),
    }
    return from_dict(ModelConfig, data)


def checkpoint_family(ckpt_dir: str | Path) -> str:
    """The model family a checkpoint directory holds, from its ``config.json`` alone (no weights
    read): its ``model.family`` (``d2vlm`` for checkpoints written before families existed,
    and for official D2VLM releases).

    Raises:
        FileNotFoundError: If the directory has no ``config.json``.
    """
    cfg_path = Path(ckpt_dir) / CONFIG_NAME
    if not cfg_path.is_file():
        raise FileNotFoundError(f"checkpoint {str(ckpt_dir)!r}: no {CONFIG_NAME}")
    meta = json.loads(cfg_path.read_text())
    if meta.get("format") != FORMAT:
        return "d2vlm"
    return str(meta["model"].get("family", "d2vlm"))


def _saved_model_config(meta: dict[str, Any]) -> ModelConfig:
    """The :class:`ModelConfig` of a project checkpoint's ``config.json``, retired keys dropped."""
    data = {k: v for k, v in meta["model"].items() if k not in _RETIRED_MODEL_KEYS}
    return from_dict(ModelConfig, data)


def native_state_dict(model: D2VLM | GroundedVideoLLM) -> dict[str, torch.Tensor]:
    """The model's state dict under plain module names with LoRA merged in.

    The live model is left unchanged: adapters are merged for the copy and unmerged again.
    """
    llm = model.llm
    wrapped = hasattr(llm, "merge_adapter")
    if wrapped:
        llm.merge_adapter()
    try:
        out = {}
        for name, tensor in model.state_dict().items():
            if "lora_" in name:
                continue
            name = name.replace("llm.base_model.model.", "llm.").replace(".base_layer.", ".")
            out[name] = tensor.detach().clone().contiguous()
    finally:
        if wrapped:
            llm.unmerge_adapter()
    return out


def save_pretrained(model: D2VLM | GroundedVideoLLM, cfg: ModelConfig, tokenizers: Tokenizers, out_dir: str | Path) -> Path:
    """Write a loadable checkpoint directory (merged weights, config, both tokenizers)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    cfg = resolve_vocab_sizes(cfg, tokenizers)
    ids = TokenIds.from_tokenizer(tokenizers.llm)
    save_file(native_state_dict(model), str(out_dir / WEIGHTS_NAME), metadata={"format": FORMAT})
    meta = {"format": FORMAT, "model": to_dict(cfg), "evi_token_id": ids.evi, "pad_token_id": ids.pad}
    (out_dir / CONFIG_NAME).write_text(json.dumps(meta, indent=2))
    tokenizers.llm.save_pretrained(str(out_dir / "tokenizer"))
    tokenizers.qformer.save_pretrained(str(out_dir / "qformer_tokenizer"))
    return out_dir


def _read_weights(ckpt_dir: Path) -> dict[str, torch.Tensor]:
    files = sorted(ckpt_dir.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{ckpt_dir}: no .safetensors weights found")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        if f.name.startswith("adapter_"):
            continue
        state.update(load_file(str(f)))
    return state


def from_pretrained(
    ckpt_dir: str | Path,
    *,
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
    qformer_tokenizer_dir: str | None = None,
) -> tuple[D2VLM | GroundedVideoLLM, Tokenizers, ModelConfig]:
    """Load a d2vlm_ray checkpoint (either family, as its config says), or an official D2VLM release directory.

    An official directory is recognised by its HF ``config.json`` (``model_type``
    ``etchat_phi3``); it is built with the sizes of its own config and weights
    (:func:`official_model_config`), its tokenizer is read from the same directory, and
    the Q-Former tokenizer from ``qformer_tokenizer_dir`` (the release does not ship one).

    Raises:
        FileNotFoundError: If the directory, its config or its weights are missing.
        ValueError: If the weights do not match the architecture (missing or extra keys).
    """
    ckpt_dir = Path(ckpt_dir)
    cfg_path = ckpt_dir / CONFIG_NAME
    if not cfg_path.is_file():
        raise FileNotFoundError(f"checkpoint {str(ckpt_dir)!r}: no {CONFIG_NAME}")
    meta: dict[str, Any] = json.loads(cfg_path.read_text())
    official = meta.get("format") != FORMAT
    state: dict[str, torch.Tensor] | None = None
    if official:
        if not qformer_tokenizer_dir:
            raise FileNotFoundError(
                "model.qformer.tokenizer_dir: the official checkpoint ships no Q-Former tokenizer; "
                "pass a local bert-base-uncased vocabulary directory"
            )
        state = _read_weights(ckpt_dir)
        cfg = official_model_config(
            meta, state, tokenizer_dir=str(ckpt_dir), qformer_tokenizer_dir=qformer_tokenizer_dir
        )
        llm_tok = load_llm_tokenizer(ckpt_dir)
        q_tok = load_qformer_tokenizer(qformer_tokenizer_dir)
    else:
        cfg = _saved_model_config(meta)
        llm_tok = load_llm_tokenizer(ckpt_dir / "tokenizer")
        q_tok = load_qformer_tokenizer(ckpt_dir / "qformer_tokenizer")
    tokenizers = Tokenizers(llm=llm_tok, qformer=q_tok)
    # Parameters on the meta device (no random init of billions of weights), buffers such
    # as RoPE frequencies real; the checkpoint's tensors are then assigned in place.
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=False):
        model = build_model(cfg, tokenizers)
    state = from_official_state_dict(state) if state is not None else _read_weights(ckpt_dir)
    expected = set(model.state_dict())
    missing, extra = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or extra:
        raise ValueError(f"checkpoint {str(ckpt_dir)!r} does not match the architecture: missing {missing[:5]}, extra {extra[:5]}")
    model.load_state_dict(state, strict=True, assign=True)
    model.to(device=device)
    if dtype is not None:
        model.to(dtype=dtype)
    model.vision.requires_grad_(False)
    model.eval()
    return model, tokenizers, cfg


def init_checkpoint(cfg: ModelConfig, out_dir: str | Path, seed: int = 0) -> Path:
    """Build a model from ``cfg`` (seeded random weights) and save it as a checkpoint.

    With ``cfg.llm.weights_dir`` / ``cfg.vision.weights_dir`` set (directories written by
    ``d2vlm-ray import-backbone``), the LLM / frame encoder start from those pretrained
    weights (:mod:`d2vlm_ray.model.backbones`); everything else stays random. The
    checkpoint then carries every weight, so nothing later reads the weights dirs. Every
    stage of a run (feature cache, training, evaluation, serving) loads the same weights
    from this directory, so the frame encoder id in cache keys agrees.

    Raises:
        d2vlm_ray.model.backbones.BackboneWeightsError: If a weights dir does not fit the
            configured architecture (the message names the directory).
    """
    from d2vlm_ray.model.builders import build_tokenizers

    tokenizers = build_tokenizers(cfg)
    torch.manual_seed(seed)
    model = build_model(cfg, tokenizers)
    if cfg.llm.weights_dir or cfg.vision.weights_dir:
        from d2vlm_ray.model.backbones import load_llm_weights, load_vision_weights

        if cfg.llm.weights_dir:
            rows = load_llm_weights(model.llm, cfg.llm.weights_dir)
            # Saved with the checkpoint, so a later lora.vocab_rows: new knows which rows are new.
            cfg = replace(cfg, llm=replace(cfg.llm, pretrained_vocab_size=rows))
            model.pretrained_vocab_size = rows
        if cfg.vision.weights_dir:
            # A Grounded-VideoLLM's image encoder is the spatial stream of its two-stream encoder.
            image_encoder = model.vision.image if cfg.family == "grounded_videollm" else model.vision
            load_vision_weights(image_encoder, cfg.vision.family, cfg.vision.weights_dir)
    return save_pretrained(model, cfg, tokenizers, out_dir)


def load_frame_encoder(
    ckpt_dir: str | Path, *, device: str | torch.device = "cpu", dtype: torch.dtype | None = None, chunk_frames: int = 64
) -> FrameEncoder:
    """Load only the frozen encoder of a checkpoint (for cache building): the vision tower of
    a D2VLM, or both streams of a Grounded-VideoLLM (its ``vision.*`` weights either way).

    Raises:
        FileNotFoundError: If the checkpoint is missing.
    """
    ckpt_dir = Path(ckpt_dir)
    cfg_path = ckpt_dir / CONFIG_NAME
    if not cfg_path.is_file():
        raise FileNotFoundError(f"checkpoint {str(ckpt_dir)!r}: no {CONFIG_NAME}")
    meta = json.loads(cfg_path.read_text())
    if meta.get("format") != FORMAT:
        model, _, cfg = from_pretrained(ckpt_dir, device=device, dtype=dtype)
        return build_frame_encoder(model, cfg.vision.image_size, chunk_frames)
    cfg = _saved_model_config(meta)
    vision = build_two_stream_vision(cfg) if cfg.family == "grounded_videollm" else build_vision_model(cfg.vision)
    prefix = "vision."
    state = {k[len(prefix) :]: v for k, v in load_file(str(ckpt_dir / WEIGHTS_NAME)).items() if k.startswith(prefix)}
    vision.load_state_dict(state, strict=True)
    vision.to(device=device)
    if dtype is not None:
        vision.to(dtype=dtype)
    if cfg.family == "grounded_videollm":
        return TwoStreamFrameEncoder(vision, chunk_frames)
    return VisionFrameEncoder(vision, cfg.vision.image_size, chunk_frames)
