"""The prediction UDF: features of each sample's video, batched generation, E.T. Bench records.

Ray-free: :class:`PredictBatch` is what the Ray Data actors run, and it can be called
directly on a hand-made batch.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import astuple, replace
from typing import Any, NamedTuple

import numpy as np

from d2vlm_ray import telemetry
from d2vlm_ray.config import DecodeSettings
from d2vlm_ray.pipelines.inference.config import as_config

logger = logging.getLogger(__name__)


class SampleFailure(Exception):
    """A sample that cannot be predicted; ``reason`` is a short code (see the module docstring)."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(f"{reason}: {message}")
        self.reason = reason
        self.message = message


def failed_prediction(
    base: Mapping[str, Any],
    reason: str,
    message: str,
    *,
    warnings: Sequence[str] = (),
    missing_timestamps_s: Sequence[float] = (),
) -> dict[str, Any]:
    """The prediction record of a sample that failed (empty answer, counts as a failure).

    ``warnings`` / ``missing_timestamps_s`` are the video decode's, where it got that far.
    """
    return dict(base) | {
        "a": "",
        "pred_spans_s": [],
        "grounding_spans_s": [],
        "n_input_tokens": 0,
        "n_output_tokens": 0,
        "n_frames": 0,
        "truncated": False,
        "cache_hit": False,
        "status": "failed",
        "error": {"reason": reason, "message": message},
        "warnings": [str(w) for w in warnings],
        "output_warnings": [],
        "missing_timestamps_s": [float(t) for t in missing_timestamps_s],
    }


def blank_timestamps_s(duration_s: float, fps: float, max_frames: int = 0) -> np.ndarray:
    """Frame times ``k / fps`` of an all-black clip of ``duration_s`` (thinned to ``max_frames``).

    Raises:
        ValueError: If the duration is not positive.
    """
    if not (duration_s > 0 and math.isfinite(duration_s)):
        raise ValueError(f"duration {duration_s!r} s: a blank clip needs a positive duration")
    n_frames = max(1, math.ceil(duration_s * fps - 1e-6))
    times_s = np.arange(n_frames, dtype=np.float64) / fps
    if max_frames and n_frames > max_frames:
        keep = np.round(np.linspace(0, n_frames - 1, max_frames)).astype(np.int64)
        times_s = times_s[keep]
    return times_s


def _split_spans(token_ids: Sequence[int], spans_s: Sequence[Sequence[float]], evi_id: int, evi_end_id: int):
    """(grounding spans, answer spans): the ``<evi>`` spans before and after the first ``</evi>``."""
    n_before = 0
    for tid in token_ids:
        if tid == evi_end_id:
            break
        if tid == evi_id:
            n_before += 1
    else:
        # No </evi>: every span belongs to the (unfinished) grounding part.
        n_before = len(spans_s)
    as_lists = [[round(float(s), 3), round(float(e), 3)] for s, e in spans_s]
    return as_lists[:n_before], as_lists[n_before:]


class VideoFeatures(NamedTuple):
    """Frame features of one sample as the UDF uses them.

    Attributes:
        patches: Frame-encoder patch features ``[F, P, C]`` float32.
        timestamps_s: Frame times ``[F]``.
        duration_s: Video duration.
        cache_hit: Whether the feature cache served them.
        warnings: The video decode's warnings (empty for a clean decode or blank frames).
        missing_timestamps_s: Sampled frames the decode lost.
    """

    patches: Any
    timestamps_s: np.ndarray
    duration_s: float
    cache_hit: bool
    warnings: tuple[str, ...] = ()
    missing_timestamps_s: tuple[float, ...] = ()


# (position in the batch, record, features, input token count) of a sample ready to generate.
_Ready = tuple[int, dict[str, Any], VideoFeatures, int]


class PredictBatch:
    """Ray Data UDF: a batch of samples in, one prediction JSON per sample out.

    Built once per actor: loads the checkpoint and opens the feature cache. Callable
    without Ray on a dict batch with columns ``sample_id``, ``record_json``, ``base_json``.

    Args:
        config: ``to_dict(EvaluateConfig)`` (configs cross into Ray as plain dicts).
        device: ``cpu`` or ``cuda``, resolved by the driver.
    """

    def __init__(self, config: Mapping[str, Any], device: str = "cpu") -> None:
        import torch

        from d2vlm_ray.model.builders import build_frame_encoder
        from d2vlm_ray.model.checkpoint import from_pretrained
        from d2vlm_ray.model.tokenizer import TokenIds

        self.cfg = as_config(config)
        if device == "cuda" and not torch.cuda.is_available():
            device = "cpu"
        dtype = getattr(torch, self.cfg.compute.dtype)
        self.model, self.tokenizers, self.model_cfg = from_pretrained(
            self.cfg.checkpoint_dir, dtype=dtype, device=device
        )
        self.encoder = build_frame_encoder(self.model, self.model_cfg.vision.image_size)
        self.ids = TokenIds.from_tokenizer(self.tokenizers.llm)
        from d2vlm_ray.cache import FeatureSource

        # The blank-frame baseline encodes no video, so it neither reads nor fills the cache.
        spec = replace(self.cfg.features, cache_root="") if self.cfg.blank_frames else self.cfg.features
        self.source = FeatureSource(self.encoder, spec)
        positions = self.model_cfg.llm.max_position_embeddings
        max_new = self.cfg.decoding.resolved_max_new_tokens
        self.max_input_tokens = self.cfg.max_input_tokens or max(positions - max_new, positions // 2)
        self._blank_frame: Any = None

    # features ---------------------------------------------------------------------------

    def _blank_features(self, record: Mapping[str, Any]) -> VideoFeatures:
        import torch

        times_s = blank_timestamps_s(float(record["duration_s"]), self.cfg.features.fps, self.cfg.features.max_frames)
        if self._blank_frame is None:
            side = self.encoder.image_size
            self._blank_frame = self.encoder.encode(np.zeros((1, side, side, 3), dtype=np.uint8))  # [1, P, C]
        patches = self._blank_frame.expand(len(times_s), -1, -1).contiguous()  # [F, P, C]
        return VideoFeatures(patches.to(torch.float32), times_s, float(record["duration_s"]), False)

    def _video_features(self, record: Mapping[str, Any]) -> VideoFeatures:
        from d2vlm_ray.data.video import VideoDecodeError

        if self.cfg.max_duration_s and float(record["duration_s"]) > self.cfg.max_duration_s:
            raise SampleFailure(
                "video:too_long", f"duration {record['duration_s']} s exceeds max_duration_s={self.cfg.max_duration_s}"
            )
        try:
            result = self.source.features(record["video"])
            feats, hit = result.features, result.cache_hit
        except VideoDecodeError as exc:
            raise SampleFailure(f"video:{exc.reason}", str(exc)) from None
        except FileNotFoundError as exc:
            raise SampleFailure("video:not_found", str(exc)) from None
        except OSError as exc:
            raise SampleFailure("video:io_error", f"{type(exc).__name__}: {exc}") from None
        if feats.warnings:
            logger.warning("video %s: %s", record["video"], "; ".join(feats.warnings))
        return VideoFeatures(
            feats.patches,
            np.asarray(feats.timestamps_s, dtype=np.float64),
            float(feats.duration_s),
            bool(hit),
            tuple(feats.warnings),
            tuple(feats.missing_timestamps_s),
        )

    def features(self, record: Mapping[str, Any]) -> VideoFeatures:
        """Patch features ``[F, P, C]``, frame times, duration and cache hit of one record.

        Raises:
            SampleFailure: If the video cannot be decoded or is too long.
        """
        if self.cfg.blank_frames:
            try:
                return self._blank_features(record)
            except ValueError as exc:
                raise SampleFailure("bad_input", str(exc)) from None
        return self._video_features(record)

    # generation -------------------------------------------------------------------------

    def _prepare(self, record: Mapping[str, Any], feats: VideoFeatures) -> int:
        """Check one sample's input length; return its input token count."""
        from d2vlm_ray.model.tokenizer import tokenize_prompt

        try:
            prompt = tokenize_prompt(self.tokenizers.llm, record["query"])
        except ValueError as exc:
            raise SampleFailure("bad_input", str(exc)) from None
        n_frames = int(feats.patches.shape[0])
        n_input = len(prompt.prefix_ids) + n_frames + len(prompt.suffix_ids)
        if n_input > self.max_input_tokens:
            raise SampleFailure(
                "too_long",
                f"{n_input} input tokens ({n_frames} frames + text) exceed "
                f"max_input_tokens={self.max_input_tokens}",
            )
        return n_input

    def _generate(self, group: list[_Ready], settings: DecodeSettings) -> list[Any]:
        from d2vlm_ray.model.generation import generate
        from d2vlm_ray.model.inputs import build_batch

        batch = build_batch(
            self.tokenizers.llm,
            self.tokenizers.qformer,
            [rec["query"] for _, rec, _, _ in group],
            [f.patches for _, _, f, _ in group],
            [f.timestamps_s for _, _, f, _ in group],
            [f.duration_s for _, _, f, _ in group],
            src_spans_s=[[tuple(s) for s in rec["src_spans_s"]] for _, rec, _, _ in group],
            max_text_tokens=self.model_cfg.qformer.max_text_tokens,
        )
        return generate(self.model, self.tokenizers.llm, batch, settings)

    def _prediction(
        self, base: Mapping[str, Any], result: Any, feats: VideoFeatures, n_input: int, settings: DecodeSettings
    ) -> dict[str, Any]:
        grounding, answer = _split_spans(result.token_ids, result.spans_s, self.ids.evi, self.ids.evi_end)
        out = dict(base) | {
            "a": result.text,
            "pred_spans_s": answer,
            "grounding_spans_s": grounding,
            "n_input_tokens": n_input,
            "n_output_tokens": len(result.token_ids),
            "n_frames": int(feats.patches.shape[0]),
            "truncated": bool(result.truncated),
            "cache_hit": feats.cache_hit,
            "status": "ok",
            "error": None,
            # The decode's warnings; what the model's output got wrong is kept apart.
            "warnings": list(feats.warnings),
            "output_warnings": list(result.warnings),
            "missing_timestamps_s": list(feats.missing_timestamps_s),
        }
        if settings.do_sample:
            out["seed"] = settings.seed
        return out

    def predict(self, samples: Sequence[tuple[str, dict[str, Any], dict[str, Any]]]) -> list[dict[str, Any]]:
        """Predict ``(sample_id, record, base)`` triples; one prediction record each, in order."""
        outputs: list[dict[str, Any] | None] = [None] * len(samples)
        video_memo: dict[str, VideoFeatures | SampleFailure] = {}
        ready: list[_Ready] = []
        for i, (_, record, base) in enumerate(samples):
            try:
                key = record["video"]
                if self.cfg.blank_frames or key not in video_memo:
                    try:
                        video_memo[key] = self.features(record)
                    except SampleFailure as exc:
                        video_memo[key] = exc
                feats = video_memo[key]
                if isinstance(feats, SampleFailure):
                    raise feats
                try:
                    ready.append((i, record, feats, self._prepare(record, feats)))
                except SampleFailure as exc:
                    outputs[i] = failed_prediction(
                        base, exc.reason, exc.message,
                        warnings=feats.warnings, missing_timestamps_s=feats.missing_timestamps_s,
                    )
            except SampleFailure as exc:
                outputs[i] = failed_prediction(base, exc.reason, exc.message)
        # Group by decode settings: sampled decoding runs one sample at a time (its own seed).
        groups: dict[tuple[Any, ...], tuple[DecodeSettings, list[_Ready]]] = {}
        for item in ready:
            settings = self.cfg.decoding.settings_for(item[1].get("task", ""), samples[item[0]][0])
            key = (*astuple(settings), item[0] if settings.do_sample else -1)
            groups.setdefault(key, (settings, []))[1].append(item)
        for settings, group in groups.values():
            try:
                results = self._generate(group, settings)
            except (ValueError, RuntimeError) as exc:
                if len(group) > 1:
                    # One bad sample must not fail its batch-mates: retry each on its own.
                    results = []
                    for item in group:
                        try:
                            results.append(self._generate([item], settings)[0])
                        except (ValueError, RuntimeError) as inner:
                            results.append(inner)
                else:
                    results = [exc]
            for (i, _, feats, n_input), result in zip(group, results):
                base = samples[i][2]
                if isinstance(result, Exception):
                    reason = "bad_input" if isinstance(result, ValueError) else "generation_error"
                    outputs[i] = failed_prediction(
                        base, reason, f"{type(result).__name__}: {result}",
                        warnings=feats.warnings, missing_timestamps_s=feats.missing_timestamps_s,
                    )
                else:
                    outputs[i] = self._prediction(base, result, feats, n_input, settings)
        return [o for o in outputs if o is not None]

    def __call__(self, batch: Mapping[str, Any]) -> dict[str, list[str]]:
        """Ray Data entry: ``sample_id, record_json, base_json`` in, ``sample_id, prediction_json`` out."""
        samples = [
            (str(sid), json.loads(rec), json.loads(base))
            for sid, rec, base in zip(batch["sample_id"], batch["record_json"], batch["base_json"])
        ]
        start = time.perf_counter()
        preds = self.predict(samples)
        per_sample_ms = 1000.0 * (time.perf_counter() - start) / max(len(preds), 1)
        for pred in preds:
            telemetry.latency_ms("batch_inference", per_sample_ms)
            if pred.get("status") == "ok":
                telemetry.cache_lookup(bool(pred.get("cache_hit")), 0, "evaluate")
                telemetry.evidence_spans(len(pred.get("pred_spans_s") or []), "evaluate")
            elif pred.get("error"):
                reason = str(pred["error"].get("reason", ""))
                if reason.startswith("video:"):
                    telemetry.decode_failure(reason.split(":", 1)[1], "evaluate")
        return {
            "sample_id": [p["sample_id"] for p in preds],
            "prediction_json": [json.dumps(p, ensure_ascii=False, sort_keys=True) for p in preds],
        }
