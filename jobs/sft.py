"""Evidence-token SFT of D2VLM on Ray Train with DeepSpeed (spec §4.1 step 1).

Reads E.T.-Instruct / D2VLM ``evi.json`` annotations, joins them to the shared feature
cache on each worker (decoding on the fly only for uncached videos), trains LoRA + heads +
Q-Former attention with AdamW (two learning rates, cosine schedule) under DeepSpeed ZeRO,
checkpoints every ``checkpoint.every_n_steps`` (a loadable ``model/`` dir plus the engine
state) and resumes from the newest checkpoint after a worker failure. Metrics go to the
job log, ``<output_dir>/<name>/{train,eval}_metrics.{jsonl,csv}`` and ``tensorboard/``;
the summary (final ``model_dir`` for FPO's ``init_from``) is the last stdout line.

Local (starts an in-process Ray when none is running)::

    python -m jobs.sft --config jobs/configs/sft_tiny.yaml
    python -m jobs.sft --config jobs/configs/sft_tiny.yaml optim.max_steps=20 scaling.num_workers=1

On a running cluster (``ray start --head``; give absolute paths or URLs every node can read,
since the entrypoint runs in an uploaded copy of the working dir)::

    ray job submit --working-dir . -- python -m jobs.sft --config jobs/configs/sft_tiny.yaml \\
        data.train=$PWD/runs/synth/annotations/train.json data.val=$PWD/runs/synth/annotations/val.json \\
        data.video_root=$PWD/runs/synth features.cache_root=$PWD/runs/feature_cache output_dir=$PWD/runs/train

Exit codes: 0 on success, 2 on a bad config or missing inputs, 1 if training failed.
"""

from __future__ import annotations

import sys

from d2vlm_ray.train.job import run_job


def main(argv: list[str] | None = None) -> int:
    """Run the job; see the module docstring."""
    return run_job("sft", argv, prog="python -m jobs.sft", description=__doc__.split("\n\n")[0])


if __name__ == "__main__":
    sys.exit(main())
