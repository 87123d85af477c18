"""The word list behind the tiny preset's tokenizer and the synthetic benchmark.

The synthetic generator (``d2vlm_ray.data.synthetic``) writes only words from this
module, and the tiny tokenizer (``d2vlm_ray.model.tokenizer``) is built from it, so the
two cannot drift apart. A test checks that every synthetic annotation tokenizes without
unknown tokens.
"""

from __future__ import annotations

COLOURS: tuple[str, ...] = ("red", "green", "blue", "yellow", "purple", "orange", "white", "cyan")
SHAPES: tuple[str, ...] = ("square", "circle", "triangle", "diamond", "cross")
SIZES: tuple[str, ...] = ("small", "large")
DIRECTIONS: tuple[str, ...] = ("left", "right", "up", "down")

# Event verbs and their nominal forms used by the captions and questions.
VERBS: tuple[str, ...] = (
    "enters",
    "leaves",
    "moves",
    "stops",
    "turns",
    "grows",
    "shrinks",
    "appears",
    "disappears",
    "changes",
    "spins",
    "jumps",
    "bounces",
    "stays",
    "still",
)

# Words of prompts, questions and answers of every synthetic task, of the Phi-3 system
# prompt, and of the E.T. Bench style prompts the evaluators reuse.
TEMPLATE_WORDS: tuple[str, ...] = (
    "you", "are", "a", "an", "the", "helpful", "ai", "assistant", "given", "video", "watch",
    "carefully", "find", "visual", "event", "described", "by", "sentence", "format", "of",
    "your", "response", "should", "be", "happens", "in", "start", "end", "time", "localize",
    "moment", "according", "to", "query", "all", "events", "each", "with", "its", "and",
    "describe", "what", "which", "when", "where", "did", "does", "do", "is", "was", "were",
    "colour", "color", "shape", "after", "before", "during", "while", "it", "this", "that",
    "then", "first", "last", "second", "third", "times", "how", "many", "there", "answer",
    "question", "option", "best", "from", "into", "onto", "on", "at", "scene", "frame",
    "object", "objects", "seconds", "second", "happen", "starts", "ends", "between", "list",
    "segments", "segment", "action", "actions", "localise", "occurrences", "every", "occurrence",
    "turn", "turned", "become", "became", "same", "other", "one", "two", "three", "four",
    "five", "no", "yes", "none", "here", "these", "those", "for", "as", "not", "or", "dense",
    "caption", "captions", "timestamps", "timestamp", "grounded", "based", "on", "evidence",
    "explain", "stopped", "entered", "left", "moved", "grew", "shrank", "appeared", "changed",
    "spun", "jumped", "bounced", "stayed", "is", "go", "goes", "went", "shown", "see", "seen",
    "whole", "part", "parts", "happened", "itself", "again", "new", "old",
)

PUNCTUATION: tuple[str, ...] = (".", ",", "?", "!", ":", ";", "'", '"', "-", "(", ")", "/", "<", ">")
DIGITS: tuple[str, ...] = tuple(str(d) for d in range(10))

# Further words of the synthetic benchmark's questions and answers. Kept last in
# ``all_words`` so that adding words never shifts the ids of the earlier ones.
SYNTHETIC_WORDS: tuple[str, ...] = ("direction", "move", "out")


def all_words() -> list[str]:
    """Every word and symbol of the tiny vocabulary, de-duplicated, in a fixed order."""
    seen: dict[str, None] = {}
    for group in (COLOURS, SHAPES, SIZES, DIRECTIONS, VERBS, TEMPLATE_WORDS, PUNCTUATION, DIGITS, SYNTHETIC_WORDS):
        for word in group:
            seen.setdefault(word.lower(), None)
    return list(seen)
