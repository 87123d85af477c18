"""The frame-key layer and the head-only warm-up before SFT (``d2vlm_ray.train.head_warmup``).

The warm-up trains on cached inputs. That is only sound if those inputs are exactly what
the training forward feeds the heads, so the first tests compare the two. The remaining
tests check that a fit moves the heads and nothing else, that two data-parallel ranks end
with identical heads, and that bad set-ups fail with a clear error.
"""

from __future__ import annotations

import copy
import json
import socket
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from d2vlm_ray.config import ConfigError, from_dict
from d2vlm_ray.losses.sft import grounding_bce
from d2vlm_ray.model.inputs import build_batch
from d2vlm_ray.train.config import FPOJobConfig, SFTJobConfig
from d2vlm_ray.train.head_warmup import WarmupReport, collect_head_inputs, fit_heads, warm_up_heads
from d2vlm_ray.train.session import Session
from tests.helpers_model import encode, square_clip, tiny_model, tiny_tokenizers

COLOURS = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0)]
SPANS_IDX = [(8, 11), (5, 7), (3, 5), (0, 2)]
NUM_FRAMES = 12
RESPONSE = "<evi></evi>The event happens in <evi>."


def _batch(model, samples: range):
    tok = tiny_tokenizers()
    feats = [encode(model, square_clip(NUM_FRAMES, *SPANS_IDX[i], COLOURS[i])) for i in samples]
    return build_batch(
        tok.llm,
        tok.qformer,
        [f"When does square {i} appear?" for i in samples],
        feats,
        [np.arange(NUM_FRAMES) / 2.0 for _ in samples],
        [NUM_FRAMES / 2.0] * len(samples),
        responses=[RESPONSE] * len(samples),
        spans_s=[[(SPANS_IDX[i][0] / 2.0, SPANS_IDX[i][1] / 2.0)] for i in samples],
    )


@pytest.mark.parametrize("key_layer_idx", [None, 0, 2])
def test_head_inputs_give_the_training_forward_logits(key_layer_idx: int | None) -> None:
    model = tiny_model(seed=0, key_layer_idx=key_layer_idx)
    batch = _batch(model, range(3))
    with torch.no_grad():
        out = model(batch)
    inputs = model.head_inputs(batch)
    assert len(inputs) == 3
    for b, ex in enumerate(inputs):
        assert ex.query_states.shape == (2, model.causal_lm.config.hidden_size)  # [E, D], two <evi> per response
        assert ex.key_states.shape[0] == NUM_FRAMES
        assert ex.spans_idx.tolist() == [list(SPANS_IDX[b])] * 2
        logits = model.evidence_scores(ex.query_states, model.frm_head(ex.key_states))
        torch.testing.assert_close(logits, out.evidence_logits[b], rtol=0, atol=1e-6)


def test_frame_keys_read_their_own_layer() -> None:
    official = tiny_model(seed=0)
    assert official.key_layer_idx == official.ground_layer_idx, "default keeps queries and keys on one layer"
    model = tiny_model(seed=0, key_layer_idx=0)
    batch = _batch(model, range(2))
    with torch.no_grad():
        tokens = model.compress(batch)
        keys = model.head_inputs(batch)
        same_layer = official.head_inputs(batch)
    for b in range(2):
        # Layer 0 is the LLM's input: the frame tokens themselves.
        torch.testing.assert_close(keys[b].key_states, tokens[b].float())
        torch.testing.assert_close(keys[b].query_states, same_layer[b].query_states)
        assert not torch.allclose(keys[b].key_states, same_layer[b].key_states)


def test_key_layer_out_of_range_is_a_config_error() -> None:
    from d2vlm_ray.config import ModelConfig

    with pytest.raises(ValueError, match="model.key_layer_idx"):
        from_dict(ModelConfig, {"preset": "tiny", "key_layer_idx": 99})


def test_fit_moves_only_the_heads_and_lowers_the_loss() -> None:
    model = tiny_model(seed=0)
    examples = model.head_inputs(_batch(model, range(4)))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}

    def mean_bce() -> float:
        with torch.no_grad():
            logits = [model.evidence_scores(ex.query_states, model.frm_head(ex.key_states)) for ex in examples]
            losses = [grounding_bce(lg, ex.spans_idx, model.alpha) for lg, ex in zip(logits, examples)]
        return float(torch.stack(losses).mean())

    loss_before = mean_bce()
    updates, _ = fit_heads(model, examples, steps=60, lr=3e-3, seed=0)
    assert updates == 60
    assert mean_bce() < 0.8 * loss_before
    for name, param in model.named_parameters():
        moved = not torch.equal(param, before[name])
        assert moved == name.startswith(("evi_head.", "frm_head.")), f"{name} moved={moved}"


def _record(i: int, spans: bool = True) -> SimpleNamespace:
    return SimpleNamespace(sample_id=f"s{i}", spans_s=((1.0, 2.0),) if spans else ())


def test_warm_up_collects_distinct_samples_with_evidence_and_reports() -> None:
    model = tiny_model(seed=0)
    items = [_record(0), _record(1), _record(0), _record(2, spans=False), _record(3)]
    seen: list[str] = []

    def collate(records):
        seen.extend(r.sample_id for r in records)
        idx = int(records[0].sample_id[1:])
        return _batch(model, range(idx, idx + 1))

    model.train()
    examples = collect_head_inputs(model, collate, items, max_samples=10, seed=0)
    assert sorted(seen) == ["s0", "s1", "s3"], "repeats count once; samples without evidence are skipped"
    assert len(examples) == 3
    assert model.training, "the model's mode is restored after the eval-mode passes"
    seen.clear()
    assert len(collect_head_inputs(model, collate, items, max_samples=2, seed=0)) == 2
    report = warm_up_heads(model, collate, items, steps=30, lr=3e-3, max_samples=10, seed=0)
    assert (report.examples, report.evidence, report.steps) == (3, 6, 30)
    assert report.loss_after < report.loss_before


def test_report_of_a_rank_without_examples_is_strict_json() -> None:
    nan = float("nan")
    report = WarmupReport(0, 0, 10, nan, nan, nan, nan, 0.5, 0.1)
    loaded = json.loads(json.dumps(report.to_dict(), allow_nan=False))
    assert loaded["loss_before"] is None and loaded["top_frame_in_span_after"] is None
    assert (loaded["steps"], loaded["collect_s"]) == (10, 0.5)


def test_a_fresh_run_without_warm_up_removes_an_earlier_report(tmp_path: Path) -> None:
    stale = tmp_path / "head_warmup.json"
    stale.write_text('{"steps": 2000}')
    cfg = from_dict(SFTJobConfig, {"data": {"train": "x.json"}})
    # The warm-up step of a session whose config asks for none; nothing else of it is used.
    session = SimpleNamespace(cfg=cfg, stage="sft")
    assert Session.warm_up_heads(session, tmp_path, rank=1) is None and stale.exists(), "only rank 0 owns it"
    assert Session.warm_up_heads(session, tmp_path, rank=0) is None
    assert not stale.exists()


def test_warm_up_errors_name_the_setting() -> None:
    model = tiny_model(seed=0)
    with pytest.raises(ValueError, match="head_warmup: no training sample carries response evidence"):
        warm_up_heads(model, lambda r: None, [_record(0, spans=False)], steps=5, lr=1e-3, max_samples=4, seed=0)
    gvl = SimpleNamespace(family="grounded_videollm")
    with pytest.raises(ValueError, match="head_warmup: the grounded_videollm model has no grounding heads"):
        warm_up_heads(gvl, lambda r: None, [_record(0)], steps=5, lr=1e-3, max_samples=4, seed=0)


def test_head_warmup_config() -> None:
    base = {"data": {"train": "x.json"}}
    cfg = from_dict(SFTJobConfig, {**base, "head_warmup": {"steps": 10}})
    assert (cfg.head_warmup.steps, cfg.head_warmup.lr, cfg.head_warmup.max_samples) == (10, 1e-3, 256)
    with pytest.raises(ConfigError, match="head_warmup"):
        from_dict(SFTJobConfig, {**base, "head_warmup": {"steps": -1}})
    with pytest.raises(ConfigError, match="head_warmup"):
        from_dict(FPOJobConfig, {**base, "head_warmup": {"steps": 10}})


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_fit(rank: int, port: int, states: dict, rank1_examples: bool, out_dir: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        model = tiny_model(seed=0)
        model.load_state_dict(states["model"])
        examples = states["examples"] if rank == 0 or rank1_examples else []
        fit_heads(model, examples, steps=10, lr=3e-3, seed=0)
        heads = {k: v for k, v in model.state_dict().items() if k.startswith(("evi_head.", "frm_head."))}
        torch.save(heads, Path(out_dir) / f"heads_{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("rank1_examples", [True, False], ids=["same-examples", "rank1-empty"])
def test_two_ranks_end_with_identical_heads_from_averaged_gradients(rank1_examples: bool, tmp_path: Path) -> None:
    model = tiny_model(seed=0)
    examples = model.head_inputs(_batch(model, range(2)))
    states = {"model": copy.deepcopy(model.state_dict()), "examples": examples}
    # Ranks start by spawn and hand their heads back through files: nothing here forks the
    # test process, which may hold a Ray driver's gRPC threads (a fork there is unsafe).
    mp.spawn(_rank_fit, args=(_free_port(), states, rank1_examples, str(tmp_path)), nprocs=2, join=True)
    heads = [torch.load(tmp_path / f"heads_{rank}.pt") for rank in range(2)]
    for name, value in heads[0].items():
        torch.testing.assert_close(value, heads[1][name], rtol=0, atol=0)
    assert any(not torch.equal(value, states["model"][name]) for name, value in heads[0].items())
    if rank1_examples:
        # Both ranks hold the same examples, so the averaged gradient is each rank's own:
        # the heads equal a single-process fit.
        single = tiny_model(seed=0)
        single.load_state_dict(states["model"])
        fit_heads(single, examples, steps=10, lr=3e-3, seed=0)
        for name, value in heads[0].items():
            torch.testing.assert_close(value, single.state_dict()[name], rtol=1e-5, atol=1e-6)
