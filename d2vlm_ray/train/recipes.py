"""Recommended training hyper-parameters for the ``tiny`` model on the synthetic benchmark.

The values come from one-process experiments on 2 shared CPU cores (see the helper report
that introduced this module). What they encode:

- The grounding heads and the compressor learn from a bilinear score ``e·f/√D`` whose two
  sides both start near zero, so they get a higher learning rate than the LoRA adapters
  and embeddings; without it the grounding BCE sits at the marginal for hundreds of steps.
- Many small, shuffled batches beat a few large ones: the model needs optimizer steps,
  and a step over 8 clips of about 35 frames costs ~0.1 CPU-s with the tiny preset.
- ``torch_threads=1`` per worker: on 2 shared cores, intra-op threads spin against other
  processes and a step gets ~10x slower in CPU time (measured 2.8 vs 0.27 CPU-s).

The trainer imports :data:`TINY_SYNTHETIC` and turns it into optimizer parameter groups
with :func:`lr_by_group` (keys are :func:`d2vlm_ray.model.lora.parameter_group` names).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from d2vlm_ray.model.lora import parameter_group

_GROUPS = ("lora", "embed", "lm_head", "frm_head", "evi_head", "qformer", "qformer_frozen", "llm")


@dataclass(frozen=True)
class TrainRecipe:
    """Hyper-parameters of one SFT recipe.

    Attributes:
        lr: Learning rate of every trained group not listed in ``group_lrs``.
        group_lrs: Learning rate per :func:`~d2vlm_ray.model.lora.parameter_group` name.
        steps: Optimizer steps.
        batch_size: Samples per optimizer step (global, over all workers).
        warmup_steps: Linear warm-up steps.
        schedule: ``constant`` or ``cosine`` after the warm-up.
        weight_decay: AdamW weight decay.
        grad_clip: Global gradient-norm clip (0 disables it).
        tasks: Synthetic task codes mixed into training, sampled uniformly over records.
        fps: Frame sampling rate for decoding and the feature cache.
        max_frames: Cap on sampled frames per video (None: no cap; synthetic videos are ≤ 60 s).
        torch_threads: ``torch.set_num_threads`` per training process.
    """

    lr: float = 2e-3
    group_lrs: dict[str, float] = field(default_factory=dict)
    steps: int = 2000
    batch_size: int = 8
    warmup_steps: int = 0
    schedule: str = "constant"
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    tasks: tuple[str, ...] = ("tvg", "gqa")
    fps: float = 1.0
    max_frames: int | None = None
    torch_threads: int = 1

    def __post_init__(self) -> None:
        unknown = set(self.group_lrs) - set(_GROUPS)
        if unknown:
            raise ValueError(f"group_lrs: unknown parameter groups {sorted(unknown)}; known: {list(_GROUPS)}")
        if self.schedule not in ("constant", "cosine"):
            raise ValueError(f"schedule: expected 'constant' or 'cosine', got {self.schedule!r}")
        if self.steps < 1 or self.batch_size < 1:
            raise ValueError("steps and batch_size must be at least 1")

    def lr_for(self, group: str) -> float:
        """Learning rate of one parameter group."""
        return self.group_lrs.get(group, self.lr)


def lr_by_group(recipe: TrainRecipe, named_parameters) -> list[dict]:
    """AdamW parameter groups (``params``, ``lr``, ``name``) for the trainable parameters.

    Args:
        recipe: The recipe.
        named_parameters: ``model.named_parameters()`` of a model after ``apply_lora``.

    Returns:
        One group per parameter group name that has trainable parameters.
    """
    groups: dict[str, dict] = {}
    for name, param in named_parameters:
        if not param.requires_grad:
            continue
        group = parameter_group(name)
        entry = groups.setdefault(group, {"params": [], "lr": recipe.lr_for(group), "name": group})
        entry["params"].append(param)
    return list(groups.values())


# Tiny preset on the synthetic benchmark (needs the frame-encoder init fix described in the
# report: a random tiny ViT built with transformers' default initializer_range=1e-10
# outputs all-zero features).
TINY_SYNTHETIC = TrainRecipe(
    lr=2e-3,
    group_lrs={"frm_head": 1e-2, "evi_head": 1e-2, "qformer": 1e-2},
    steps=2000,
    batch_size=8,
    tasks=("tvg", "gqa"),
    fps=1.0,
    max_frames=None,
    torch_threads=1,
)
