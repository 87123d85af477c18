"""SFT and FPO training: a framework-agnostic loop, and its Ray Train + DeepSpeed driver.

Modules:

- ``config``: job configs (:class:`SFTJobConfig`, :class:`FPOJobConfig`);
- ``loop``: the training loop, data order, :class:`TorchEngine`, the ``Reporter`` protocol (no Ray);
- ``session``: model/objective/data set-up of one process and :func:`run_local` (no Ray);
- ``data``, ``objectives``, ``checkpointing``, ``evaluation``, ``metrics``: its parts (no Ray);
- ``trainer``: ``TorchTrainer`` + DeepSpeed, :func:`train_sft`, :func:`train_fpo` (imports Ray lazily).

Attributes are imported on first use, so ``import d2vlm_ray.train`` stays cheap and Ray-free.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "SFTJobConfig": "d2vlm_ray.train.config",
    "FPOJobConfig": "d2vlm_ray.train.config",
    "TrainJobConfig": "d2vlm_ray.train.config",
    "Loop": "d2vlm_ray.train.loop",
    "LoopPlan": "d2vlm_ray.train.loop",
    "TorchEngine": "d2vlm_ray.train.loop",
    "Reporter": "d2vlm_ray.train.loop",
    "run_local": "d2vlm_ray.train.session",
    "load_trained_model": "d2vlm_ray.train.checkpointing",
    "preference_accuracy": "d2vlm_ray.train.evaluation",
    "grounding_eval": "d2vlm_ray.train.evaluation",
    "train_sft": "d2vlm_ray.train.trainer",
    "train_fpo": "d2vlm_ray.train.trainer",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'd2vlm_ray.train' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
