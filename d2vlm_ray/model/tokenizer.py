"""Tokenizers, the chat templates, ``<image>`` splicing and detokenisation.

With Phi-3's tokenizer (official) the LLM sees
``<|system|>\\n...<|end|>\\n<|user|>\\n<image>\\n{question}<|end|>\\n<|assistant|>\\n``
followed (in training) by ``{response}<|end|>``. A tokenizer that has ChatML's
``<|im_start|>``/``<|im_end|>`` as tokens (e.g. SmolLM2's) gets the ChatML template instead:
``<|im_start|>system\\n...<|im_end|>\\n<|im_start|>user\\n<image>\\n{question}<|im_end|>\\n<|im_start|>assistant\\n``,
its turns ending in ``<|im_end|>``: the template follows the tokenizer (:func:`chat_template`).
The ``<image>`` placeholder is replaced by one token per sampled frame, so the prompt is tokenized as two chunks around it: merging
them would change the ids at the chunk boundary.

Real runs load the checkpoint's own tokenizers (Phi-3's SentencePiece tokenizer and a
bert-base-uncased WordPiece vocabulary for the Q-Former) from local directories. The
``tiny`` preset builds both locally from :mod:`d2vlm_ray.data.vocab`, so nothing is ever
downloaded.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from transformers import BertTokenizerFast, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from d2vlm_ray.data import vocab
from d2vlm_ray.types import SpanS

EVI_TOKEN = "<evi>"
EVI_END_TOKEN = "</evi>"
IMAGE_TOKEN = "<image>"
END_TOKEN = "<|end|>"
SYSTEM_TOKEN = "<|system|>"
USER_TOKEN = "<|user|>"
ASSISTANT_TOKEN = "<|assistant|>"
EOS_TOKEN = "<|endoftext|>"
SYSTEM_PROMPT = "You are a helpful AI assistant."
QFORMER_BOS_TOKEN = "[DEC]"

CHATML_START_TOKEN = "<|im_start|>"
CHATML_END_TOKEN = "<|im_end|>"

# Phi-3's chat markers, then the two evidence tokens D2VLM adds (ids 32011/32012 in the
# official checkpoint, whose base tokenizer has 32011 entries).
_CHAT_SPECIALS = (SYSTEM_TOKEN, USER_TOKEN, ASSISTANT_TOKEN, END_TOKEN)
_EVIDENCE_SPECIALS = (EVI_TOKEN, EVI_END_TOKEN)


@dataclass(frozen=True)
class ChatTemplate:
    """A chat format: the header of each turn and the token that ends a turn.

    Attributes:
        name: ``phi3`` or ``chatml``.
        system_header: Text opening the system turn.
        user_header: Text opening the user turn.
        assistant_header: Text opening the assistant turn (the prompt ends with it).
        end: The end-of-turn token; generation stops on it and detokenisation cuts it.
    """

    name: str
    system_header: str
    user_header: str
    assistant_header: str
    end: str

    def prompt(self, question: str) -> str:
        """The prompt for one question, with the ``<image>`` placeholder before it."""
        return (
            f"{self.system_header}{SYSTEM_PROMPT}{self.end}\n{self.user_header}{IMAGE_TOKEN}\n"
            f"{question}{self.end}\n{self.assistant_header}"
        )


PHI3_TEMPLATE = ChatTemplate("phi3", f"{SYSTEM_TOKEN}\n", f"{USER_TOKEN}\n", f"{ASSISTANT_TOKEN}\n", END_TOKEN)
"""The official Phi-3 template."""

CHATML_TEMPLATE = ChatTemplate(
    "chatml",
    f"{CHATML_START_TOKEN}system\n",
    f"{CHATML_START_TOKEN}user\n",
    f"{CHATML_START_TOKEN}assistant\n",
    CHATML_END_TOKEN,
)
"""ChatML (SmolLM2, Qwen and others)."""


def _has_token(tokenizer: PreTrainedTokenizerBase, token: str) -> bool:
    """Whether ``token`` is one entry of the vocabulary (not split, not unknown)."""
    tid = tokenizer.convert_tokens_to_ids(token)
    return tid is not None and tid != tokenizer.unk_token_id


def chat_template(tokenizer: PreTrainedTokenizerBase) -> ChatTemplate:
    """ChatML when the tokenizer has ``<|im_start|>`` and ``<|im_end|>`` as tokens, else Phi-3's."""
    if _has_token(tokenizer, CHATML_START_TOKEN) and _has_token(tokenizer, CHATML_END_TOKEN):
        return CHATML_TEMPLATE
    return PHI3_TEMPLATE


@dataclass(frozen=True)
class TokenIds:
    """Ids the model and decoder need, resolved once from a tokenizer."""

    evi: int
    evi_end: int
    end: int
    pad: int
    bos: int | None

    @classmethod
    def from_tokenizer(cls, tokenizer: PreTrainedTokenizerBase) -> TokenIds:
        """Look the special ids up (``end`` = the chat template's end-of-turn token); raises
        ``ValueError`` if the tokenizer lacks one."""
        ids = {}
        end = chat_template(tokenizer).end
        for name, tok in (("evi", EVI_TOKEN), ("evi_end", EVI_END_TOKEN), ("end", end)):
            tid = tokenizer.convert_tokens_to_ids(tok)
            if tid is None or tid == tokenizer.unk_token_id:
                raise ValueError(f"tokenizer has no {tok!r} token; load it with load_llm_tokenizer()")
            ids[name] = int(tid)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        if pad is None:
            raise ValueError("tokenizer has neither a pad nor an eos token")
        return cls(pad=int(pad), bos=tokenizer.bos_token_id, **ids)


def build_tiny_llm_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer over :func:`d2vlm_ray.data.vocab.all_words` (lower-cased).

    Special tokens come first so their ids are stable: ``<unk>`` 0, ``<s>`` 1,
    ``<|endoftext|>`` 2, the chat markers, then ``<evi>`` and ``</evi>``.

    It mirrors the two behaviours of Phi-3's tokenizer that reach token ids and text:
    ``<s>`` is its BOS token but encoding never adds it (there is no post-processor, as
    Phi-3's ``add_bos_token`` is off in the official path), and decoding does not clean up
    spaces before punctuation (Phi-3 sets ``clean_up_tokenization_spaces`` to false).
    """
    from tokenizers import Tokenizer, normalizers, pre_tokenizers
    from tokenizers.models import WordLevel

    specials = ["<unk>", "<s>", EOS_TOKEN, *_CHAT_SPECIALS, *_EVIDENCE_SPECIALS]
    words = [w for w in vocab.all_words() if w not in specials]
    table = {tok: i for i, tok in enumerate(specials + words)}
    core = Tokenizer(WordLevel(table, unk_token="<unk>"))
    core.normalizer = normalizers.Lowercase()
    # Whitespace splits on \w+|[^\w\s]+, so "red." becomes "red" "." and newlines vanish.
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token="<s>",
        eos_token=EOS_TOKEN,
        pad_token=EOS_TOKEN,
        unk_token="<unk>",
        additional_special_tokens=[*_CHAT_SPECIALS, *_EVIDENCE_SPECIALS],
        clean_up_tokenization_spaces=False,
    )
    return tok


def build_tiny_qformer_tokenizer() -> BertTokenizerFast:
    """A small WordPiece (BERT-style, uncased) tokenizer over the same word list."""
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", QFORMER_BOS_TOKEN]
    words = [w for w in vocab.all_words() if w not in specials]
    table = {tok: i for i, tok in enumerate(specials + words)}
    tok = BertTokenizerFast(vocab=table, do_lower_case=True)
    return _finish_qformer_tokenizer(tok)


def _finish_qformer_tokenizer(tok: BertTokenizerFast) -> BertTokenizerFast:
    # InstructBLIP adds [DEC] as BOS and truncates the question from the left, so the end
    # of a long question (usually the actual ask) survives.
    tok.add_special_tokens({"bos_token": QFORMER_BOS_TOKEN})
    tok.truncation_side = "left"
    return tok


def load_llm_tokenizer(path: str | Path) -> PreTrainedTokenizerFast:
    """Load an LLM tokenizer from a local HF directory, adding ``<evi>``/``</evi>`` if absent.

    Raises:
        FileNotFoundError: If ``path`` is not a directory (nothing is downloaded).
    """
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"model.tokenizer_dir: tokenizer directory {str(path)!r} does not exist")
    tok = PreTrainedTokenizerFast.from_pretrained(str(path), local_files_only=True)
    missing = [t for t in _EVIDENCE_SPECIALS if tok.convert_tokens_to_ids(t) in (None, tok.unk_token_id)]
    if missing:
        tok.add_special_tokens({"additional_special_tokens": missing}, replace_extra_special_tokens=False)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_qformer_tokenizer(path: str | Path) -> BertTokenizerFast:
    """Load the Q-Former's WordPiece tokenizer from a local directory.

    Raises:
        FileNotFoundError: If ``path`` is missing; the message names the setting.
    """
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(
            f"model.qformer.tokenizer_dir: Q-Former tokenizer directory {str(path)!r} does not exist; "
            "point it at a local copy of a bert-base-uncased vocabulary (vocab.txt)"
        )
    tok = BertTokenizerFast.from_pretrained(str(path), local_files_only=True)
    return _finish_qformer_tokenizer(tok)


def chat_prompt(question: str, template: ChatTemplate = PHI3_TEMPLATE) -> str:
    """The prompt for one question in ``template`` (Phi-3's by default), ``<image>`` before it."""
    return template.prompt(question)


@dataclass
class PromptIds:
    """Token ids of one prompt split at the ``<image>`` placeholder.

    Attributes:
        prefix_ids: Ids before the frames (BOS, system turn, user header).
        suffix_ids: Ids after the frames (question, assistant header).
    """

    prefix_ids: list[int]
    suffix_ids: list[int]


def tokenize_prompt(tokenizer: PreTrainedTokenizerBase, question: str) -> PromptIds:
    """Tokenize the chat prompt chunk-wise around ``<image>``, as the official code does.

    A BOS id starts the first chunk only if the tokenizer itself emits one on encode
    (:func:`emits_bos`); Phi-3's does not, so official prompts carry no BOS.

    Raises:
        ValueError: If the question itself contains ``<image>`` (one video per prompt).
    """
    if IMAGE_TOKEN in question:
        raise ValueError("question: must not contain the <image> placeholder; the frames are added once")
    before, after = chat_prompt(question, chat_template(tokenizer)).split(IMAGE_TOKEN)
    prefix = tokenizer(before, add_special_tokens=False)["input_ids"]
    if emits_bos(tokenizer):
        prefix = [tokenizer.bos_token_id, *prefix]
    suffix = tokenizer(after, add_special_tokens=False)["input_ids"]
    return PromptIds(prefix_ids=list(prefix), suffix_ids=list(suffix))


def emits_bos(tokenizer: PreTrainedTokenizerBase) -> bool:
    """Whether the tokenizer's own encoding (special tokens on) starts with its BOS id.

    The official chunk-wise tokenization keeps a BOS exactly where the tokenizer emits
    one. Phi-3's tokenizer has a BOS token but does not add it on encode, so official
    D2VLM prompts start with ``<|system|>``; a tokenizer that does add it keeps it once.
    The probe is plain text: a special-token probe would answer yes for a tokenizer whose
    BOS *is* that token (SmolLM2's BOS is ``<|im_start|>``) without it adding anything.
    """
    bos = tokenizer.bos_token_id
    if bos is None:
        return False
    probe = tokenizer("a")["input_ids"]
    return bool(probe) and probe[0] == bos


def tokenize_response(tokenizer: PreTrainedTokenizerBase, response: str) -> list[int]:
    """Ids of a response followed by the template's end token (the LM loss covers all of them)."""
    end = chat_template(tokenizer).end
    return list(tokenizer(response + end, add_special_tokens=False)["input_ids"])


def format_time_s(t_s: float) -> str:
    """Seconds as short text: ``12`` for whole seconds, else one decimal (``12.5``)."""
    rounded = round(float(t_s), 1)
    return str(int(rounded)) if rounded == int(rounded) else f"{rounded:.1f}"


def format_span(span_s: SpanS) -> str:
    """A span as the ``"start - end"`` surface form every official parser reads."""
    return f"{format_time_s(span_s[0])} - {format_time_s(span_s[1])}"


@dataclass(frozen=True)
class DetokenizedText:
    """A response as text, with where each ``<evi>`` ended up.

    Attributes:
        text: The official surface string (see :func:`detokenize`).
        evidence_chars: ``(char_start, char_end)`` of each ``<evi>``'s ``"s - e"`` in
            ``text``, in token order: ``text[char_start:char_end] == format_span(span)``.
    """

    text: str
    evidence_chars: list[tuple[int, int]]


def detokenize_with_refs(
    tokenizer: PreTrainedTokenizerBase,
    token_ids: Sequence[int],
    spans_s: Sequence[SpanS],
) -> DetokenizedText:
    """:func:`detokenize`, also returning the character span of each ``<evi>``'s text.

    Raises:
        ValueError: If the number of spans differs from the number of ``<evi>`` tokens.
    """
    ids = TokenIds.from_tokenizer(tokenizer)
    n_evi = sum(1 for t in token_ids if t == ids.evi)
    if n_evi != len(spans_s):
        raise ValueError(f"spans_s: {len(spans_s)} spans for {n_evi} <evi> tokens")
    # One decode of the whole sequence, stripped, as the official code does: decoding runs
    # separately would change the spacing the tokenizer puts around special tokens.
    decoded = tokenizer.decode(list(token_ids), skip_special_tokens=False).strip()
    pieces = decoded.split(EVI_TOKEN)
    if len(pieces) - 1 != len(spans_s):
        raise ValueError(
            f"token_ids: the decoded text holds {len(pieces) - 1} {EVI_TOKEN!r} for {len(spans_s)} <evi> tokens"
        )
    parts = [pieces[0]]
    chars: list[tuple[int, int]] = []
    offset = len(pieces[0])
    for span_s, piece in zip(spans_s, pieces[1:]):
        surface = format_span(span_s)
        chars.append((offset, offset + len(surface)))
        # The official template is "{s} - {e} ": a space always follows the span.
        parts.append(surface + " " + piece)
        offset += len(surface) + 1 + len(piece)
    text = "".join(parts)
    end = chat_template(tokenizer).end
    if text.endswith(end):
        # The official script cuts its stop string and strips again; the start is already
        # stripped and a span's text ends in no whitespace, so the spans stay valid.
        text = text[: -len(end)].strip()
    return DetokenizedText(text=text, evidence_chars=chars)


def detokenize(
    tokenizer: PreTrainedTokenizerBase,
    token_ids: Sequence[int],
    spans_s: Sequence[SpanS],
) -> str:
    """Response text exactly as the official D2VLM inference writes it.

    The whole sequence is decoded once (special tokens kept) and stripped, each ``<evi>``
    becomes ``"s - e "`` (its span in seconds, then a space), and a trailing end token
    (``<|end|>``, the official stop string, or ``<|im_end|>`` for ChatML) is cut and the
    rest stripped. ``</evi>`` stays: the D2VLM
    scorer splits on it.

    Raises:
        ValueError: If the number of spans differs from the number of ``<evi>`` tokens.
    """
    return detokenize_with_refs(tokenizer, token_ids, spans_s).text
