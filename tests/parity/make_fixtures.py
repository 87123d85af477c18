"""Run the official D2VLM code at a reduced size and dump what the project must reproduce.

This script is a test tool, never a run-time dependency. It runs in its own environment
(transformers 4.44, the official code's pin) with the official repository on
``sys.path``; see ``tests/parity/README.md`` for the commands. It imports nothing from the
official code into the project and copies none of it: it builds the official model
(``ETChatPhi3ForCausalLM`` with ``d2vlm_arch``), fills it with the seeded weights of
:mod:`tests.parity.weights`, and records, through wrappers around the official methods:

- the prompt and training ids of the official tokenization (``tokenize``,
  ``preprocess_multi_row_evi``, ``MultimodalDataCollator``) and the Q-Former's ids;
- for an SFT batch (``forward_evi``): frame tokens, layer-6 frame states, the inputs
  after ``<evi>`` injection, all hidden states, logits, grounding similarities and soft
  targets, and every loss term;
- for FPO pairs: chosen/rejected log-likelihoods (``calculate_logps``) and the loss
  (``dpo_loss``), each branch scored by its own official SFT forward;
- greedy generation and generation under a forced token schedule (``forward_evi_infer``
  through ``generate``): tokens, per-step spans and probabilities, and the official
  detokenized text.

Only modules that cannot be imported here are stubbed, and none of them is exercised:
``d2vlm.utils.transforms`` (torchvision does not import next to torch 2.13 CPU),
``d2vlm.utils.io`` (video decoding; pixels come from the seed) and
``d2vlm.train.d2vlm_trainer`` (deepspeed's trainer). The Q-Former's ``bert-base-uncased``
tokenizer and config, which the official code downloads, are replaced by a local
vocabulary (the tiny word list) and a reduced ``BertConfig``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import types
from pathlib import Path
from types import SimpleNamespace

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from tests.parity import samples as S  # noqa: E402
from tests.parity.weights import official_weights, weights_sha256  # noqa: E402


def _stub_unimportable_modules() -> None:
    """Placeholders for official modules whose imports fail here and that are never called."""
    stubs = {
        "d2vlm.utils.transforms": {"get_transform": None, "MEAN": None},
        "d2vlm.utils.io": {"load_image": None, "load_video": None},
        "d2vlm.train.d2vlm_trainer": {"ETChatTrainer": object},
    }
    for name, attrs in stubs.items():
        module = types.ModuleType(name)
        module.__dict__.update(attrs)
        sys.modules[name] = module


def _flat(spans: list[tuple[float, float]]) -> list[float] | None:
    out = [float(x) for span in spans for x in span]
    return out or None


class _Recorder:
    """Collects what the wrapped official functions see and return."""

    def __init__(self) -> None:
        self.llm_calls: list[dict] = []
        self.bce: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        self.l1: list[torch.Tensor] = []
        self.frame_tokens: list[list[torch.Tensor]] = []
        self.qformer_ids: list[torch.Tensor] = []

    def reset(self) -> None:
        self.__init__()


def build_official(tok, qformer_vocab: Path, rec: _Recorder):
    """The official model at the reduced size, with wrappers that feed ``rec``."""
    from transformers import BertTokenizer
    from transformers.models.phi3 import modeling_phi3

    import d2vlm.model.d2vlm_arch as arch
    from d2vlm.model.language_model.phi3 import ETChatPhi3Config, ETChatPhi3ForCausalLM
    from d2vlm.model.qformer import BertConfig

    class LocalBertTokenizer(BertTokenizer):
        @classmethod
        def from_pretrained(cls, *_args, **kwargs):  # noqa: D102 - replaces the download
            return cls(str(qformer_vocab), do_lower_case=True, **kwargs)

    class LocalBertConfig(BertConfig):
        @classmethod
        def from_pretrained(cls, *_args, **_kwargs):  # noqa: D102 - replaces the download
            return cls(
                vocab_size=len(S.QFORMER_SPECIALS),  # resized to the tokenizer by the official code
                hidden_size=S.QFORMER["hidden_size"],
                num_hidden_layers=S.QFORMER["num_layers"],
                num_attention_heads=S.QFORMER["num_heads"],
                intermediate_size=S.QFORMER["intermediate_size"],
                hidden_dropout_prob=0.0,
                attention_probs_dropout_prob=0.0,
                max_position_embeddings=512,
            )

    arch.BertTokenizer = LocalBertTokenizer
    arch.BertConfig = LocalBertConfig

    class RecordingF:
        """``torch.nn.functional`` for d2vlm_arch, recording the grounding BCE and the L1."""

        def __getattr__(self, name):
            return getattr(torch.nn.functional, name)

        @staticmethod
        def binary_cross_entropy_with_logits(sim, target, *a, **k):
            out = torch.nn.functional.binary_cross_entropy_with_logits(sim, target, *a, **k)
            rec.bce.append((sim.detach().clone(), target.detach().clone(), out.detach().clone()))
            return out

        @staticmethod
        def l1_loss(x, y, *a, **k):
            out = torch.nn.functional.l1_loss(x, y, *a, **k)
            rec.l1.append(out.detach().clone())
            return out

    arch.F = RecordingF()

    llm_forward = modeling_phi3.Phi3ForCausalLM.forward

    def recording_forward(self, *args, **kwargs):
        out = llm_forward(self, *args, **kwargs)
        # forward_evi adds its grounding terms to out.loss in place: keep the LM loss now.
        loss = out.loss.detach().clone() if out.loss is not None else None
        rec.llm_calls.append({"kwargs": kwargs, "out": out, "lm_loss": loss})
        return out

    modeling_phi3.Phi3ForCausalLM.forward = recording_forward

    cfg = ETChatPhi3Config(
        arch_module="d2vlm_arch",
        vocab_size=len(tok),
        hidden_size=S.LLM["hidden_size"],
        intermediate_size=S.LLM["intermediate_size"],
        num_hidden_layers=S.LLM["num_layers"],
        num_attention_heads=S.LLM["num_heads"],
        num_key_value_heads=S.LLM["num_heads"],
        max_position_embeddings=S.LLM["max_position_embeddings"],
        original_max_position_embeddings=S.LLM["max_position_embeddings"],
        rope_theta=10000.0,
        rms_norm_eps=1e-5,
        sliding_window=None,
        tie_word_embeddings=False,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attention_dropout=0.0,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        attn_implementation="eager",
        mm_projector="qformer",
        vision_output_token="patch",
        vision_tower="eva_vit",
        vision_output_layer=S.VISION["num_layers"] - 1,
        use_matching=False,
        use_evidence=True,
        use_time_tag=False,
        bi_attention=True,
        alpha=S.ALPHA,
        consistency_loss=True,
        evidence_token_id=tok.convert_tokens_to_ids("<evi>"),
        conv_type="phi3",
    )
    # The official EVA tower fixes its width at 1408; the reduced width is set on the class
    # before construction (heads stay width // 88, the official rule).
    from d2vlm.model.vision_encoder import eva_vit

    eva_init = eva_vit.EVAVisionTransformer.__init__

    def reduced_eva_init(self, idx, use_checkpoint=False, drop_path_rate=0.0):
        torch.nn.Module.__init__(self)
        self.size, self.patch_size, self.out_channel = S.VISION["image_size"], S.VISION["patch_size"], S.VISION["hidden_size"]
        self.use_checkpoint, self.drop_path_rate = use_checkpoint, drop_path_rate
        from functools import partial

        self.vision_tower = eva_vit.VisionTransformer(
            img_size=self.size,
            patch_size=self.patch_size,
            embed_dim=self.out_channel,
            depth=idx + 1,
            num_heads=self.out_channel // 88,
            mlp_ratio=4.3637,
            qkv_bias=True,
            drop_path_rate=drop_path_rate,
            norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
            use_checkpoint=use_checkpoint,
        )

    eva_vit.EVAVisionTransformer.__init__ = reduced_eva_init
    try:
        model = ETChatPhi3ForCausalLM(cfg)
    finally:
        eva_vit.EVAVisionTransformer.__init__ = eva_init

    encode_image = model.encode_image

    def recording_encode_image(*args, **kwargs):
        out = encode_image(*args, **kwargs)
        rec.frame_tokens.append([e.detach().clone() for e in out])
        return out

    model.encode_image = recording_encode_image
    bert = model.model.qformer_bert.bert
    bert_forward = bert.forward

    def recording_bert_forward(input_ids, *args, **kwargs):
        rec.qformer_ids.append(input_ids.detach().clone())
        return bert_forward(input_ids, *args, **kwargs)

    bert.forward = recording_bert_forward
    return model


def load_seeded_weights(model) -> tuple[dict[str, list[int]], str]:
    """Fill the official model with the seeded weights; returns the key → shape manifest and its sha256."""
    state = model.state_dict()
    # The Q-Former's BERT LM head (qformer_bert.cls.*) is never run and the release has no
    # such keys (spec 7.2); everything else gets seeded weights.
    shapes = {k: tuple(v.shape) for k, v in state.items() if ".cls." not in k}
    weights = official_weights(shapes, S.SEED)
    missing, unexpected = model.load_state_dict(weights, strict=False)
    assert not unexpected, unexpected
    assert all(".cls." in k for k in missing), [k for k in missing if ".cls." not in k]
    return {k: list(v) for k, v in shapes.items()}, weights_sha256(weights)


def sft_batch(tok, items: list[tuple[int, str, str, list, list, int]]):
    """Official preprocessing and collation of ``(sample_idx, question, response, spans, src, F)``."""
    from d2vlm.train.train import MultimodalDataCollator, preprocess_multi_row_evi

    model_args = SimpleNamespace(conv_type="phi3", use_evidence=True, use_matching=False, vision_processor="clip_center_224")
    data_args = SimpleNamespace(gather_conv_query=False)
    rows = []
    for sample_idx, question, response, spans, src, frames in items:
        conv = [{"from": "human", "value": "<image>\n" + question}, {"from": "gpt", "value": response}]
        data = preprocess_multi_row_evi(conv, tok, model_args, data_args, "video")
        data["image"] = S.pixels(sample_idx, frames)
        data["tag"] = None
        data["src"] = _flat(src)
        data["tgt"] = _flat(spans)
        rows.append(data)
    return MultimodalDataCollator(tok, model_args)(rows), rows


def run_sft(model, tok, rec: _Recorder, items, prefix: str, dump: dict, meta: dict) -> dict:
    """One official training forward; dumps per-sample tensors and the loss terms."""
    batch, rows = sft_batch(tok, items)
    rec.reset()
    model.train()
    out = model(**batch)
    part1, part2 = rec.llm_calls[0], rec.llm_calls[1]
    hidden1 = part1["out"].hidden_states
    hidden2 = part2["out"].hidden_states
    embeds2 = part2["kwargs"]["inputs_embeds"]
    labels2 = part2["kwargs"]["labels"]
    lm = part2["lm_loss"]
    n = len(rec.bce)
    bce = [b[2] for b in rec.bce]
    l1 = list(rec.l1)
    info = {"samples": [], "lm": float(lm), "bce": [float(x) for x in bce], "l1": [float(x) for x in l1]}
    info["grounding"] = float(sum(bce) / n)
    info["consistency"] = float(sum(l1) / n)
    info["total"] = float(out.loss)
    frm_all = model.frm_head(hidden2[-2]).detach()
    evi_all = model.evi_head(hidden2[-2]).detach()
    bce_iter = iter(rec.bce)
    for b, (row, item) in enumerate(zip(rows, items)):
        frames = item[5]
        n_prefix = int((row["input_ids_part1"] != -200).sum())  # text tokens before the frames
        length = n_prefix + frames + row["input_ids_part2"].shape[0]
        sep = model.model.img_token_pos[b][-1]
        assert sep == [n_prefix, n_prefix + frames], sep
        key = f"{prefix}.{b}"
        dump[f"{key}.frame_tokens"] = rec.frame_tokens[0][b][0]
        dump[f"{key}.frame_states6"] = hidden1[6][b, sep[0] : sep[1]].detach()
        dump[f"{key}.inputs_embeds"] = embeds2[b, :length].detach()
        dump[f"{key}.hidden"] = torch.stack([h[b, :length] for h in hidden2]).detach()
        dump[f"{key}.logits"] = part2["out"].logits[b, :length].detach()
        if item[3]:
            sim, target, _ = next(bce_iter)
            dump[f"{key}.sim"] = sim
            dump[f"{key}.sim_tgt"] = target
        info["samples"].append(
            {
                "input_ids_part1": row["input_ids_part1"].tolist(),
                "input_ids_part2": row["input_ids_part2"].tolist(),
                "length": length,
                "frame_start": sep[0],
                "qformer_ids": rec.qformer_ids[b][0].tolist(),  # one Q-Former call per sample
            }
        )
        info["samples"][-1]["_labels"] = labels2[b, :length].tolist()
    info["_frm"], info["_evi"], info["_logits"] = frm_all, evi_all, part2["out"].logits.detach()
    info["_seps"] = [model.model.img_token_pos[b][-1] for b in range(len(items))]
    meta[prefix] = {k: v for k, v in info.items() if not k.startswith("_")}
    meta[prefix]["samples"] = [{k: v for k, v in s.items() if not k.startswith("_")} for s in info["samples"]]
    return info


def branch_logps(model, tok, info: dict, b: int, spans: list[tuple[float, float]]) -> torch.Tensor:
    """Official ``calculate_logps`` of sample ``b`` of an SFT forward, its whole response scored.

    The events are what ``build_fpo_anno.py`` writes for a temporal or textual pair: every
    response token (and the closing ``<|end|>``) as text, every response ``<evi>`` as
    grounding with the annotation spans (grounding copies, then answer copies) unrounded.
    """
    evi_id = tok.convert_tokens_to_ids("<evi>")
    labels = info["samples"][b]["_labels"]
    positions = [p for p, t in enumerate(labels) if t != -100]
    pairs = [list(span) for span in spans]
    event = {
        "text": {"input_index": [p - 1 for p in positions], "logit_token_id": [labels[p] for p in positions]},
        "grounding": {"input_index": [p - 1 for p in positions if labels[p] == evi_id], "tgt": pairs + pairs},
    }
    sep = info["_seps"][b]
    frm = info["_frm"][b, sep[0] : sep[1]]
    # calculate_logps lives on the FPO arch's mixin; it reads only self.config.alpha, so it
    # is called unbound on the SFT-arch model that produced the tensors.
    from d2vlm.model.d2vlm_fpo_arch import D2VLMMetaForCausalLM as FPOMixin

    return FPOMixin.calculate_logps(model, frm, info["_evi"][b], info["_logits"][b], event, 0)


def run_generation(model, tok, sample_idx: int, max_new: int, schedule: list[str] | None, dump: dict, meta: dict, key: str):
    """Official ``generate`` (``forward_evi_infer``) with greedy choice or a forced schedule."""
    from transformers import LogitsProcessor

    from d2vlm.conversation import get_conv
    from d2vlm.utils.inference import KeywordsStoppingCriteria
    from d2vlm.utils.tokenization import detokenize, tokenize

    question, _, _, src, frames = S.SFT_SAMPLES[sample_idx]
    conv = get_conv("phi3")
    conv.append_message(conv.roles[0], "<image>\n" + question)
    conv.append_message(conv.roles[1], None)
    prompt = conv.get_prompt()
    input_ids = tokenize(prompt, tok).unsqueeze(0)
    processors = None
    if schedule is not None:
        forced = tok.convert_tokens_to_ids(schedule)
        start = input_ids.shape[1]

        class ForceSchedule(LogitsProcessor):
            def __call__(self, ids, scores):
                step = ids.shape[1] - start
                if step < len(forced):
                    scores = torch.full_like(scores, -1e9)
                    scores[:, forced[step]] = 0.0
                return scores

        processors = [ForceSchedule()]
    model.eval()
    with torch.inference_mode():
        out = model.generate(
            input_ids,
            image=[S.pixels(sample_idx, frames)],
            do_sample=False,
            max_new_tokens=max_new,
            cache_implementation=None,
            logits_processor=processors,
            stopping_criteria=[KeywordsStoppingCriteria(tok, "<|end|>")],
            query=[[question]],
            src=[_flat(src)],
            tag=[None],
            pad_token_id=tok.pad_token_id,
        )
    tokens = out[0, input_ids.size(1) :]
    text = detokenize(tokens, model, tok)
    # The official inference script's post-processing of the detokenized text.
    if text.endswith("<|end|>"):
        text = text[: -len("<|end|>")].strip()
    evi_id = tok.convert_tokens_to_ids("<evi>")
    evi_steps = [i for i, t in enumerate(tokens.tolist()) if t == evi_id]
    meta[key] = {
        "sample": sample_idx,
        "max_new_tokens": max_new,
        "schedule": schedule,
        "prompt_ids": input_ids[0].tolist(),
        "tokens": tokens.tolist(),
        "spans_idx": [model.tgt[i][0] for i in evi_steps],
        "text": text,
    }
    dump[f"{key}.probs"] = torch.stack([model.sim[i] for i in evi_steps]) if evi_steps else torch.zeros(0, frames)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--official", required=True, help="directory holding the official repo's d2vlm package")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "fixtures"))
    args = parser.parse_args()
    sys.path.insert(0, str(Path(args.official).resolve()))
    _stub_unimportable_modules()
    torch.manual_seed(S.SEED)
    torch.use_deterministic_algorithms(True)

    from d2vlm.model.language_model import phi3  # noqa: F401 - registers etchat_phi3

    from d2vlm_ray.data import vocab
    from d2vlm_ray.model.tokenizer import build_tiny_llm_tokenizer

    tok = build_tiny_llm_tokenizer()
    tmp = Path(tempfile.mkdtemp(prefix="d2vlm_parity_"))
    qformer_vocab = tmp / "vocab.txt"
    words = [w for w in vocab.all_words() if w not in S.QFORMER_SPECIALS]
    qformer_vocab.write_text("\n".join(S.QFORMER_SPECIALS + words) + "\n")

    rec = _Recorder()
    model = build_official(tok, qformer_vocab, rec)
    manifest, digest = load_seeded_weights(model)
    dump: dict[str, torch.Tensor] = {}
    meta: dict = {"seed": S.SEED, "weights_sha256": digest, "official_shapes": manifest}

    with torch.no_grad():
        items = [(i, q, r, spans, src, f) for i, (q, r, spans, src, f) in enumerate(S.SFT_SAMPLES)]
        run_sft(model, tok, rec, items, "sft", dump, meta)

        chosen_items, rejected_items = [], []
        for sample_idx, chosen_spans, rejected_text, rejected_spans in S.FPO_PAIRS:
            q, r, _, src, f = S.SFT_SAMPLES[sample_idx]
            chosen_items.append((sample_idx, q, r, chosen_spans, src, f))
            rejected_items.append((sample_idx, q, rejected_text, rejected_spans, src, f))
        chosen = run_sft(model, tok, rec, chosen_items, "fpo_chosen", dump, meta)
        rejected = run_sft(model, tok, rec, rejected_items, "fpo_rejected", dump, meta)
        chosen_logps = [branch_logps(model, tok, chosen, b, it[3]) for b, it in enumerate(chosen_items)]
        rejected_logps = [branch_logps(model, tok, rejected, b, it[3]) for b, it in enumerate(rejected_items)]
        from d2vlm.model.d2vlm_fpo_arch import D2VLMMetaForCausalLM as FPOMixin

        dpo = [FPOMixin.dpo_loss(model, c, r) for c, r in zip(chosen_logps, rejected_logps)]
        preference = float(sum(dpo) / len(dpo))
        meta["fpo"] = {
            "chosen_logp": [float(x) for x in chosen_logps],
            "rejected_logp": [float(x) for x in rejected_logps],
            "preference": preference,
            "total": meta["fpo_chosen"]["total"] + preference,
        }

    for g, (sample_idx, max_new, schedule) in enumerate(S.GENERATIONS):
        run_generation(model, tok, sample_idx, max_new, schedule, dump, meta, f"gen{g}")

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    from safetensors.torch import save_file

    save_file({k: v.contiguous().float() for k, v in dump.items()}, str(out / "official.safetensors"))
    import transformers

    meta["environment"] = {"torch": torch.__version__, "transformers": transformers.__version__}
    (out / "official.json").write_text(json.dumps(meta, indent=1))
    print(f"wrote {len(dump)} tensors and {out / 'official.json'}")


if __name__ == "__main__":
    main()
