"""Typed configs of the SFT and FPO training jobs.

A job YAML (``jobs/configs/sft_*.yaml``, ``fpo_*.yaml``) is loaded into :class:`SFTJobConfig`
or :class:`FPOJobConfig` with :func:`d2vlm_ray.config.load_config`; the config crosses
into Ray Train workers as a plain dict (:func:`d2vlm_ray.config.to_dict`) and is rehydrated
there with :func:`config_from_dict`.

Where the model comes from:

- ``init_from: tiny`` builds a random model from the ``model`` section (which must use
  the ``tiny`` preset) with :func:`d2vlm_ray.model.checkpoint.init_checkpoint` and
  ``seed``, saved once under ``<run dir>/init`` so every worker (and the feature cache)
  sees the same frame-encoder weights;
- ``init_from: DIR`` loads a checkpoint directory (the SFT output for FPO). The
  architecture then comes from the checkpoint and only ``model.lora`` is read from the
  job config.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from d2vlm_ray.cache.spec import FeatureSpec
from d2vlm_ray.config.load import ConfigError, from_dict
from d2vlm_ray.config.schema import ModelConfig
from d2vlm_ray.config.presets import TINY_PRESETS

Stage = Literal["sft", "fpo"]


def _tiny_model() -> ModelConfig:
    return from_dict(ModelConfig, {"preset": "tiny"})


@dataclass
class DataSettings:
    """Training and validation inputs.

    Attributes:
        train: SFT: an ``evi.json`` annotation file. FPO: a Parquet file or folder of
            :class:`d2vlm_ray.types.PreferencePair` rows.
        val: ``evi.json`` of the validation split for the grounding eval ("" = none).
        val_pairs: FPO only: Parquet of held-out pairs for preference accuracy ("" = none).
        video_root: Folder or URL prefix that relative video paths are joined to.
        decode_on_miss: Decode and encode a video whose features are not cached; when
            false a miss raises :class:`d2vlm_ray.cache.FeatureMissingError`.
        tasks: Keep only these task codes (SFT; empty = all).
        task_repeats: SFT: how many times each record of a task appears per epoch
            (e.g. ``{gqa: 2}`` oversamples a task that is rare in the annotations); tasks
            not named appear once.
        max_samples: Use at most this many training samples (0 = all), for smoke runs.
        max_text_tokens: Q-Former question tokens kept.
        captions_only: SFT: train on video-caption pairs made from the dense-captioning
            records (:func:`d2vlm_ray.data.annotations.caption_records`: the captions in order,
            no times), Grounded-VideoLLM's stage 1; ``tasks`` then filters nothing.
    """

    train: str = ""
    val: str = ""
    val_pairs: str = ""
    video_root: str = ""
    decode_on_miss: bool = True
    tasks: list[str] = field(default_factory=list)
    task_repeats: dict[str, int] = field(default_factory=dict)
    max_samples: int = 0
    max_text_tokens: int = 256
    captions_only: bool = False


@dataclass
class OptimSettings:
    """AdamW with two learning rates, cosine schedule with linear warmup (spec §4.2).

    Attributes:
        lr: Learning rate of every trainable non-LoRA parameter (official 2e-5).
        lora_lr: Learning rate of the LoRA A/B matrices (official 5e-5).
        embedding_lr: Learning rate of the LLM's token embeddings and output head when
            they are trained; 0 = ``lr`` (official). A pretrained LLM whose new parts (Q-Former,
            heads) need a large ``lr`` keeps its vocabulary at a fine-tuning rate here: every
            output-head row gets a gradient on every step.
        compressor_lr: Learning rate of the Q-Former compressor's trained weights; 0 = ``lr``
            (official). After a head warm-up (``head_warmup``) the heads start fitted to the
            features the compressor and LoRA produce; fine-tuning those features at the
            heads' rate undid the fit in ``real-small`` (LP-FT: fine-tune the features slower
            than the probe).
        weight_decay: AdamW weight decay (official 0).
        betas: AdamW ``(beta1, beta2)``.
        eps: AdamW epsilon.
        warmup_ratio: Fraction of the optimizer steps spent warming up (official 0.03).
        micro_batch_size: Samples (SFT) or pairs (FPO) per worker per forward.
        grad_accum: Micro-batches per optimizer step (official 1 for SFT, 8 for FPO).
        max_grad_norm: Gradient-clipping norm; 0 disables clipping (the official runs
            clip nothing, see spec §4.2).
        epochs: Passes over the training data (ignored when ``max_steps`` > 0).
        max_steps: Optimizer steps to run; 0 = ``epochs`` passes.
    """

    lr: float = 2e-5
    lora_lr: float = 5e-5
    embedding_lr: float = 0.0
    compressor_lr: float = 0.0
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    warmup_ratio: float = 0.03
    micro_batch_size: int = 1
    grad_accum: int = 1
    max_grad_norm: float = 0.0
    epochs: int = 1
    max_steps: int = 0


@dataclass
class LossSettings:
    """Weights of the SFT terms (also FPO's SFT regulariser) and FPO's preference term.

    Attributes:
        grounding_weight: Weight of the grounding BCE (official 10).
        consistency_weight: Weight of the grounding/answer query L1 (official 10).
        beta: FPO inverse temperature (official 0.1).
        variant: ``reference_free`` (official) or ``dpo`` (a frozen copy of the initial
            model gives the reference log-probs).
    """

    grounding_weight: float = 10.0
    consistency_weight: float = 10.0
    beta: float = 0.1
    variant: Literal["reference_free", "dpo"] = "reference_free"


@dataclass
class ScalingSettings:
    """Ray Train workers and the DeepSpeed engine.

    Attributes:
        num_workers: Data-parallel workers (one process each).
        use_gpu: One GPU per worker; bf16 on GPU, fp32 on CPU.
        cpus_per_worker: CPUs reserved per worker.
        zero_stage: DeepSpeed ZeRO stage (official 2).
    """

    num_workers: int = 1
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    zero_stage: int = 2


@dataclass
class CheckpointSettings:
    """Checkpoints: a loadable model directory plus the engine state for resume.

    Attributes:
        every_n_steps: Save every N optimizer steps (the final step is always saved).
        save_mode: ``merged`` = a full checkpoint directory with LoRA merged
            (:func:`d2vlm_ray.model.checkpoint.save_pretrained`); ``adapter`` = the LoRA
            adapter plus the non-LoRA trainables, loaded on top of ``init_from``.
        num_to_keep: Checkpoints Ray Train keeps (the newest ones).
    """

    every_n_steps: int = 500
    save_mode: Literal["merged", "adapter"] = "merged"
    num_to_keep: int = 1


@dataclass
class EvalSettings:
    """Periodic evaluation on the validation split (rank 0, greedy decoding).

    Attributes:
        every_n_steps: Evaluate every N optimizer steps (0 = only at the end, if ``at_end``).
        at_end: Evaluate after the last step.
        num_samples: Validation samples (or held-out pairs) per evaluation.
        max_new_tokens: Generation bound.
        tasks: Task codes whose samples are evaluated (their first span is compared).
    """

    every_n_steps: int = 0
    at_end: bool = True
    num_samples: int = 8
    max_new_tokens: int = 48
    tasks: list[str] = field(default_factory=lambda: ["tvg"])


@dataclass
class FaultSettings:
    """Fault tolerance and its test knob.

    Attributes:
        max_failures: Worker-group restarts Ray Train allows (each resumes from the last
            checkpoint).
        fail_at_step: Raise :class:`d2vlm_ray.train.loop.InjectedFault` on every worker
            right after this optimizer step, in an attempt that started from scratch (a
            resumed attempt passes); 0 = off. Used to test resume.
    """

    max_failures: int = 0
    fail_at_step: int = 0


@dataclass
class HeadWarmupSettings:
    """Fit the grounding heads alone on frozen states before SFT (:mod:`d2vlm_ray.train.head_warmup`).

    Attributes:
        steps: Head updates, one sample each (0 = off, the official recipe).
        lr: AdamW learning rate of the fit.
        max_samples: Most distinct training samples with response evidence whose states
            are collected, split over the workers (one forward pass each, no backward).
    """

    steps: int = 0
    lr: float = 1e-3
    max_samples: int = 256


@dataclass
class TrainJobConfig:
    """Fields shared by the SFT and FPO jobs.

    Attributes:
        name: Run name; the run directory is ``output_dir/name``.
        output_dir: Storage path of Ray Train (checkpoints, metrics, TensorBoard).
        init_from: ``tiny`` (random model from ``model`` and ``seed``) or a checkpoint directory.
        seed: Seed of the initial model (``tiny``) and of the data order.
        model: Architecture for ``init_from: tiny``; ``model.lora`` always applies.
        data: Inputs.
        features: Sampling, partial-decode policy and feature cache (the spec every job and
            Serve share). Features found in ``features.cache_root`` are used as they are; a
            miss is decoded and encoded on the fly and written back ("" = no cache: every
            sample is decoded; slow).
        optim: Optimizer and schedule.
        loss: Loss weights.
        scaling: Workers and DeepSpeed.
        checkpoint: Checkpoint cadence and format.
        eval: Validation cadence.
        fault: Retries and fault injection.
        log_every: Log a metrics line every N steps (files get every step).
        ray_num_cpus: CPUs of a locally started Ray instance (0 = all); ignored when
            connecting to a cluster.
    """

    name: str = "run"
    output_dir: str = "runs"
    init_from: str = "tiny"
    seed: int = 0
    model: ModelConfig = field(default_factory=_tiny_model)
    data: DataSettings = field(default_factory=DataSettings)
    features: FeatureSpec = field(default_factory=lambda: FeatureSpec(cache_memory_bytes=512 << 20))
    optim: OptimSettings = field(default_factory=OptimSettings)
    loss: LossSettings = field(default_factory=LossSettings)
    scaling: ScalingSettings = field(default_factory=ScalingSettings)
    checkpoint: CheckpointSettings = field(default_factory=CheckpointSettings)
    eval: EvalSettings = field(default_factory=EvalSettings)
    fault: FaultSettings = field(default_factory=FaultSettings)
    log_every: int = 1
    ray_num_cpus: int = 0

    def validate(self) -> None:
        """Cross-field checks; raises ``ConfigError`` naming the field."""
        if not self.name or "/" in self.name:
            raise ConfigError(f"name: must be a non-empty run name without '/', got {self.name!r}")
        if not self.init_from:
            raise ConfigError("init_from: give 'tiny' or a checkpoint directory")
        if self.init_from == "tiny" and self.model.preset not in TINY_PRESETS:
            raise ConfigError(
                f"init_from: 'tiny' needs a tiny model preset {list(TINY_PRESETS)}, got {self.model.preset!r}"
            )
        if not self.data.train:
            raise ConfigError("data.train: no training data given")
        try:
            self.features.validate()
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        if self.data.max_samples < 0:
            raise ConfigError("data.max_samples must be >= 0")
        for task, repeats in self.data.task_repeats.items():
            if repeats < 1:
                raise ConfigError(f"data.task_repeats.{task}: expected a whole number >= 1, got {repeats!r}")
        o = self.optim
        if o.micro_batch_size < 1 or o.grad_accum < 1:
            raise ConfigError("optim.micro_batch_size and optim.grad_accum must be >= 1")
        if len(o.betas) != 2 or not all(0.0 <= b < 1.0 for b in o.betas):
            raise ConfigError(f"optim.betas: expected two values in [0, 1), got {o.betas!r}")
        if o.lr <= 0 or o.lora_lr <= 0:
            raise ConfigError("optim.lr and optim.lora_lr must be > 0")
        if o.embedding_lr < 0 or o.compressor_lr < 0:
            raise ConfigError("optim.embedding_lr and optim.compressor_lr must be >= 0 (0 = optim.lr)")
        if not 0.0 <= o.warmup_ratio < 1.0:
            raise ConfigError("optim.warmup_ratio must be in [0, 1)")
        if o.max_grad_norm < 0:
            raise ConfigError("optim.max_grad_norm must be >= 0 (0 = no clipping)")
        if o.max_steps < 0 or (o.max_steps == 0 and o.epochs < 1):
            raise ConfigError("optim: set max_steps > 0 or epochs >= 1")
        s = self.scaling
        if s.num_workers < 1:
            raise ConfigError("scaling.num_workers must be >= 1")
        if s.cpus_per_worker <= 0:
            raise ConfigError("scaling.cpus_per_worker must be > 0")
        if s.zero_stage not in (0, 1, 2, 3):
            raise ConfigError(f"scaling.zero_stage must be 0, 1, 2 or 3, got {s.zero_stage}")
        if s.zero_stage == 3 and (self.eval.every_n_steps or self.eval.at_end):
            # Evaluation runs on rank 0 alone, which ZeRO-3's partitioned parameters forbid.
            raise ConfigError("eval: rank-0 evaluation needs zero_stage <= 2; disable eval or use stage 2")
        if self.checkpoint.every_n_steps < 1:
            raise ConfigError("checkpoint.every_n_steps must be >= 1")
        if self.checkpoint.num_to_keep < 1:
            raise ConfigError("checkpoint.num_to_keep must be >= 1")
        if self.eval.every_n_steps < 0 or self.eval.num_samples < 0 or self.eval.max_new_tokens < 1:
            raise ConfigError("eval: every_n_steps and num_samples must be >= 0, max_new_tokens >= 1")
        if self.fault.max_failures < 0 or self.fault.fail_at_step < 0:
            raise ConfigError("fault: max_failures and fail_at_step must be >= 0")
        if self.log_every < 1:
            raise ConfigError("log_every must be >= 1")
        if self.loss.beta <= 0:
            raise ConfigError("loss.beta must be > 0")


@dataclass
class SFTJobConfig(TrainJobConfig):
    """The SFT job (``python -m jobs.sft``): evidence-token SFT from a base checkpoint.

    Attributes:
        head_warmup: Optional head-only fit before the first SFT step.
    """

    name: str = "sft"
    head_warmup: HeadWarmupSettings = field(default_factory=HeadWarmupSettings)

    def validate(self) -> None:
        """As for the shared fields, plus the head warm-up."""
        super().validate()
        w = self.head_warmup
        if w.steps < 0 or w.max_samples < 1 or w.lr <= 0:
            raise ConfigError("head_warmup: need steps >= 0, max_samples >= 1 and lr > 0")


@dataclass
class FPOJobConfig(TrainJobConfig):
    """The FPO job (``python -m jobs.fpo``): preference optimisation from the SFT output with a fresh LoRA."""

    name: str = "fpo"

    def validate(self) -> None:
        """As for SFT; FPO additionally expects preference pairs (Parquet) as ``data.train``."""
        super().validate()
        if self.data.tasks or self.data.task_repeats:
            raise ConfigError(
                "data.tasks / data.task_repeats: task selection applies to SFT annotations, not to preference pairs"
            )


CONFIG_CLASSES: dict[str, type[TrainJobConfig]] = {"sft": SFTJobConfig, "fpo": FPOJobConfig}


def config_from_dict(stage: str, data: dict[str, Any]) -> TrainJobConfig:
    """Rehydrate a job config that crossed into a Ray worker as a plain dict.

    Raises:
        ConfigError: On an unknown stage or an invalid config.
    """
    if stage not in CONFIG_CLASSES:
        raise ConfigError(f"stage: expected one of {sorted(CONFIG_CLASSES)}, got {stage!r}")
    return from_dict(CONFIG_CLASSES[stage], data)
