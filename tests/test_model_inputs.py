"""Bad input to the model core gets a ValueError naming the field, never a torch shape error."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from d2vlm_ray.model.inputs import IGNORE_INDEX, build_batch
from d2vlm_ray.model.tokenizer import (
    build_tiny_llm_tokenizer,
    chat_prompt,
    detokenize,
    detokenize_with_refs,
    emits_bos,
    tokenize_prompt,
    tokenize_response,
)
from tests.helpers_model import tiny_tokenizers

RESPONSE = "<evi></evi>The event happens in <evi>."


def _feats(n: int) -> torch.Tensor:
    return torch.zeros(n, 16, 48)


def _build(**kwargs):
    tok = tiny_tokenizers()
    args = dict(
        questions=["When does the red square stop?"],
        patches=[_feats(10)],
        timestamps_s=[np.arange(10.0)],
        durations_s=[10.0],
        responses=[RESPONSE],
        spans_s=[[(2.0, 4.0)]],
    )
    args.update(kwargs)
    return build_batch(tok.llm, tok.qformer, **args)


def test_labels_mask_the_prompt_and_keep_the_response() -> None:
    batch = _build()
    prompt_len = batch.prompt_lens[0]
    assert batch.labels[0][:prompt_len] == [IGNORE_INDEX] * prompt_len
    assert batch.labels[0][prompt_len:] == batch.suffix_ids[0][prompt_len:]
    assert batch.evi_spans_idx[0] == [(2, 4), (2, 4)], "each event span is used for both <evi> copies"


def test_prompt_is_tokenized_chunkwise_around_the_frames() -> None:
    tok = tiny_tokenizers().llm
    ids = tokenize_prompt(tok, "what colour is the square?")
    # Like Phi-3's tokenizer, the tiny one has a BOS token but does not emit it on encode,
    # so (as in the official tokenization) the prompt starts with <|system|>, no BOS.
    assert tok.bos_token_id is not None and not emits_bos(tok)
    assert tok.convert_ids_to_tokens(ids.prefix_ids)[0] == "<|system|>"
    assert tok.bos_token_id not in ids.prefix_ids + ids.suffix_ids
    assert tok.convert_ids_to_tokens(ids.prefix_ids)[-1] == "<|user|>"
    assert tok.convert_ids_to_tokens(ids.suffix_ids)[-2:] == ["<|end|>", "<|assistant|>"]
    assert chat_prompt("q").startswith("<|system|>\nYou are a helpful AI assistant.<|end|>\n<|user|>\n<image>\nq")


def _bos_emitting_tokenizer():
    """The tiny tokenizer with a post-processor that prepends BOS (as Llama-style ones do)."""
    from tokenizers.processors import TemplateProcessing

    tok = build_tiny_llm_tokenizer()
    tok.backend_tokenizer.post_processor = TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", tok.bos_token_id)]
    )
    return tok


def test_a_tokenizer_that_emits_bos_keeps_exactly_one() -> None:
    tok = _bos_emitting_tokenizer()
    assert emits_bos(tok)
    ids = tokenize_prompt(tok, "what colour is the square?")
    assert ids.prefix_ids[0] == tok.bos_token_id
    assert (ids.prefix_ids + ids.suffix_ids).count(tok.bos_token_id) == 1


def test_detokenize_writes_seconds_and_keeps_the_delimiter() -> None:
    tok = tiny_tokenizers().llm
    ids = tokenize_response(tok, RESPONSE)
    text = detokenize(tok, ids, [(3.0, 12.5), (3.0, 12.5)])
    # The official string: one decode of the whole sequence, "<evi>" -> "s - e " (note the
    # space after the span), the trailing "<|end|>" stop string cut and the rest stripped.
    assert text == "3 - 12.5  </evi> the event happens in 3 - 12.5  ."
    with pytest.raises(ValueError, match="spans_s"):
        detokenize(tok, ids, [(1.0, 2.0)])


def test_detokenize_with_refs_points_at_each_span() -> None:
    tok = tiny_tokenizers().llm
    ids = tok.convert_tokens_to_ids(["the", "<evi>", "event", "<evi>", "<evi>", "<|end|>"])
    spans = [(1.0, 2.5), (3.0, 4.0), (0.0, 10.0)]
    detok = detokenize_with_refs(tok, ids, spans)
    assert detok.text == detokenize(tok, ids, spans)
    assert [detok.text[a:b] for a, b in detok.evidence_chars] == ["1 - 2.5", "3 - 4", "0 - 10"]
    assert detok.text.endswith("0 - 10")


def test_spans_partly_outside_are_clamped_and_counted() -> None:
    batch = _build(spans_s=[[(8.0, 14.0)]])
    assert batch.evi_spans_idx[0] == [(8, 9), (8, 9)]
    assert batch.span_stats.clamped == 1


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"spans_s": [[(20.0, 30.0)]]}, "spans_s"),
        ({"spans_s": [[(math.nan, 3.0)]]}, "spans_s"),
        ({"patches": [_feats(0)], "timestamps_s": [np.array([])]}, "patches"),
        ({"questions": ["   "]}, "questions"),
        ({"durations_s": [10.0, 12.0]}, "durations_s"),
        ({"responses": [RESPONSE, RESPONSE]}, "responses"),
        ({"spans_s": [[(1.0, 2.0), (3.0, 4.0)]]}, "spans_s"),
        ({"timestamps_s": [np.arange(9.0)]}, "timestamps_s"),
        ({"questions": ["What happened during <evi>?"]}, "src_spans_s"),
        ({"questions": ["where is <image> now?"]}, "question"),
    ],
)
def test_bad_input_names_the_field(kwargs: dict, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        _build(**kwargs)


def test_question_longer_than_the_context_is_rejected() -> None:
    tok = tiny_tokenizers()
    with pytest.raises(ValueError, match="context"):
        build_batch(
            tok.llm, tok.qformer, ["red " * 300], [_feats(10)], [np.arange(10.0)], [10.0], max_context=256
        )


def test_question_side_evidence_spans_are_mapped() -> None:
    batch = _build(questions=["What happened during <evi>?"], src_spans_s=[[(5.0, 7.0)]])
    assert batch.src_spans_idx[0] == [(5, 7)]


def test_generation_refuses_to_run_past_the_context() -> None:
    from d2vlm_ray.config import DecodeSettings
    from d2vlm_ray.model.generation import generate
    from tests.helpers_model import tiny_model

    model = tiny_model()
    tok = tiny_tokenizers()
    batch = build_batch(tok.llm, tok.qformer, ["When does it stop?"], [_feats(1000)], [np.arange(1000.0)], [1000.0])
    with pytest.raises(ValueError, match="exceed the model's context of 1024"):
        generate(model, tok.llm, batch, DecodeSettings(max_new_tokens=64))


def test_missing_qformer_tokenizer_dir_names_the_setting(tmp_path) -> None:
    from d2vlm_ray.config import ModelConfig, from_dict
    from d2vlm_ray.model.builders import build_tokenizers

    cfg = from_dict(ModelConfig, {"preset": "tiny", "qformer": {"tokenizer_dir": str(tmp_path / "missing")}})
    with pytest.raises(FileNotFoundError, match="model.qformer.tokenizer_dir"):
        build_tokenizers(cfg)
    with pytest.raises(FileNotFoundError, match="model.tokenizer_dir"):
        build_tokenizers(from_dict(ModelConfig, {"preset": "phi3-mini"}))
