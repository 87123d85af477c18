"""The only place configs meet constructors.

``build_model(cfg, tokenizers)`` builds the model of ``cfg.family`` (D2VLM or
Grounded-VideoLLM). The tiny presets build their tokenizers locally from the shared word
list; every other preset loads them from local directories named in the config (nothing
is downloaded, ever). A Grounded-VideoLLM tokenizer also gets the temporal tokens
``<0> … <M>``.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from transformers import LlamaConfig, LlamaForCausalLM, Phi3Config, Phi3ForCausalLM, PreTrainedTokenizerBase

from d2vlm_ray.config.presets import TINY_PRESETS
from d2vlm_ray.config.schema import ModelConfig
from d2vlm_ray.model.compressor import FrameCompressor, build_qformer
from d2vlm_ray.model.d2vlm import D2VLM
from d2vlm_ray.model.grounded_videollm import GroundedVideoLLM
from d2vlm_ray.model.temporal_tokens import add_temporal_tokens, first_temporal_id
from d2vlm_ray.model.two_stream import (
    TwoStreamFrameEncoder,
    TwoStreamProjector,
    build_two_stream_vision,
    stream_widths,
)
from d2vlm_ray.model.tokenizer import (
    TokenIds,
    build_tiny_llm_tokenizer,
    build_tiny_qformer_tokenizer,
    load_llm_tokenizer,
    load_qformer_tokenizer,
)
from d2vlm_ray.model.vision import VisionFrameEncoder, build_vision_model


@dataclass
class Tokenizers:
    """The LLM tokenizer and the Q-Former tokenizer of one model."""

    llm: PreTrainedTokenizerBase
    qformer: PreTrainedTokenizerBase


def build_tokenizers(cfg: ModelConfig) -> Tokenizers:
    """Build (tiny) or load (everything else) both tokenizers.

    Raises:
        FileNotFoundError: If a non-tiny preset names no existing tokenizer directory.
    """
    if cfg.tokenizer_dir:
        llm_tok = load_llm_tokenizer(cfg.tokenizer_dir)
    elif cfg.preset in TINY_PRESETS:
        llm_tok = build_tiny_llm_tokenizer()
    else:
        raise FileNotFoundError(
            "model.tokenizer_dir: set it to a local directory holding the LLM tokenizer "
            "(the checkpoint's own tokenizer files); nothing is downloaded"
        )
    if cfg.family == "grounded_videollm":
        add_temporal_tokens(llm_tok, cfg.gvl.num_temporal_tokens)
    if cfg.qformer.tokenizer_dir:
        q_tok = load_qformer_tokenizer(cfg.qformer.tokenizer_dir)
    elif cfg.preset in TINY_PRESETS:
        q_tok = build_tiny_qformer_tokenizer()
    else:
        raise FileNotFoundError(
            "model.qformer.tokenizer_dir: set it to a local directory with a bert-base-uncased "
            "WordPiece vocabulary (vocab.txt); nothing is downloaded"
        )
    return Tokenizers(llm=llm_tok, qformer=q_tok)


def resolve_vocab_sizes(cfg: ModelConfig, tokenizers: Tokenizers | None) -> ModelConfig:
    """Fill ``vocab_size: 0`` (tiny presets) from the tokenizers' lengths."""
    llm_cfg, q_cfg = cfg.llm, cfg.qformer
    if llm_cfg.vocab_size <= 0:
        if tokenizers is None:
            raise ValueError("model.llm.vocab_size: 0 means 'from the tokenizer', but no tokenizer was given")
        llm_cfg = replace(llm_cfg, vocab_size=len(tokenizers.llm))
    if q_cfg.vocab_size <= 0:
        if tokenizers is None:
            raise ValueError("model.qformer.vocab_size: 0 means 'from the tokenizer', but no tokenizer was given")
        q_cfg = replace(q_cfg, vocab_size=len(tokenizers.qformer))
    return replace(cfg, llm=llm_cfg, qformer=q_cfg)


def build_llm(cfg: ModelConfig, pad_token_id: int) -> Phi3ForCausalLM | LlamaForCausalLM:
    """The ``cfg.llm.family`` causal LM with eager attention (the explicit 4D mask needs it)
    and untied embeddings (D2VLM trains embed_tokens and lm_head separately).

    Raises:
        ValueError: On an unknown family.
    """
    c = cfg.llm
    # Both families: eager attention (the explicit 4-D mask needs it) and untied embeddings.
    common = dict(
        vocab_size=c.vocab_size,
        hidden_size=c.hidden_size,
        intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_layers,
        num_attention_heads=c.num_heads,
        num_key_value_heads=c.num_kv_heads,
        max_position_embeddings=c.max_position_embeddings,
        rope_theta=c.rope_theta,
        rms_norm_eps=c.rms_norm_eps,
        tie_word_embeddings=False,
        pad_token_id=pad_token_id,
        bos_token_id=None,
        eos_token_id=None,
        attn_implementation="eager",
    )
    if c.family == "llama":
        return LlamaForCausalLM(LlamaConfig(**common, hidden_act="silu", attention_bias=False, mlp_bias=False))
    if c.family != "phi3":
        raise ValueError(f"model.llm.family: unknown family {c.family!r}")
    hf_cfg = Phi3Config(
        **common, original_max_position_embeddings=c.max_position_embeddings, sliding_window=c.sliding_window
    )
    return Phi3ForCausalLM(hf_cfg)


def build_d2vlm(
    cfg: ModelConfig,
    tokenizers: Tokenizers | None = None,
    *,
    evi_token_id: int | None = None,
    pad_token_id: int | None = None,
) -> D2VLM:
    """Build D2VLM from its config (random weights; load checkpoints separately).

    Args:
        cfg: Architecture config (validated).
        tokenizers: Tokenizers to size vocabularies and find special ids; may be omitted
            when ``evi_token_id``/``pad_token_id`` and vocab sizes are given (e.g. to build
            on the meta device).
        evi_token_id: Id of ``<evi>`` when no tokenizer is given (official 32011).
        pad_token_id: Padding id when no tokenizer is given (official 32000).
    """
    cfg.validate()
    cfg = resolve_vocab_sizes(cfg, tokenizers)
    if tokenizers is not None:
        ids = TokenIds.from_tokenizer(tokenizers.llm)
        evi_token_id, pad_token_id = ids.evi, ids.pad
    if evi_token_id is None or pad_token_id is None:
        raise ValueError("build_d2vlm: give tokenizers, or both evi_token_id and pad_token_id")
    vision = build_vision_model(cfg.vision)
    qformer = build_qformer(cfg.qformer, cfg.vision.hidden_size, cfg.qformer.vocab_size)
    compressor = FrameCompressor(qformer, cfg.vision.hidden_size, cfg.llm.hidden_size, cfg.qformer.num_queries)
    llm = build_llm(cfg, pad_token_id)
    return D2VLM(
        vision,
        compressor,
        llm,
        evi_token_id=evi_token_id,
        inject_layer_idx=cfg.inject_layer_idx,
        ground_layer_idx=cfg.ground_layer_idx,
        key_layer_idx=cfg.key_layer_idx,
        bidirectional_frames=cfg.bidirectional_frames,
        evidence_injection=cfg.evidence_injection,
        alpha=cfg.alpha,
        span_threshold=cfg.span_threshold,
        pretrained_vocab_size=cfg.llm.pretrained_vocab_size,
    )


def build_grounded_videollm(
    cfg: ModelConfig,
    tokenizers: Tokenizers | None = None,
    *,
    evi_token_id: int | None = None,
    zero_token_id: int | None = None,
    pad_token_id: int | None = None,
) -> GroundedVideoLLM:
    """Build Grounded-VideoLLM from its config (random weights; load checkpoints separately).

    Args:
        cfg: Architecture config (validated) with ``family: grounded_videollm``.
        tokenizers: Tokenizers (the LLM's with ``<0> … <M>``); may be omitted when the ids
            and vocab sizes are given.
        evi_token_id: Id of ``<evi>`` when no tokenizer is given.
        zero_token_id: Id of ``<0>`` when no tokenizer is given.
        pad_token_id: Padding id when no tokenizer is given.
    """
    cfg.validate()
    cfg = resolve_vocab_sizes(cfg, tokenizers)
    if tokenizers is not None:
        ids = TokenIds.from_tokenizer(tokenizers.llm)
        evi_token_id, pad_token_id = ids.evi, ids.pad
        zero_token_id = first_temporal_id(tokenizers.llm, cfg.gvl.num_temporal_tokens)
    if evi_token_id is None or pad_token_id is None or zero_token_id is None:
        raise ValueError("build_grounded_videollm: give tokenizers, or the <evi>, <0> and pad ids")
    image_width, video_width, _ = stream_widths(cfg)
    return GroundedVideoLLM(
        build_two_stream_vision(cfg),
        TwoStreamProjector(image_width, video_width, cfg.llm.hidden_size, cfg.gvl),
        build_llm(cfg, pad_token_id),
        evi_token_id=evi_token_id,
        first_temporal_id=zero_token_id,
        num_temporal_tokens=cfg.gvl.num_temporal_tokens,
        alpha=cfg.alpha,
        pretrained_vocab_size=cfg.llm.pretrained_vocab_size,
    )


def build_model(cfg: ModelConfig, tokenizers: Tokenizers | None = None) -> D2VLM | GroundedVideoLLM:
    """The model of ``cfg.family`` (random weights), sized by ``cfg`` and the tokenizers.

    Raises:
        ValueError: On an unknown family (or any invalid config field).
    """
    cfg.validate()
    if cfg.family == "grounded_videollm":
        return build_grounded_videollm(cfg, tokenizers)
    return build_d2vlm(cfg, tokenizers)


def build_frame_encoder(
    model: D2VLM | GroundedVideoLLM, image_size: int, chunk_frames: int = 64
) -> VisionFrameEncoder | TwoStreamFrameEncoder:
    """The model's frozen encoder as a :class:`d2vlm_ray.types.FrameEncoder`: the vision tower
    (D2VLM), or both streams (Grounded-VideoLLM), whose output the feature cache stores."""
    if model.family == "grounded_videollm":
        return TwoStreamFrameEncoder(model.vision, chunk_frames)
    return VisionFrameEncoder(model.vision, image_size, chunk_frames)


def seed_everything(seed: int) -> torch.Generator:
    """Seed torch's global RNG (weight init) and return a generator for sampling."""
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)
