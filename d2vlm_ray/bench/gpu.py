"""The ``gpu`` benchmark: a phi3-mini-size D2VLM SFT step under DeepSpeed ZeRO-2 on one GPU, and generation.

Runs only where CUDA is present; elsewhere :func:`run` returns a ``skipped`` result (no
checks, so ``python -m jobs.bench gpu`` exits 0). This module never imports Ray: the GPU
machine has its own Python and torch, and DeepSpeed may be installed there from a wheel.
It also runs without the job runner (``python -m d2vlm_ray.bench.gpu [key=value ...]``), which
prints the result as JSON.

**Model and step.** The ``phi3-mini`` preset (EVA ViT-g 39x1408, Q-Former 12x768, Phi-3-mini
32x3072, official vocabularies) with random weights in bf16, official LoRA (r 128 on
``qkv_proj``/``o_proj``, ``attention`` tuning mode). The tokenizers are the locally built
tiny ones (no downloads); the text is sized in *tokens*, so only the token ids differ
from a real run. One sample has ``frames`` frames (official: ~120 at 1 fps for a 2-minute
video) and ``text_tokens`` question + response tokens. A step = the frozen frame encoder's
forward on ``[F, 3, 224, 224]`` random pixels (``encode_frames``; off = features given, as
with the feature cache), then forward + backward + optimizer step of the SFT loss through a
single-process DeepSpeed engine (ZeRO ``zero_stage``, bf16, client AdamW).

**FLOPs and MFU** (:func:`step_flops`, :func:`mfu`)::

    step FLOPs = 6 · N_llm · T_llm  +  2 · N_vision · F · P   (when encode_frames)

with ``N_llm`` the LLM's matmul parameters (all LLM weights but the input embedding, LoRA
excluded), ``T_llm = F + text_tokens`` (one LLM token per frame) times the batch,
``N_vision`` the frame encoder's parameters and ``P`` its tokens per frame (patches + CLS).
6·N·T is the usual dense-training estimate (forward 2, backward 4); with a frozen LLM the
backward skips weight gradients, so the real work is nearer 4·N·T: the figure is the
conventional one, not a count. Attention-score FLOPs, the Q-Former and the heads are left
out (small here). ``MFU = step FLOPs / step time / peak``, with the dense bf16 peak of the
device from :data:`PEAK_BF16_TFLOPS`.

**Generation.** :func:`d2vlm_ray.model.generation.generate`, greedy, ``gen_new_tokens``
new tokens (no early stop: random weights rarely emit the end token, and every sample is
counted at its real length), batch sizes ``gen_batch_sizes``: new tokens per second.
"""

from __future__ import annotations

import json
import math
import os
import socket
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Any

PEAK_BF16_TFLOPS: dict[str, float] = {
    "H200": 989.0,
    "H100 SXM": 989.0,
    "H100 80GB HBM3": 989.0,
    "H100 NVL": 835.0,
    "H100 PCIe": 756.0,
    "H800": 989.0,
    "A100": 312.0,
    "A800": 312.0,
    "L40S": 362.0,
    "L4": 121.0,
    "A10G": 70.0,
    "A10": 125.0,
}
"""Dense (no sparsity) bf16 tensor-core peak in TFLOP/s by device-name fragment (vendor data sheets)."""


def peak_bf16_tflops(device_name: str) -> float | None:
    """The dense bf16 peak of a device from its name (``torch.cuda.get_device_name``), or ``None``.

    The longest fragment of :data:`PEAK_BF16_TFLOPS` found in the name wins; a bare "H100"
    is taken as the SXM part (989).
    """
    name = device_name.upper()
    best: tuple[int, float] | None = None
    for fragment, peak in PEAK_BF16_TFLOPS.items():
        if fragment.upper() in name and (best is None or len(fragment) > best[0]):
            best = (len(fragment), peak)
    if best is None and "H100" in name:
        return PEAK_BF16_TFLOPS["H100 SXM"]
    return best[1] if best else None


def step_flops(n_llm: int, llm_tokens: int, n_vision: int = 0, frames: int = 0, tokens_per_frame: int = 0) -> float:
    """Training FLOPs of one step: ``6·n_llm·llm_tokens + 2·n_vision·frames·tokens_per_frame``.

    Args:
        n_llm: LLM matmul parameters.
        llm_tokens: LLM tokens in the step (all samples).
        n_vision: Frozen frame-encoder parameters (0 = features given).
        frames: Frames encoded in the step (all samples).
        tokens_per_frame: Encoder tokens per frame (patches + CLS).

    Raises:
        ValueError: On a negative count.
    """
    if min(n_llm, llm_tokens, n_vision, frames, tokens_per_frame) < 0:
        raise ValueError("step_flops: counts must be non-negative")
    return 6.0 * n_llm * llm_tokens + 2.0 * n_vision * frames * tokens_per_frame


def mfu(flops: float, seconds: float, peak_tflops: float) -> float:
    """Model FLOPs utilisation: ``flops / seconds / (peak_tflops · 1e12)``.

    Raises:
        ValueError: If ``seconds`` or ``peak_tflops`` is not positive.
    """
    if seconds <= 0 or peak_tflops <= 0:
        raise ValueError(f"mfu: seconds and peak_tflops must be positive, got {seconds}, {peak_tflops}")
    return flops / seconds / (peak_tflops * 1e12)


@dataclass
class Config:
    """Settings of the ``gpu`` benchmark.

    Attributes:
        frames: Frames per sample (official ~120).
        text_tokens: Question + response LLM tokens per sample (official ~200).
        micro_batch_size: Samples per training step.
        steps: Timed training steps (median reported).
        warmup_steps: Untimed training steps first (allocator, kernels).
        encode_frames: The step includes the frozen frame encoder's forward.
        zero_stage: DeepSpeed ZeRO stage.
        gen_batch_sizes: Batch sizes of the generation measurement.
        gen_new_tokens: New tokens per generated sample.
        gen_repeats: Timed generate calls per batch size (after one warm-up call).
        seed: Seed of the random weights and inputs.
    """

    frames: int = 120
    text_tokens: int = 200
    micro_batch_size: int = 1
    steps: int = 10
    warmup_steps: int = 3
    encode_frames: bool = True
    zero_stage: int = 2
    gen_batch_sizes: list[int] = field(default_factory=lambda: [1, 8])
    gen_new_tokens: int = 64
    gen_repeats: int = 2
    seed: int = 0

    def validate(self) -> None:
        """Reject values that cannot be benchmarked (raised as ConfigError by the loader)."""
        if self.frames < 1 or self.text_tokens < 16 or self.micro_batch_size < 1:
            raise ValueError("frames >= 1, text_tokens >= 16 and micro_batch_size >= 1 are required")
        if self.steps < 1 or self.warmup_steps < 0 or self.gen_repeats < 1 or self.gen_new_tokens < 1:
            raise ValueError("steps, gen_repeats, gen_new_tokens >= 1 and warmup_steps >= 0 are required")
        if not self.gen_batch_sizes or min(self.gen_batch_sizes) < 1:
            raise ValueError(f"gen_batch_sizes must be positive, got {self.gen_batch_sizes}")
        if self.zero_stage not in (0, 1, 2):
            raise ValueError(f"zero_stage must be 0, 1 or 2 (single process), got {self.zero_stage}")


def skipped_result(reason: str) -> dict[str, Any]:
    """The result of a run that measured nothing (no checks, so the job exits 0)."""
    return {"skipped": True, "reason": reason, "summary": {"skipped": True, "reason": reason}, "checks": {}}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _sample_text(tokenizer: Any, n_tokens: int) -> tuple[str, str]:
    """A question and a one-span response (2 ``<evi>``) whose LLM tokens total about ``n_tokens``."""
    words = "the person picks up a red cup walks to the table and puts it down near the window".split()
    question_words = words * 2
    question = " ".join(question_words[:16]) + "?"
    response_head = "<evi></evi>The event happens in <evi>."
    used = len(tokenizer(question, add_special_tokens=False)["input_ids"]) + len(
        tokenizer(response_head, add_special_tokens=False)["input_ids"]
    )
    filler: list[str] = []
    while used + len(tokenizer(" ".join(filler), add_special_tokens=False)["input_ids"]) < n_tokens:
        filler.append(words[len(filler) % len(words)])
    response = "<evi></evi>" + " ".join(filler) + " The event happens in <evi>."
    return question, response


def _build(cfg: Config) -> tuple[Any, Any, Any]:
    """The phi3-mini-size model (bf16, on the GPU, LoRA applied), its tokenizers and config."""
    import torch

    from d2vlm_ray.config import ModelConfig, from_dict
    from d2vlm_ray.model.builders import Tokenizers, build_d2vlm
    from d2vlm_ray.model.lora import apply_lora
    from d2vlm_ray.model.tokenizer import build_tiny_llm_tokenizer, build_tiny_qformer_tokenizer

    model_cfg = from_dict(ModelConfig, {"preset": "phi3-mini"})
    tokenizers = Tokenizers(llm=build_tiny_llm_tokenizer(), qformer=build_tiny_qformer_tokenizer())
    torch.manual_seed(cfg.seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device("cuda"):
            model = build_d2vlm(model_cfg, tokenizers)
            apply_lora(model, model_cfg.lora)
    finally:
        torch.set_default_dtype(previous)
    model.to(device="cuda", dtype=torch.bfloat16)
    return model, tokenizers, model_cfg


def _param_counts(model: Any) -> dict[str, int]:
    """LLM matmul parameters (no input embedding, no LoRA), frame-encoder and trainable parameters."""
    n_llm = 0
    for name, p in model.llm.named_parameters():
        if "lora_" in name or "embed_tokens" in name:
            continue
        n_llm += p.numel()
    return {
        "llm_matmul": int(n_llm),
        "vision": int(sum(p.numel() for p in model.vision.parameters())),
        "total": int(sum(p.numel() for p in model.parameters())),
        "trainable": int(sum(p.numel() for p in model.parameters() if p.requires_grad)),
    }


def run(cfg: Config) -> dict[str, Any]:
    """Measure the SFT step and generation on the GPU, or return :func:`skipped_result` without CUDA.

    Returns:
        ``{"device", "params", "train", "generation", "summary", "checks"}``: step times,
        tokens/s, peak memory, FLOPs per step, MFU, generation tokens/s per batch size.
    """
    try:
        import torch
    except ImportError:
        return skipped_result("torch is not installed")
    if not torch.cuda.is_available():
        return skipped_result("no CUDA device: the gpu benchmark needs one (nothing measured)")
    try:
        import deepspeed
    except ImportError:
        return skipped_result("DeepSpeed is not installed on this machine (pip install its wheel)")

    from d2vlm_ray.config import DecodeSettings
    from d2vlm_ray.losses.sft import sft_loss
    from d2vlm_ray.model.generation import generate
    from d2vlm_ray.model.inputs import build_batch

    for key, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1"}.items():
        os.environ.setdefault(key, value)
    os.environ.setdefault("MASTER_PORT", str(_free_port()))
    device_name = torch.cuda.get_device_name(0)
    model, tokenizers, model_cfg = _build(cfg)
    params = _param_counts(model)
    image_size = model_cfg.vision.image_size
    tokens_per_frame = (image_size // model_cfg.vision.patch_size) ** 2 + 1
    question, response = _sample_text(tokenizers.llm, cfg.text_tokens)
    duration_s = float(cfg.frames)
    timestamps_s = [float(t) + 0.5 for t in range(cfg.frames)]
    span_s = (duration_s * 0.25, duration_s * 0.5)
    generator = torch.Generator(device="cuda").manual_seed(cfg.seed)
    pixels = torch.randn(cfg.frames, 3, image_size, image_size, device="cuda", dtype=torch.bfloat16, generator=generator)
    cached_patches = torch.randn(
        cfg.frames, tokens_per_frame, model_cfg.vision.hidden_size, device="cuda", dtype=torch.bfloat16
    )

    def patches_of_sample() -> torch.Tensor:
        # [F, 3, H, W] -> [F, P, C]: the frozen encoder, no autograd graph.
        if not cfg.encode_frames:
            return cached_patches
        with torch.no_grad():
            return model.vision(pixel_values=pixels).last_hidden_state

    def make_batch(n: int, train: bool) -> Any:
        patches = [patches_of_sample() for _ in range(n)]
        return build_batch(
            tokenizers.llm,
            tokenizers.qformer,
            [question] * n,
            patches,
            [timestamps_s] * n,
            [duration_s] * n,
            responses=[response] * n if train else None,
            spans_s=[[span_s]] * n if train else None,
            max_text_tokens=model_cfg.qformer.max_text_tokens,
        )

    class Objective(torch.nn.Module):
        def __init__(self, inner: Any) -> None:
            super().__init__()
            self.model = inner

        def forward(self, batch: Any) -> torch.Tensor:
            out = self.model(batch)
            return sft_loss(
                out.logits, out.labels, out.evidence_logits, out.evidence_queries, out.evidence_spans_idx
            ).total

    objective = Objective(model)
    optimizer = torch.optim.AdamW([p for p in objective.parameters() if p.requires_grad], lr=2e-5)
    ds_config = {
        "train_micro_batch_size_per_gpu": cfg.micro_batch_size,
        "gradient_accumulation_steps": 1,
        "train_batch_size": cfg.micro_batch_size,
        "zero_optimization": {
            "stage": cfg.zero_stage,
            "contiguous_gradients": True,
            "overlap_comm": True,
            "allgather_bucket_size": int(2e8),
            "reduce_bucket_size": int(2e8),
        },
        "bf16": {"enabled": True},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 1 << 30,
    }
    engine, _, _, _ = deepspeed.initialize(model=objective, optimizer=optimizer, config=ds_config)
    engine.train()
    probe = make_batch(cfg.micro_batch_size, True)
    # One LLM token per frame between the prefix and the suffix (question, header, response).
    llm_tokens = sum(len(pre) + len(p) + len(suf) for pre, p, suf in zip(probe.prefix_ids, probe.patches, probe.suffix_ids))
    text_tokens = llm_tokens - cfg.frames * cfg.micro_batch_size

    torch.cuda.reset_peak_memory_stats()
    step_s: list[float] = []
    losses: list[float] = []
    for step_idx in range(cfg.warmup_steps + cfg.steps):
        torch.cuda.synchronize()
        start = time.perf_counter()
        loss = engine(make_batch(cfg.micro_batch_size, True))
        engine.backward(loss)
        engine.step()
        torch.cuda.synchronize()
        if step_idx >= cfg.warmup_steps:
            step_s.append(time.perf_counter() - start)
        losses.append(float(loss.detach().float()))
    peak_train_bytes = torch.cuda.max_memory_allocated()
    median_step_s = statistics.median(step_s)
    flops = step_flops(
        params["llm_matmul"],
        llm_tokens,
        params["vision"] if cfg.encode_frames else 0,
        cfg.frames * cfg.micro_batch_size if cfg.encode_frames else 0,
        tokens_per_frame,
    )
    peak = peak_bf16_tflops(device_name)
    train = {
        "step_s": [round(x, 6) for x in step_s],
        "median_step_s": round(median_step_s, 6),
        "llm_tokens_per_step": llm_tokens,
        "text_tokens_per_sample": text_tokens // cfg.micro_batch_size,
        "tokens_per_s": round(llm_tokens / median_step_s, 2),
        "flops_per_step": flops,
        "achieved_tflops": round(flops / median_step_s / 1e12, 2),
        "mfu": round(mfu(flops, median_step_s, peak), 4) if peak else None,
        "peak_memory_gib": round(peak_train_bytes / 2**30, 2),
        "losses": losses,
    }

    engine.eval()
    settings = DecodeSettings(max_new_tokens=cfg.gen_new_tokens, do_sample=False)
    generation: dict[str, Any] = {}
    for batch_size in cfg.gen_batch_sizes:
        gen_batch = make_batch(batch_size, False)
        times: list[float] = []
        new_tokens = 0
        torch.cuda.reset_peak_memory_stats()
        for repeat in range(cfg.gen_repeats + 1):
            torch.cuda.synchronize()
            start = time.perf_counter()
            with torch.no_grad():
                results = generate(model, tokenizers.llm, gen_batch, settings)
            torch.cuda.synchronize()
            if repeat:
                times.append(time.perf_counter() - start)
                new_tokens = sum(len(r.token_ids) for r in results)
        median_s = statistics.median(times)
        generation[str(batch_size)] = {
            "wall_s": [round(x, 6) for x in times],
            "median_s": round(median_s, 6),
            "new_tokens": new_tokens,
            "tokens_per_s": round(new_tokens / median_s, 2),
            "peak_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
        }
    summary = {
        "device": device_name,
        "peak_bf16_tflops": peak,
        "train_tokens_per_s": train["tokens_per_s"],
        "train_median_step_s": train["median_step_s"],
        "mfu": train["mfu"],
        "peak_memory_gib": train["peak_memory_gib"],
        **{f"gen_tokens_per_s_b{b}": g["tokens_per_s"] for b, g in generation.items()},
    }
    checks = {
        "finite_losses": all(math.isfinite(x) for x in losses),
        "generated_tokens": all(g["new_tokens"] > 0 for g in generation.values()),
    }
    return {"device": device_name, "params": params, "train": train, "generation": generation,
            "summary": summary, "checks": checks}


def markdown(result: dict[str, Any], cfg: Config) -> str:
    """One Markdown fragment: step tokens/s, MFU, peak memory, generation tokens/s (or why skipped)."""
    if result.get("skipped"):
        return f"skipped: {result['reason']}."
    s, t = result["summary"], result["train"]
    mfu_text = f"MFU **{s['mfu'] * 100:.1f}%**" if s["mfu"] is not None else "MFU n/a (unknown device peak)"
    gen = ", ".join(f"batch {b}: {g['tokens_per_s']:.0f} tok/s" for b, g in result["generation"].items())
    return (
        f"{s['device']}: phi3-mini-size D2VLM SFT step (random bf16 weights, {cfg.frames} frames + "
        f"{cfg.text_tokens} text tokens, batch {cfg.micro_batch_size}, DeepSpeed ZeRO-{cfg.zero_stage}, "
        f"{'frame encoder in the step' if cfg.encode_frames else 'features given'}): "
        f"{s['train_median_step_s'] * 1e3:.0f} ms/step, {s['train_tokens_per_s']:.0f} LLM tok/s, "
        f"{t['achieved_tflops']:.0f} TFLOP/s, {mfu_text} of {s['peak_bf16_tflops']} TFLOPS, "
        f"peak {s['peak_memory_gib']:.1f} GiB; greedy generation of {cfg.gen_new_tokens} tokens: {gen}."
    )


def main(argv: list[str] | None = None) -> int:
    """Plain-script entry (no ``jobs.bench``, no Ray): ``key=value`` overrides, JSON result on stdout."""
    from d2vlm_ray.config import ConfigError, load_config

    try:
        cfg = load_config(Config, None, list(sys.argv[1:] if argv is None else argv))
    except ConfigError as exc:
        print(f"gpu bench: {exc}", file=sys.stderr)
        return 2
    result = run(cfg)
    print(json.dumps(result, indent=2, default=str))
    print(markdown(result, cfg))
    failed = [name for name, ok in result.get("checks", {}).items() if not ok]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
