"""A deterministic hashed word tokenizer for instructions.

No vocabulary file and nothing to download: a word's id is a CRC32 of the
lower-cased word, folded into the embedding table. Collisions are possible and
harmless for a model trained with the same function; what matters is that the
same words give the same ids on every machine and every run (Python's ``hash``
is salted per process, so it cannot be used).
"""

from __future__ import annotations

import functools
import re
import zlib
from collections.abc import Sequence

import numpy as np

#: Token id 0 is padding; words map into 1 .. vocab_size - 1.
PAD_ID = 0

_WORD = re.compile(r"\w+")


@functools.lru_cache(maxsize=4096)
def _encode(text: str, max_tokens: int, vocab_size: int) -> tuple[int, ...]:
    # Cached: a robot repeats the same instruction at every control step.
    words = _WORD.findall(text.lower())[:max_tokens]
    return tuple(1 + zlib.crc32(w.encode("utf-8")) % (vocab_size - 1) for w in words)


def tokenize(texts: Sequence[str], max_tokens: int, vocab_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Token ids int64 (B, max_tokens) and a bool mask (True = real token); long texts are truncated."""
    if vocab_size < 2:
        raise ValueError("vocab_size must be at least 2 (id 0 is padding)")
    ids = np.zeros((len(texts), max_tokens), dtype=np.int64)
    mask = np.zeros((len(texts), max_tokens), dtype=bool)
    for row, text in enumerate(texts):
        encoded = _encode(text, max_tokens, vocab_size)
        ids[row, : len(encoded)] = encoded
        mask[row, : len(encoded)] = True
    return ids, mask
