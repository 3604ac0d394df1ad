"""Offline English text: CPython's own documentation (`pydoc_data.topics.topics`), cut into passages.

Why this source: it ships with every CPython, so harvesting activations needs no network and no
dataset download, and it is real prose (plus some code), about 465k characters, ~128k MiniLM tokens.
It is narrow (Python reference manual), like the wikitext slice the paper's E3 script really used;
for research-grade SAEs pass your own `texts`.

Passages: each topic is split into paragraphs at blank lines; heading underlines (`*****`, `=====`)
are dropped; prose paragraphs are unwrapped into one line, indented (code/grammar) blocks keep their
line breaks. Paragraphs are packed greedily, in order, into passages of at most `max_chars`
characters (a longer paragraph is cut at sentence ends, else at spaces). A topic's trailing piece
shorter than `min_chars` is glued to the previous passage (even if that passes `max_chars`), or
dropped if the topic has no other passage; a passage is never closed while shorter than `min_chars`.
With the defaults (min 100, max 400 characters) there are 1,434 passages, 127k MiniLM tokens, of
which a `max_length=128` harvest keeps 120k (89% of passages fit in 128 tokens; code blocks are
token-dense).
"""

from __future__ import annotations

import random
import re

from splinterp.errors import ConfigError

_UNDERLINE = re.compile(r"^\s*([*=~\-^#])\1{2,}\s*$")
_SENTENCE_END = re.compile(r"(?<=[.!?:;])\s+")


def _paragraphs(topic: str) -> list[str]:
    """Paragraphs of one topic, headings' underlines removed, prose unwrapped."""
    out = []
    for block in re.split(r"\n\s*\n", topic):
        lines = [ln.rstrip() for ln in block.split("\n") if ln.strip() and not _UNDERLINE.match(ln)]
        if not lines:
            continue
        if all(ln.startswith((" ", "\t")) for ln in lines):
            # code / grammar block: keep its layout, drop the common indent
            indent = min(len(ln) - len(ln.lstrip()) for ln in lines)
            out.append("\n".join(ln[indent:] for ln in lines))
        else:
            out.append(" ".join(ln.strip() for ln in lines))
    return out


def _cut(paragraph: str, max_chars: int) -> list[str]:
    """Cut a paragraph longer than max_chars at sentence ends, else at whitespace, else hard."""
    if len(paragraph) <= max_chars:
        return [paragraph]
    pieces: list[str] = []
    cur = ""
    for unit in _SENTENCE_END.split(paragraph):
        while len(unit) > max_chars:  # a single overlong sentence: cut at the last space that fits
            cut = unit.rfind(" ", 0, max_chars)
            cut = cut if cut > 0 else max_chars
            if cur:
                pieces.append(cur)
                cur = ""
            pieces.append(unit[:cut].rstrip())
            unit = unit[cut:].lstrip()
        if not unit:
            continue
        if cur and len(cur) + 1 + len(unit) > max_chars:
            pieces.append(cur)
            cur = unit
        else:
            cur = f"{cur} {unit}" if cur else unit
    if cur:
        pieces.append(cur)
    return pieces


def _passages(topic: str, min_chars: int, max_chars: int) -> list[str]:
    passages: list[str] = []
    cur = ""
    for para in _paragraphs(topic):
        for piece in _cut(para, max_chars):
            if len(cur) >= min_chars and len(cur) + 2 + len(piece) > max_chars:
                passages.append(cur)
                cur = piece
            else:
                cur = f"{cur}\n\n{piece}" if cur else piece
    if cur:
        if len(cur) >= min_chars:
            passages.append(cur)
        elif passages:
            passages[-1] = f"{passages[-1]}\n\n{cur}"
    return passages


def offline_texts(
    n: int | None = None,
    min_chars: int = 100,
    max_chars: int = 400,
    seed: int | None = 0,
) -> list[str]:
    """Passages of CPython's pydoc topics, for harvesting activations with no network.

    n: how many passages (None = all, 1,434 with the defaults); asking for more than exist is an
    error rather than a silent shortfall. seed: passages are shuffled with `random.Random(seed)` so
    that a small `n` spans many topics; seed=None keeps document order (topics sorted by name).
    """
    if isinstance(min_chars, bool) or not isinstance(min_chars, int) or min_chars < 1:
        raise ConfigError(f"min_chars must be a positive integer, got {min_chars!r}")
    if isinstance(max_chars, bool) or not isinstance(max_chars, int) or max_chars < min_chars:
        raise ConfigError(f"max_chars must be an integer >= min_chars={min_chars}, got {max_chars!r}")
    try:
        from pydoc_data.topics import topics
    except ImportError as e:  # some distributions strip pydoc_data
        raise ConfigError(
            "the offline text source needs the stdlib module pydoc_data (missing from this Python); "
            "pass texts=[...] explicitly"
        ) from e
    passages = [p for key in sorted(topics) for p in _passages(topics[key], min_chars, max_chars)]
    if seed is not None:
        random.Random(seed).shuffle(passages)
    if n is not None:
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ConfigError(f"n must be a positive integer or None, got {n!r}")
        if n > len(passages):
            raise ConfigError(
                f"n={n} passages requested but the offline text has only {len(passages)} with "
                f"min_chars={min_chars}, max_chars={max_chars}"
            )
        passages = passages[:n]
    return passages
