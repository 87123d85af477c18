"""Factorized Preference Optimization of D2VLM on Ray Train with DeepSpeed (spec §4.1 step 2, §4.4).

Starts from the SFT output (``init_from``: the SFT run dir, a checkpoint or a model dir)
with a fresh LoRA, reads preference pairs (Parquet rows of ``PreferencePair``, e.g. from
``jobs.synth_pairs``), encodes each video once per pair and scores the chosen and rejected
branches; the loss is the reference-free sigmoid preference term plus the chosen branch's
SFT loss. Checkpoints, resume, metrics and outputs as for ``jobs.sft``; each eval adds the
held-out preference accuracy (``data.val_pairs``).

Local (starts an in-process Ray when none is running)::

    python -m jobs.fpo --config jobs/configs/fpo_tiny.yaml
    python -m jobs.fpo --config jobs/configs/fpo_tiny.yaml init_from=runs/train/sft_tiny optim.max_steps=10

On a running cluster (absolute paths or URLs every node can read)::

    ray job submit --working-dir . -- python -m jobs.fpo --config jobs/configs/fpo_tiny.yaml \\
        init_from=$PWD/runs/train/sft_tiny data.train=$PWD/runs/synth_pairs/train \\
        data.val_pairs=$PWD/runs/synth_pairs/val data.val=$PWD/runs/synth/annotations/val.json \\
        data.video_root=$PWD/runs/synth features.cache_root=$PWD/runs/feature_cache output_dir=$PWD/runs/train

Exit codes: 0 on success, 2 on a bad config or missing inputs, 1 if training failed.
"""

from __future__ import annotations

import sys

from d2vlm_ray.train.job import run_job


def main(argv: list[str] | None = None) -> int:
    """Run the job; see the module docstring."""
    return run_job("fpo", argv, prog="python -m jobs.fpo", description=__doc__.split("\n\n")[0])


if __name__ == "__main__":
    sys.exit(main())
