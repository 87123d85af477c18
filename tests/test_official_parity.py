"""Parity with the official D2VLM code, on fixtures the official code produced.

``tests/parity/make_fixtures.py`` ran the official implementation at a reduced size with
seeded weights and dumped what it computes (see ``tests/parity/README.md``). Here the same
weights are regenerated from the seed, written as an official-layout checkpoint, loaded
through the project's official key map and ``from_pretrained``, and the project's own
public paths (tokenization, ``build_batch``, the model forward, the SFT and FPO losses,
generation, detokenization) must reproduce the official numbers to 1e-4.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from d2vlm_ray.config.schema import DecodeSettings
from d2vlm_ray.losses.fpo import fpo_loss
from d2vlm_ray.losses.sft import sft_loss
from d2vlm_ray.model import generation
from d2vlm_ray.model.checkpoint import from_pretrained, native_state_dict, to_official_state_dict
from d2vlm_ray.losses.targets import soft_targets
from d2vlm_ray.model.inputs import build_batch
from d2vlm_ray.model.preference import build_pair_batch, pair_forward
from d2vlm_ray.model.tokenizer import build_tiny_llm_tokenizer, build_tiny_qformer_tokenizer, tokenize_prompt
from d2vlm_ray.types import PreferencePair
from tests.parity import samples as S
from tests.parity.weights import official_weights, weights_sha256

FIXTURES = Path(__file__).resolve().parent / "parity" / "fixtures"
IMAGE_TOKEN_INDEX = -200  # the official placeholder id of <image>
TOL = {"rtol": 1e-4, "atol": 1e-4}


@pytest.fixture(scope="module")
def official() -> tuple[dict, dict[str, torch.Tensor]]:
    """The official code's outputs (json metadata and tensors)."""
    meta = json.loads((FIXTURES / "official.json").read_text())
    return meta, load_file(str(FIXTURES / "official.safetensors"))


def _write_official_checkpoint(meta: dict, out_dir: Path) -> None:
    """The seeded weights as an official-layout directory: safetensors, HF config.json, tokenizer."""
    shapes = {k: tuple(v) for k, v in meta["official_shapes"].items()}
    weights = official_weights(shapes, meta["seed"])
    assert weights_sha256(weights) == meta["weights_sha256"], (
        "the regenerated weights differ from those the official code ran with (different torch RNG?); "
        "regenerate the fixtures with tests/parity/make_fixtures.py"
    )
    out_dir.mkdir(parents=True)
    save_file(weights, str(out_dir / "model.safetensors"))
    tok = build_tiny_llm_tokenizer()
    config = {
        "architectures": ["ETChatPhi3ForCausalLM"],
        "model_type": "etchat_phi3",
        "hidden_size": S.LLM["hidden_size"],
        "intermediate_size": S.LLM["intermediate_size"],
        "num_hidden_layers": S.LLM["num_layers"],
        "num_attention_heads": S.LLM["num_heads"],
        "num_key_value_heads": S.LLM["num_heads"],
        "vocab_size": len(tok),
        "max_position_embeddings": S.LLM["max_position_embeddings"],
        "rope_theta": 10000.0,
        "rope_scaling": None,
        "rms_norm_eps": 1e-5,
        "sliding_window": None,
        "tie_word_embeddings": False,
        "vision_output_layer": S.VISION["num_layers"] - 1,
        "bi_attention": True,
        "alpha": S.ALPHA,
        "use_evidence": True,
    }
    (out_dir / "config.json").write_text(json.dumps(config, indent=1))
    tok.save_pretrained(str(out_dir))


@pytest.fixture(scope="module")
def loaded(official, tmp_path_factory) -> dict:
    """The project model and tokenizers, loaded from the official-layout checkpoint."""
    meta, _ = official
    root = tmp_path_factory.mktemp("official_ckpt")
    _write_official_checkpoint(meta, root / "ckpt")
    build_tiny_qformer_tokenizer().save_pretrained(str(root / "qformer_tokenizer"))
    model, tokenizers, cfg = from_pretrained(root / "ckpt", qformer_tokenizer_dir=str(root / "qformer_tokenizer"))
    with torch.no_grad():
        patches = [
            model.vision(pixel_values=S.pixels(i, frames)).last_hidden_state[:, 1:]  # [F, P, C], CLS dropped
            for i, (*_, frames) in enumerate(S.SFT_SAMPLES)
        ]
    return {"model": model, "tok": tokenizers, "cfg": cfg, "patches": patches, "dir": root / "ckpt"}


def _times(sample_idx: int) -> tuple[np.ndarray, float]:
    frames = S.SFT_SAMPLES[sample_idx][4]
    return np.arange(float(frames)), float(frames)


def _sft_batch(loaded: dict, items: list[tuple[int, str, list]]):
    """``build_batch`` over ``(sample_idx, response, spans_s)``."""
    tok = loaded["tok"]
    idx = [i for i, _, _ in items]
    return build_batch(
        tok.llm,
        tok.qformer,
        [S.SFT_SAMPLES[i][0] for i in idx],
        [loaded["patches"][i] for i in idx],
        [_times(i)[0] for i in idx],
        [_times(i)[1] for i in idx],
        responses=[r for _, r, _ in items],
        spans_s=[s for _, _, s in items],
        src_spans_s=[S.SFT_SAMPLES[i][3] for i in idx],
    )


class _LLMRecorder:
    """Records the inputs and outputs of every LLM call (prefix pass, suffix pass)."""

    def __init__(self, llm: torch.nn.Module) -> None:
        self.calls: list[tuple[torch.Tensor, object]] = []
        self.handle = llm.register_forward_hook(self._hook, with_kwargs=True)

    def _hook(self, _module, _args, kwargs, out) -> None:
        self.calls.append((kwargs["inputs_embeds"].detach(), out))

    def sample(self, b: int, prefix_len: int, suffix_len: int) -> dict[str, torch.Tensor]:
        """Sample ``b``'s full sequence: its left-padded prefix columns, then its suffix."""
        (pre_in, pre_out), (suf_in, suf_out) = self.calls

        def join(pre: torch.Tensor, suf: torch.Tensor) -> torch.Tensor:
            return torch.cat([pre[b, pre.shape[1] - prefix_len :], suf[b, :suffix_len]], dim=0)

        return {
            "inputs_embeds": join(pre_in, suf_in),
            "logits": join(pre_out.logits, suf_out.logits),
            "hidden": torch.stack([join(p, s) for p, s in zip(pre_out.hidden_states, suf_out.hidden_states)]),
        }


def test_official_checkpoint_keys_round_trip(official, loaded) -> None:
    """The project writes back exactly the official key set (incl. the Q-Former position_ids)."""
    meta, _ = official
    back = to_official_state_dict(native_state_dict(loaded["model"]))
    assert sorted(back) == sorted(meta["official_shapes"])
    assert all(list(back[k].shape) == v for k, v in meta["official_shapes"].items())


def test_loaded_sizes_come_from_the_checkpoint(loaded) -> None:
    cfg = loaded["cfg"]
    assert (cfg.llm.hidden_size, cfg.llm.num_layers, cfg.llm.vocab_size) == (96, 8, len(loaded["tok"].llm))
    assert (cfg.vision.hidden_size, cfg.vision.num_layers, cfg.vision.num_heads) == (176, 2, 2)
    assert (cfg.qformer.hidden_size, cfg.qformer.num_layers, cfg.qformer.num_queries) == (64, 2, 32)
    assert (cfg.inject_layer_idx, cfg.ground_layer_idx) == (6, 7)


def test_prompt_ids_match_the_official_tokenization(official, loaded) -> None:
    meta, _ = official
    tok = loaded["tok"]
    for g in ("gen0", "gen1"):
        question = S.SFT_SAMPLES[meta[g]["sample"]][0]
        ids = tokenize_prompt(tok.llm, question)
        assert ids.prefix_ids + [IMAGE_TOKEN_INDEX] + ids.suffix_ids == meta[g]["prompt_ids"]
    batch = _sft_batch(loaded, [(i, s[1], s[2]) for i, s in enumerate(S.SFT_SAMPLES)])
    for b, want in enumerate(meta["sft"]["samples"]):
        assert batch.prefix_ids[b] + [IMAGE_TOKEN_INDEX] == want["input_ids_part1"]
        assert batch.suffix_ids[b] == want["input_ids_part2"]
        n = len(want["qformer_ids"])
        assert batch.qformer_ids[b, :n].tolist() == want["qformer_ids"]
        assert not batch.qformer_mask[b, n:].any()


def test_sft_forward_and_losses_match(official, loaded) -> None:
    meta, tensors = official
    model = loaded["model"]
    batch = _sft_batch(loaded, [(i, s[1], s[2]) for i, s in enumerate(S.SFT_SAMPLES)])
    recorder = _LLMRecorder(model.llm)
    try:
        with torch.no_grad():
            frame_tokens = model.compress(batch)
            frame_states = model.prefill_prefix(batch, frame_tokens).frame_states
            recorder.calls.clear()
            out = model(batch)
    finally:
        recorder.handle.remove()
    for b, want in enumerate(meta["sft"]["samples"]):
        key = f"sft.{b}"
        torch.testing.assert_close(frame_tokens[b], tensors[f"{key}.frame_tokens"], **TOL)
        torch.testing.assert_close(frame_states[b], tensors[f"{key}.frame_states6"], **TOL)
        got = recorder.sample(b, len(batch.prefix_ids[b]) + batch.patches[b].shape[0], len(batch.suffix_ids[b]))
        assert got["logits"].shape[0] == want["length"]
        torch.testing.assert_close(got["inputs_embeds"], tensors[f"{key}.inputs_embeds"], **TOL)
        torch.testing.assert_close(got["hidden"], tensors[f"{key}.hidden"], **TOL)
        torch.testing.assert_close(got["logits"], tensors[f"{key}.logits"], **TOL)
        torch.testing.assert_close(out.evidence_logits[b], tensors[f"{key}.sim"], **TOL)
        frames = batch.patches[b].shape[0]
        targets = soft_targets(out.evidence_spans_idx[b], frames, S.ALPHA)
        torch.testing.assert_close(targets, tensors[f"{key}.sim_tgt"], **TOL)
    loss = sft_loss(out.logits, out.labels, out.evidence_logits, out.evidence_queries, out.evidence_spans_idx)
    want = meta["sft"]
    got = {"lm": loss.lm, "grounding": loss.grounding, "consistency": loss.consistency, "total": loss.total}
    for name, value in got.items():
        assert float(value) == pytest.approx(want[name], rel=1e-4, abs=1e-4), name


def _pairs() -> list[PreferencePair]:
    pairs = []
    for sample_idx, chosen_spans, rejected_text, rejected_spans in S.FPO_PAIRS:
        question, response, _, src, frames = S.SFT_SAMPLES[sample_idx]
        pairs.append(
            PreferencePair(
                f"s{sample_idx}", "parity", 0, f"{sample_idx}.mp4", float(frames), "parity", question,
                response, tuple(chosen_spans), rejected_text, tuple(rejected_spans), src_spans_s=tuple(src),
            )
        )
    return pairs


def test_fpo_logps_and_loss_match(official, loaded) -> None:
    meta, _ = official
    idx = [p[0] for p in S.FPO_PAIRS]
    batch = build_pair_batch(
        loaded["tok"], _pairs(), [loaded["patches"][i] for i in idx], [_times(i)[0] for i in idx],
        [_times(i)[1] for i in idx],
    )
    with torch.no_grad():
        out = pair_forward(loaded["model"], batch)  # alpha from the official config.json
        loss = fpo_loss(out)
    want = meta["fpo"]
    torch.testing.assert_close(out.chosen_logp, torch.tensor(want["chosen_logp"]), **TOL)
    torch.testing.assert_close(out.rejected_logp, torch.tensor(want["rejected_logp"]), **TOL)
    assert float(loss.preference) == pytest.approx(want["preference"], rel=1e-4, abs=1e-4)
    assert float(loss.total) == pytest.approx(want["total"], rel=1e-4, abs=1e-4)


def _forcing(schedule_ids: list[int]):
    """A stand-in for the token choice that plays a fixed schedule (the official run forced
    the same schedule with a logits processor); everything else is the project's decoding."""

    prompt_lens: list[int] = []

    def choose(logits, seen_ids, settings, exempt_ids, generator):
        # seen_ids grows by one id per generated token, from the prompt's length.
        if not prompt_lens:
            prompt_lens.extend(len(seen) for seen in seen_ids)
        return [schedule_ids[len(seen) - start] for seen, start in zip(seen_ids, prompt_lens)]

    return choose


@pytest.mark.parametrize("key", ["gen0", "gen1"])
def test_generation_and_detokenized_text_match(official, loaded, key, monkeypatch) -> None:
    meta, tensors = official
    want = meta[key]
    tok = loaded["tok"]
    sample_idx = want["sample"]
    question, _, _, src, _ = S.SFT_SAMPLES[sample_idx]
    times, duration = _times(sample_idx)
    batch = build_batch(
        tok.llm, tok.qformer, [question], [loaded["patches"][sample_idx]], [times], [duration], src_spans_s=[src]
    )
    if want["schedule"] is not None:
        monkeypatch.setattr(generation, "choose_tokens", _forcing(tok.llm.convert_tokens_to_ids(want["schedule"])))
    settings = DecodeSettings(max_new_tokens=want["max_new_tokens"])
    (result,) = generation.generate(loaded["model"], tok.llm, batch, settings)
    assert result.token_ids == want["tokens"]
    assert [list(s) for s in result.spans_idx] == want["spans_idx"]
    torch.testing.assert_close(result.probs, tensors[f"{key}.probs"], **TOL)
    assert result.text == want["text"]
