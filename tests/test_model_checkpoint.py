"""Checkpoint round trips, the official key map and the phi3-mini trainable counts."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from d2vlm_ray.config import ModelConfig, from_dict
from d2vlm_ray.model.builders import build_d2vlm
from d2vlm_ray.model.checkpoint import (
    from_official_state_dict,
    from_pretrained,
    load_frame_encoder,
    native_state_dict,
    save_pretrained,
    to_official_state_dict,
)
from d2vlm_ray.model.inputs import build_batch
from d2vlm_ray.model.lora import apply_lora, trainable_counts
from d2vlm_ray.model.vision import weights_sha256
from tests.helpers_model import encode, square_clip, tiny_config, tiny_model, tiny_tokenizers


def _batch(model):
    tok = tiny_tokenizers()
    feats = encode(model, square_clip(6, 1, 3, (255, 0, 0)))
    return build_batch(
        tok.llm, tok.qformer, ["When does the red square appear?"], [feats], [np.arange(6.0)], [6.0],
        responses=["<evi></evi>The event happens in <evi>."], spans_s=[[(1.0, 3.0)]],
    )


def test_save_load_round_trip_gives_identical_logits(tmp_path) -> None:
    model = tiny_model(seed=3)
    batch = _batch(model)
    with torch.no_grad():
        before = model(batch)
    save_pretrained(model, tiny_config(), tiny_tokenizers(), tmp_path)
    loaded, tokenizers, cfg = from_pretrained(tmp_path)
    with torch.no_grad():
        after = loaded(batch)
    assert torch.equal(before.logits, after.logits)
    assert all(torch.equal(a, b) for a, b in zip(before.evidence_logits, after.evidence_logits))
    assert cfg.llm.vocab_size == len(tokenizers.llm)
    assert tokenizers.llm("red square")["input_ids"] == tiny_tokenizers().llm("red square")["input_ids"]
    assert load_frame_encoder(tmp_path).encoder_id.endswith(weights_sha256(loaded.vision)[:16])


def test_lora_checkpoint_is_saved_merged(tmp_path) -> None:
    model = tiny_model(seed=4)
    apply_lora(model, tiny_config().lora)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.2)
    batch = _batch(model)
    with torch.no_grad():
        before = model(batch).logits
    save_pretrained(model, tiny_config(), tiny_tokenizers(), tmp_path)
    assert not any("lora_" in k for k in native_state_dict(model))
    loaded, _, _ = from_pretrained(tmp_path)
    with torch.no_grad():
        after = loaded(batch).logits
    assert torch.allclose(before, after, atol=1e-5)
    # The live model keeps its adapters after saving.
    assert any("lora_A" in n for n, _ in model.named_parameters())


def test_official_map_round_trips_tiny_state() -> None:
    state = native_state_dict(tiny_model(seed=5))
    back = from_official_state_dict(to_official_state_dict(state))
    assert set(back) == set(state)
    assert all(torch.equal(back[k], state[k]) for k in state)


def _spec_official_shapes() -> dict[str, tuple[int, ...]]:
    """Key names and shapes of the official full checkpoint, written out from spec §7.2."""
    shapes: dict[str, tuple[int, ...]] = {
        "model.embed_tokens.weight": (32064, 3072),
        "model.norm.weight": (3072,),
        "lm_head.weight": (32064, 3072),
    }
    for i in range(32):
        p = f"model.layers.{i}."
        shapes.update({
            p + "self_attn.qkv_proj.weight": (9216, 3072),
            p + "self_attn.o_proj.weight": (3072, 3072),
            p + "mlp.gate_up_proj.weight": (16384, 3072),
            p + "mlp.down_proj.weight": (3072, 8192),
            p + "input_layernorm.weight": (3072,),
            p + "post_attention_layernorm.weight": (3072,),
        })
    v = "model.vision_tower.vision_tower."
    shapes.update({v + "patch_embed.proj.weight": (1408, 3, 14, 14), v + "patch_embed.proj.bias": (1408,),
                   v + "cls_token": (1, 1, 1408), v + "pos_embed": (1, 257, 1408)})
    for i in range(39):
        p = f"{v}blocks.{i}."
        for norm in ("norm1", "norm2"):
            shapes.update({p + f"{norm}.weight": (1408,), p + f"{norm}.bias": (1408,)})
        shapes.update({
            p + "attn.q_bias": (1408,), p + "attn.v_bias": (1408,), p + "attn.qkv.weight": (4224, 1408),
            p + "attn.proj.weight": (1408, 1408), p + "attn.proj.bias": (1408,),
            p + "mlp.fc1.weight": (6144, 1408), p + "mlp.fc1.bias": (6144,),
            p + "mlp.fc2.weight": (1408, 6144), p + "mlp.fc2.bias": (1408,),
        })
    b = "model.qformer_bert.bert."
    shapes.update({b + "embeddings.word_embeddings.weight": (30523, 768),
                   b + "embeddings.position_embeddings.weight": (512, 768),
                   b + "embeddings.LayerNorm.weight": (768,), b + "embeddings.LayerNorm.bias": (768,),
                   # BERT's persistent buffer, carried by official checkpoints (0..511).
                   b + "embeddings.position_ids": (1, 512)})

    def attention(prefix: str, kv_width: int) -> None:
        for name, width in (("query", 768), ("key", kv_width), ("value", kv_width)):
            shapes.update({f"{prefix}.self.{name}.weight": (768, width), f"{prefix}.self.{name}.bias": (768,)})
        shapes.update({f"{prefix}.output.dense.weight": (768, 768), f"{prefix}.output.dense.bias": (768,),
                       f"{prefix}.output.LayerNorm.weight": (768,), f"{prefix}.output.LayerNorm.bias": (768,)})

    for i in range(12):
        p = f"{b}encoder.layer.{i}"
        attention(p + ".attention", 768)
        if i % 2 == 0:
            attention(p + ".crossattention", 1408)
        for ffn_in, ffn_out in (("intermediate", "output"), ("intermediate_query", "output_query")):
            shapes.update({f"{p}.{ffn_in}.dense.weight": (3072, 768), f"{p}.{ffn_in}.dense.bias": (3072,),
                           f"{p}.{ffn_out}.dense.weight": (768, 3072), f"{p}.{ffn_out}.dense.bias": (768,),
                           f"{p}.{ffn_out}.LayerNorm.weight": (768,), f"{p}.{ffn_out}.LayerNorm.bias": (768,)})
    shapes.update({"model.qformer_query": (1, 32, 768), "model.qformer_ln.weight": (1408,),
                   "model.qformer_ln.bias": (1408,), "model.qformer_proj.weight": (1408, 768),
                   "model.qformer_proj.bias": (1408,)})
    for proj, width in (("q", 1408), ("k", 1408), ("v", 3072)):
        p = f"model.qformer_{proj}_proj."
        shapes.update({p + "0.weight": (1408,), p + "0.bias": (1408,), p + "1.weight": (width, 1408), p + "1.bias": (width,)})
    for head in ("frm_head", "evi_head"):
        shapes.update({f"{head}.0.weight": (3072,), f"{head}.0.bias": (3072,), f"{head}.1.weight": (1536, 3072),
                       f"{head}.1.bias": (1536,), f"{head}.3.weight": (3072, 1536), f"{head}.3.bias": (3072,)})
    return shapes


@pytest.fixture(scope="module")
def phi3_mini_meta():
    cfg = from_dict(ModelConfig, {"preset": "phi3-mini"})
    with torch.device("meta"):
        model = build_d2vlm(cfg, evi_token_id=32011, pad_token_id=32000)
    return cfg, model


def test_phi3_mini_official_key_names_and_shapes(phi3_mini_meta) -> None:
    _, model = phi3_mini_meta
    official = to_official_state_dict(model.state_dict())
    expected = _spec_official_shapes()
    assert sorted(set(official) - set(expected)) == [], "extra keys"
    assert sorted(set(expected) - set(official)) == [], "missing keys"
    wrong = {k: (tuple(official[k].shape), v) for k, v in expected.items() if tuple(official[k].shape) != v}
    assert wrong == {}


def test_phi3_mini_trainable_counts_match_spec(phi3_mini_meta) -> None:
    cfg, model = phi3_mini_meta
    apply_lora(model, cfg.lora)
    counts = trainable_counts(model)
    spec = {"embed": 98.5e6, "lm_head": 98.5e6, "lora": 75.5e6, "qformer": 57.9e6, "frm_head": 9.45e6, "evi_head": 9.45e6}
    for group, value in spec.items():
        assert abs(counts[group] - value) / value < 0.005, (group, counts[group])
    assert set(counts) == set(spec) | {"total"}, "nothing else is trainable (the frame encoder never is)"


def test_official_dir_of_any_size_loads_from_its_own_config(tmp_path) -> None:
    """An official-layout checkpoint that is not phi3-mini sized loads with its own sizes."""
    from tests.helpers_model import parity_config, write_official_dir

    cfg = parity_config()
    tok = tiny_tokenizers()
    torch.manual_seed(3)
    model = build_d2vlm(cfg, tok).eval()
    write_official_dir(model, cfg, tok, tmp_path / "official")
    tok.qformer.save_pretrained(str(tmp_path / "qtok"))
    loaded, _, loaded_cfg = from_pretrained(tmp_path / "official", qformer_tokenizer_dir=str(tmp_path / "qtok"))
    assert (loaded_cfg.llm.hidden_size, loaded_cfg.llm.num_layers) == (96, 8)
    assert (loaded_cfg.vision.hidden_size, loaded_cfg.vision.num_layers, loaded_cfg.vision.num_heads) == (176, 2, 2)
    assert (loaded_cfg.qformer.hidden_size, loaded_cfg.qformer.num_layers, loaded_cfg.qformer.num_queries) == (64, 2, 4)
    assert (loaded_cfg.inject_layer_idx, loaded_cfg.ground_layer_idx) == (6, 7)
    loaded_state = native_state_dict(loaded)
    assert all(torch.equal(loaded_state[k], v) for k, v in native_state_dict(model).items())


def test_official_state_dict_carries_the_qformer_position_ids() -> None:
    official = to_official_state_dict(native_state_dict(tiny_model(seed=5)))
    pos = official["model.qformer_bert.bert.embeddings.position_ids"]
    rows = official["model.qformer_bert.bert.embeddings.position_embeddings.weight"].shape[0]
    assert pos.dtype == torch.long and torch.equal(pos, torch.arange(rows)[None])


def test_official_dir_without_llm_sizes_is_a_clear_error(tmp_path) -> None:
    import json

    from tests.helpers_model import parity_config, write_official_dir

    tok = tiny_tokenizers()
    write_official_dir(build_d2vlm(parity_config(), tok), parity_config(), tok, tmp_path / "official")
    meta = json.loads((tmp_path / "official" / "config.json").read_text())
    del meta["hidden_size"]
    (tmp_path / "official" / "config.json").write_text(json.dumps(meta))
    tok.qformer.save_pretrained(str(tmp_path / "qtok"))
    with pytest.raises(ValueError, match="hidden_size"):
        from_pretrained(tmp_path / "official", qformer_tokenizer_dir=str(tmp_path / "qtok"))


def test_grounding_constants_travel_from_the_config_to_the_model_and_back(tmp_path) -> None:
    """alpha and span_threshold are read from the model config: by generation, losses and loading."""
    cfg = tiny_config(alpha=3.0, span_threshold=0.8)
    torch.manual_seed(0)
    model = build_d2vlm(cfg, tiny_tokenizers()).eval()
    assert (model.alpha, model.span_threshold) == (3.0, 0.8)
    save_pretrained(model, cfg, tiny_tokenizers(), tmp_path)
    loaded, _, loaded_cfg = from_pretrained(tmp_path)
    assert (loaded.alpha, loaded.span_threshold) == (3.0, 0.8)
    assert (loaded_cfg.alpha, loaded_cfg.span_threshold) == (3.0, 0.8)


def test_checkpoints_from_before_the_loss_weights_moved_still_load(tmp_path) -> None:
    """Earlier configs carried the (never read) loss weights under "model"; they are dropped on load."""
    import json

    model = tiny_model(seed=5)
    save_pretrained(model, tiny_config(), tiny_tokenizers(), tmp_path)
    meta_path = tmp_path / "config.json"
    meta = json.loads(meta_path.read_text())
    meta["model"].update(grounding_loss_weight=10.0, consistency_loss_weight=10.0)
    meta_path.write_text(json.dumps(meta))
    loaded, _, cfg = from_pretrained(tmp_path)
    assert not hasattr(cfg, "grounding_loss_weight")
    batch = _batch(model)
    with torch.no_grad():
        assert torch.equal(model(batch).logits, loaded(batch).logits)
    assert load_frame_encoder(tmp_path).encoder_id.endswith(weights_sha256(loaded.vision)[:16])
