"""Config dataclasses of the model core.

These hold *architecture* and decoding settings only. Builders
(:mod:`d2vlm_ray.model.builders`) turn them into constructor arguments; no
``nn.Module`` ever receives a config object. Job configs (training, evaluation,
serving) nest :class:`ModelConfig` and add their own sections.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal


VISION_FAMILIES = ("eva", "efficientnet_lite", "clip")
"""Frame-encoder families :func:`d2vlm_ray.model.vision.build_vision_model` builds."""

LLM_FAMILIES = ("phi3", "llama")
"""Language-model families :func:`d2vlm_ray.model.builders.build_llm` builds."""

MODEL_FAMILIES = ("d2vlm", "grounded_videollm")
"""Grounding strategies :func:`d2vlm_ray.model.builders.build_model` builds: D2VLM's evidence
tokens and similarity head, or Grounded-VideoLLM's two-stream encoder and temporal tokens."""

# The linear layers peft can put adapters on, per LLM family (transformers' module names).
LORA_TARGETS: dict[str, tuple[str, ...]] = {
    "phi3": ("qkv_proj", "o_proj", "gate_up_proj", "down_proj"),
    "llama": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
}

# EfficientNet-Lite downsamples by 2 five times: its last feature map is image_size / 32 wide.
EFFICIENTNET_STRIDE = 32


@dataclass
class VisionConfig:
    """The frozen frame encoder: EVA ViT-g / BLIP-2 (official), an EfficientNet-Lite, or a CLIP ViT.

    Attributes:
        family: ``eva`` (the official BLIP-2 ViT), ``efficientnet_lite`` (a CNN whose last
            feature map, flattened, gives the patch features; no pooling, no classifier) or
            ``clip`` (transformers' ``CLIPVisionModel``, patches of its second-to-last layer;
            the image side of Grounded-VideoLLM, whose official weights are Phi-3.5-V's
            CLIP ViT-L/14 at 336 px).
        image_size: Square input side in pixels (official 224).
        patch_size: Patch side in pixels (official 14 → 16×16 patches). For
            ``efficientnet_lite`` it is the network's output stride and must be 32
            (224 px → 7×7 = 49 patches).
        hidden_size: Patch feature width C (official 1408; EfficientNet-Lite's head 1280).
        num_layers: Transformer blocks kept (official 39 of EVA-G's 40; no final norm). eva only.
        num_heads: Attention heads (official 16). eva only.
        intermediate_size: MLP width (official 6144). eva only.
        layer_norm_eps: LayerNorm epsilon (official 1e-6). eva only.
        variant: EfficientNet-Lite variant (``lite0`` … ``lite4``). efficientnet_lite only.
        width_coefficient: Channel multiplier overriding the variant's; 0 keeps the variant's
            (whose stem and 1280-wide head are not scaled). A non-zero value scales the head
            too, which is how tests build a narrow random encoder. efficientnet_lite only.
        depth_coefficient: Block-repeat multiplier overriding the variant's; 0 keeps it.
        weights_dir: Local directory written by ``d2vlm-ray import-backbone`` (its
            ``vision/``) whose weights initialise the encoder when
            :func:`d2vlm_ray.model.checkpoint.init_checkpoint` first builds a model. Empty =
            random. Checkpoints carry every weight, so loading one never reads it.
    """

    family: Literal["eva", "efficientnet_lite", "clip"] = "eva"
    image_size: int = 224
    patch_size: int = 14
    hidden_size: int = 1408
    num_layers: int = 39
    num_heads: int = 16
    intermediate_size: int = 6144
    layer_norm_eps: float = 1e-6
    variant: str = "lite0"
    width_coefficient: float = 0.0
    depth_coefficient: float = 0.0
    weights_dir: str = ""


@dataclass
class VideoEncoderConfig:
    """The frozen video encoder of Grounded-VideoLLM's temporal stream (transformers' TimeSformer).

    The official model uses InternVideo2-1B (not in transformers); its weights do not map
    onto TimeSformer (see :mod:`d2vlm_ray.model.two_stream`). Unused by the ``d2vlm`` family.

    Attributes:
        image_size: Square input side in pixels (official InternVideo2: 224).
        patch_size: Patch side in pixels (14 → 16×16 patches at 224).
        hidden_size: Token width C_v.
        num_layers: Transformer blocks.
        num_heads: Attention heads.
        intermediate_size: MLP width.
        num_frames: Frames TimeSformer takes per segment (its layers reshape by this count,
            so every segment is resampled to it; see :mod:`d2vlm_ray.model.two_stream`).
        layer_norm_eps: LayerNorm epsilon.
    """

    image_size: int = 224
    patch_size: int = 16
    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    intermediate_size: int = 3072
    num_frames: int = 8
    layer_norm_eps: float = 1e-6


@dataclass
class GVLSettings:
    """Grounded-VideoLLM's two-stream layout and temporal vocabulary (official values in brackets).

    Attributes:
        num_segments: K segments a video's sampled frames are split into, contiguous and as
            equal as possible (official 12); videos with fewer frames get one per frame.
        spatial_pool: Side of the 2-D average pool over a keyframe's patch grid; the spatial
            stream has ``spatial_pool ** 2`` tokens per segment (official 8 → 64).
        temporal_pool: Side of the 2-D pool over each frame of the temporal stream
            (official 4 → 16 tokens per frame).
        temporal_frames: Frames per segment the temporal stream keeps after pooling over
            time (official 8, every frame of a segment); the stream has
            ``temporal_frames * temporal_pool ** 2`` tokens per segment.
        num_temporal_tokens: M; the vocabulary gains ``<0> … <M>`` and a time t in a video
            of duration d becomes ``<round(t / d · M)>`` (official 300).
    """

    num_segments: int = 12
    spatial_pool: int = 8
    temporal_pool: int = 4
    temporal_frames: int = 8
    num_temporal_tokens: int = 300


@dataclass
class QFormerConfig:
    """The query-conditioned compressor (InstructBLIP Q-Former plus the D2VLM aggregator).

    Attributes:
        hidden_size: Q-Former width (official 768).
        num_layers: BERT layers (official 12).
        num_heads: Attention heads (official 12).
        intermediate_size: FFN width (official 3072).
        cross_attention_frequency: A cross-attention block every N layers (official 2).
        num_queries: Learned query tokens (official 32).
        vocab_size: WordPiece vocabulary size (official 30523, bert-base-uncased + ``[DEC]``).
        max_text_tokens: Question tokens kept, truncated from the left (official 256).
        tokenizer_dir: Local directory of the Q-Former's WordPiece tokenizer (``vocab.txt``).
            Empty means "the tokenizer saved with the checkpoint".
    """

    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    intermediate_size: int = 3072
    cross_attention_frequency: int = 2
    num_queries: int = 32
    vocab_size: int = 30523
    max_text_tokens: int = 256
    tokenizer_dir: str = ""


@dataclass
class LLMConfig:
    """The language model: Phi-3 (official) or Llama (e.g. SmolLM2).

    Attributes:
        family: ``phi3`` (official) or ``llama``; selects the transformers class.
        hidden_size: Model width D (official 3072).
        num_layers: Decoder blocks (official 32).
        num_heads: Attention heads (official 32).
        num_kv_heads: Key/value heads (official 32, no GQA).
        intermediate_size: MLP width (official 8192).
        vocab_size: Embedding rows (official 32064, padded).
        max_position_embeddings: Context length (official 4096).
        rope_theta: RoPE base (official 10000).
        rms_norm_eps: RMSNorm epsilon (official 1e-5).
        sliding_window: Phi-3's sliding window; our explicit 4D mask does not apply it.
        weights_dir: Local HF-style directory (``import-backbone``'s ``llm/``) whose weights
            initialise the LLM when :func:`d2vlm_ray.model.checkpoint.init_checkpoint` first
            builds a model; its vocabulary rows are copied and the rows of added tokens
            start at the mean embedding. Empty = random. Loading a checkpoint never reads it.
        pretrained_vocab_size: Vocabulary rows that came from pretrained weights (set by
            ``init_checkpoint`` when it loads ``weights_dir``; 0 = none). The rows after them
            are the tokens the project added (``<evi>``, ``</evi>``); ``lora.vocab_rows: new``
            trains only those.
    """

    family: Literal["phi3", "llama"] = "phi3"
    hidden_size: int = 3072
    num_layers: int = 32
    num_heads: int = 32
    num_kv_heads: int = 32
    intermediate_size: int = 8192
    vocab_size: int = 32064
    max_position_embeddings: int = 4096
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    sliding_window: int | None = 2048
    weights_dir: str = ""
    pretrained_vocab_size: int = 0


@dataclass
class LoraSettings:
    """LoRA and the trainable-parameter policy (official defaults).

    Attributes:
        r: LoRA rank (official 128).
        alpha: LoRA alpha (official 256, scale 2).
        dropout: LoRA dropout (official 0.05).
        target_modules: LLM linear layers that get adapters (official Phi-3 qkv_proj, o_proj;
            names must exist in the chosen ``llm.family``, see :data:`LORA_TARGETS`).
        tuning_mode: ``attention`` = the official policy (LoRA, full embeddings and lm_head,
            both heads, Q-Former attention and projector); ``full_compressor`` = the official
            policy plus the rest of the Q-Former (BERT embeddings and FFNs), for a Q-Former
            that starts random rather than from InstructBLIP; ``heads`` = LoRA and heads
            only; ``all`` = everything except the frozen frame encoder; ``projectors`` =
            Grounded-VideoLLM's stream projectors alone (its stage 1). Every mode but
            ``heads`` trains a Grounded-VideoLLM's projectors.
        vocab_rows: Which rows of a trained ``embed_tokens``/``lm_head`` learn: ``all``
            (official) or ``new``, only the rows of added tokens (after
            ``llm.pretrained_vocab_size``). Every output-head row gets a gradient on every
            step, so with ``all`` a rate that suits freshly initialised parts moves a pretrained
            vocabulary away from the LLM it came from; with ``new`` the pretrained rows get a
            zero gradient and AdamW (no weight decay) leaves them exactly as they were.
    """

    r: int = 128
    alpha: int = 256
    dropout: float = 0.05
    target_modules: tuple[str, ...] = ("qkv_proj", "o_proj")
    tuning_mode: Literal["attention", "full_compressor", "heads", "all", "projectors"] = "attention"
    vocab_rows: Literal["all", "new"] = "all"


@dataclass
class ModelConfig:
    """The whole architecture of either model family plus its grounding constants.

    Attributes:
        preset: Name of the preset these values started from (``tiny``, ``phi3-mini``, ...).
        family: ``d2vlm`` (evidence tokens, similarity head; the default) or
            ``grounded_videollm`` (two-stream encoder, temporal tokens ``<0> … <M>``). The
            Grounded-VideoLLM family uses ``vision`` as its image encoder, ``video`` and
            ``gvl``; it has no Q-Former (``qformer`` only names its tokenizer), no grounding
            heads and no ``<evi>`` injection.
        vision: Frame encoder settings (the spatial stream's image encoder for Grounded-VideoLLM).
        video: Video encoder of Grounded-VideoLLM's temporal stream.
        gvl: Grounded-VideoLLM's segments, pooling and temporal vocabulary.
        qformer: Compressor settings.
        llm: Language-model settings.
        tokenizer_dir: Directory of the LLM tokenizer (HF format). Empty means
            "build the tiny tokenizer locally" for ``tiny`` and is an error otherwise.
        inject_layer_idx: ``hidden_states`` index whose frame states are averaged into
            ``<evi>`` embeddings (official 6, the output of block 6; 0 = the frame tokens
            themselves, i.e. the LLM's input). A pretrained LLM's middle layers can carry
            massive activations that would swamp the ``<evi>`` embedding they are added to
            (SmolLM2-135M at layer 6: token norm ~140, one dimension ~750, against ~3 for its
            token embeddings), which is why ``real-small`` injects the frame tokens.
        ground_layer_idx: ``hidden_states`` index the grounding heads read (official
            ``num_layers - 1``, the input of the last block; ``num_layers`` = the output of the
            final norm).
        key_layer_idx: ``hidden_states`` index of the frame states the frame head reads
            (None = ``ground_layer_idx``, the official layout: queries and keys from one
            layer). A pretrained LLM's late frame states can carry little of what tells two
            scenes apart: on SmolLM2-135M with EfficientNet-Lite0 frames, heads fitted on
            frozen states placed the top frame inside the right clip for 0.94 of the held-out
            montage queries about clips seen in training with keys from layer 0 (the frame
            tokens) after 800 updates, and for 0.25 with keys from the final norm, which is
            why ``real-small`` reads its keys at 0 and its queries at the final norm.
        alpha: Base of the soft grounding targets ``alpha ** -distance`` (official 2). The
            model's constant, saved with the checkpoint (the official config carries it
            too): the SFT and FPO losses and preference evaluation all read it from here.
        span_threshold: Fraction of the max frame probability kept when decoding a span
            (official 0.6); generation reads it from the model.
        bidirectional_frames: Frames attend to each other both ways (official True).
        evidence_injection: Add event features to ``<evi>`` embeddings (official True).
        lora: LoRA and trainable-parameter policy.
    """

    preset: str = "phi3-mini"
    family: Literal["d2vlm", "grounded_videollm"] = "d2vlm"
    vision: VisionConfig = field(default_factory=VisionConfig)
    video: VideoEncoderConfig = field(default_factory=VideoEncoderConfig)
    gvl: GVLSettings = field(default_factory=GVLSettings)
    qformer: QFormerConfig = field(default_factory=QFormerConfig)
    llm: LLMConfig = field(default_factory=LLMConfig)
    tokenizer_dir: str = ""
    inject_layer_idx: int = 6
    ground_layer_idx: int = 31
    key_layer_idx: int | None = None
    alpha: float = 2.0
    span_threshold: float = 0.6
    bidirectional_frames: bool = True
    evidence_injection: bool = True
    lora: LoraSettings = field(default_factory=LoraSettings)

    def validate(self) -> None:
        """Cross-field checks; raises ``ValueError`` naming the field."""
        if self.family not in MODEL_FAMILIES:
            raise ValueError(f"model.family: unknown family {self.family!r}; choose one of {list(MODEL_FAMILIES)}")
        if self.family == "grounded_videollm":
            g = self.gvl
            for name in ("num_segments", "spatial_pool", "temporal_pool", "temporal_frames"):
                if getattr(g, name) < 1:
                    raise ValueError(f"model.gvl.{name}: must be >= 1, got {getattr(g, name)}")
            if g.num_temporal_tokens < 1:
                raise ValueError(f"model.gvl.num_temporal_tokens: must be >= 1, got {g.num_temporal_tokens}")
            if self.video.image_size % self.video.patch_size:
                raise ValueError("model.video: image_size must be a multiple of patch_size")
        if self.llm.family not in LLM_FAMILIES:
            raise ValueError(f"model.llm.family: unknown family {self.llm.family!r}; choose one of {list(LLM_FAMILIES)}")
        if self.vision.family not in VISION_FAMILIES:
            raise ValueError(
                f"model.vision.family: unknown family {self.vision.family!r}; choose one of {list(VISION_FAMILIES)}"
            )
        known = LORA_TARGETS[self.llm.family]
        unknown = [m for m in self.lora.target_modules if m not in known]
        if unknown or not self.lora.target_modules:
            raise ValueError(
                f"model.lora.target_modules: {unknown or '(empty)'} not in the {self.llm.family} LLM; "
                f"choose from {list(known)}"
            )
        if self.vision.family == "efficientnet_lite":
            if self.vision.patch_size != EFFICIENTNET_STRIDE:
                raise ValueError(
                    f"model.vision.patch_size: must be {EFFICIENTNET_STRIDE} (the output stride) for "
                    f"efficientnet_lite, got {self.vision.patch_size}"
                )
            if self.vision.variant not in tuple(f"lite{i}" for i in range(5)):
                raise ValueError(f"model.vision.variant: unknown EfficientNet-Lite variant {self.vision.variant!r}")
        if not 0 <= self.inject_layer_idx < self.ground_layer_idx <= self.llm.num_layers:
            raise ValueError(
                "model: need 0 <= inject_layer_idx < ground_layer_idx <= llm.num_layers, got "
                f"inject_layer_idx={self.inject_layer_idx}, ground_layer_idx={self.ground_layer_idx}, "
                f"llm.num_layers={self.llm.num_layers}"
            )
        if self.key_layer_idx is not None and not 0 <= self.key_layer_idx <= self.llm.num_layers:
            raise ValueError(
                f"model.key_layer_idx: need 0 <= key_layer_idx <= llm.num_layers ({self.llm.num_layers}) or null, "
                f"got {self.key_layer_idx}"
            )
        if self.vision.image_size % self.vision.patch_size:
            raise ValueError("model.vision: image_size must be a multiple of patch_size")
        if not 0.0 < self.span_threshold <= 1.0:
            raise ValueError("model.span_threshold must be in (0, 1]")
        if self.alpha <= 1.0:
            raise ValueError("model.alpha must be > 1 (targets decay as alpha ** -distance)")

    @staticmethod
    def preset_defaults(name: str) -> dict[str, Any]:
        """The field values of a named preset, used when a YAML sets ``preset:``."""
        from d2vlm_ray.config.presets import preset_dict

        return preset_dict(name)


@dataclass
class DecodeSettings:
    """How to generate.

    Attributes:
        max_new_tokens: Hard bound on generated tokens (required; never unbounded).
        do_sample: Sample instead of greedy argmax.
        temperature: Sampling temperature (official 0.2 with sampling).
        top_p: Nucleus sampling mass (1.0 = off).
        repetition_penalty: >1 penalises tokens already generated, except ``<evi>``
            (official 1.2 on rar/eca/rvq only, else 1.0).
        seed: Seed of the sampling generator.
        inject_evidence: Add event features to generated ``<evi>`` embeddings; switching it
            off is the ablation that shows what evidence injection is worth.
    """

    max_new_tokens: int = 64
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int = 0
    inject_evidence: bool = True

    def validate(self) -> None:
        """Reject settings that would hang or divide by zero."""
        if self.max_new_tokens < 1:
            raise ValueError("decode.max_new_tokens must be >= 1")
        if self.do_sample and self.temperature <= 0:
            raise ValueError("decode.temperature must be > 0 when do_sample is true")
        if not 0 < self.top_p <= 1:
            raise ValueError("decode.top_p must be in (0, 1]")
        if self.repetition_penalty <= 0:
            raise ValueError("decode.repetition_penalty must be > 0")
