"""Byte-level tokenizer: one token per UTF-8 byte, vocabulary of 256.

Bytes need no trained vocabulary file and no download, and every machine maps the same text to the
same ids, which is what a reproducible benchmark wants.
"""

from __future__ import annotations

from typing import Any

import numpy as np


class ByteTokenizer:
    """Text <-> UTF-8 byte ids (``uint8``)."""

    vocab_size: int = 256

    def encode(self, text: str | bytes) -> np.ndarray:
        """Return the UTF-8 bytes of ``text`` as a ``uint8`` array (bytes pass through unchanged)."""
        if isinstance(text, str):
            raw = text.encode("utf-8")
        elif isinstance(text, (bytes, bytearray, memoryview)):
            raw = bytes(text)
        else:
            raise TypeError(f"encode() takes str or bytes, not {type(text).__name__}")
        # Copy so the result is writable and does not pin the bytes object.
        return np.frombuffer(raw, dtype=np.uint8).copy()

    def decode(self, ids: Any) -> str:
        """Return the text of byte ids (array, list or CPU tensor); invalid UTF-8 becomes U+FFFD."""
        if hasattr(ids, "detach"):  # a torch tensor, without importing torch here
            ids = ids.detach().cpu().numpy()
        arr = np.asarray(ids).reshape(-1)
        if arr.size and (arr.min() < 0 or arr.max() > 255):
            raise ValueError(
                f"token ids must lie in [0, 255] for the byte tokenizer, got range "
                f"[{int(arr.min())}, {int(arr.max())}]"
            )
        return arr.astype(np.uint8).tobytes().decode("utf-8", errors="replace")
