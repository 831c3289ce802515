"""Splitting documents into paragraphs / sentences / bounded chunks.

Why by hand: SentencePiece *silently skips* training lines longer than
``max_sentence_length`` bytes (4192 by default), and NLTK's punkt models need a download
that is not possible offline. A regex splitter on sentence-final punctuation is enough to
keep every byte of a document in tokenizer training; no text is ever dropped here — the
pieces of :func:`split_for_training` joined back cover the whole document.
"""

from __future__ import annotations

import re
from typing import Iterator

# A sentence ends at . ! ? (optionally followed by closing quotes/brackets) and whitespace.
_SENTENCE_END = re.compile(r"(?:(?<=[.!?])|(?<=[.!?][\"')\]]))\s+")
_PARAGRAPH = re.compile(r"\n\s*\n")


def split_sentences(text: str) -> list[str]:
    """Split on sentence-final punctuation followed by whitespace; empty pieces removed."""
    return [s.strip() for s in _SENTENCE_END.split(text) if s.strip()]


def _chunk_bytes(piece: str, max_bytes: int) -> Iterator[str]:
    """Cut ``piece`` at whitespace (or hard, if there is none) into <= max_bytes UTF-8 chunks."""
    while len(piece.encode("utf-8")) > max_bytes:
        # max_bytes bytes is at least max_bytes // 4 characters
        cut = piece.rfind(" ", 0, max_bytes // 4)
        if cut <= 0:
            cut = max_bytes // 4
        yield piece[:cut]
        piece = piece[cut:].lstrip()
    if piece:
        yield piece


def split_for_training(text: str, max_bytes: int = 4000) -> Iterator[str]:
    """Yield lines (no newline inside) of at most ``max_bytes`` bytes covering ``text``.

    Paragraphs first; a paragraph that is too long is split into sentences; a sentence that
    is still too long is cut at whitespace.
    """
    for para in _PARAGRAPH.split(text):
        para = " ".join(para.split())
        if not para:
            continue
        if len(para.encode("utf-8")) <= max_bytes:
            yield para
            continue
        for sent in split_sentences(para):
            yield from _chunk_bytes(sent, max_bytes)
