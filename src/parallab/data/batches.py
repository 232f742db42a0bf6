"""Deterministic training batches that shard identically over any data-parallel world size.

Every row of the global batch of a step comes from its own generator seeded by
``(seed, step, row)``. Rank ``r`` of ``world`` computes only rows ``[r*b, (r+1)*b)``, and the
concatenation over ranks is bit-identical to the single-device batch: that is what lets a parallel
run be checked against one device.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from .corpus import check_source_path, prepare_token_file, stdlib_corpus, stdlib_root
from .tokenizer import ByteTokenizer

DATA_SOURCES = ("synthetic", "text", "stdlib")


def _positive_int(name: str, value, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} {value!r} is invalid (give an integer >= {minimum})")
    return int(value)


class RowSampledData:
    """Base class: a batch is ``global_batch`` independently seeded rows of ``seq_len + 1`` tokens."""

    vocab_size: int

    def __init__(self, seq_len: int, global_batch: int, seed: int):
        self.seq_len = _positive_int("seq_len", seq_len)
        self.global_batch = _positive_int("global_batch", global_batch)
        # numpy seed sequences reject negative entropy, so say so up front.
        self.seed = _positive_int("seed", seed, minimum=0)

    def _row(self, rng: np.random.Generator) -> np.ndarray:
        """``seq_len + 1`` token ids for one row."""
        raise NotImplementedError

    def local_batch(self, world: int = 1) -> int:
        """Rows per rank for ``world`` data-parallel ranks."""
        world = _positive_int("world", world)
        if self.global_batch % world:
            raise ValueError(f"global_batch {self.global_batch} is not divisible by the "
                             f"data-parallel world size {world} (give a multiple of {world})")
        return self.global_batch // world

    def batch(self, step: int, *, rank: int = 0, world: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, targets), int64 ``[global_batch // world, seq_len]``, for ``rank`` at ``step``."""
        b = self.local_batch(world)
        step = _positive_int("step", step, minimum=0)
        if isinstance(rank, bool) or not isinstance(rank, (int, np.integer)) or not 0 <= rank < world:
            raise ValueError(f"rank {rank!r} is invalid for world size {world} "
                             f"(give 0 <= rank < {world})")
        rows = np.empty((b, self.seq_len + 1), dtype=np.int64)
        for i in range(b):
            row = int(rank) * b + i  # index in the GLOBAL batch, so shards match the 1-rank batch
            rows[i] = self._row(np.random.default_rng([self.seed, step, row]))
        tokens = torch.from_numpy(rows)
        # Targets are the inputs shifted by one: predict token t+1 from tokens <= t.
        return tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()


class SyntheticTokens(RowSampledData):
    """Uniform random tokens: no data needed, for speed and memory measurements."""

    def __init__(self, vocab_size: int, seq_len: int, global_batch: int, seed: int = 0):
        super().__init__(seq_len, global_batch, seed)
        self.vocab_size = _positive_int("vocab_size", vocab_size, minimum=2)

    def _row(self, rng: np.random.Generator) -> np.ndarray:
        return rng.integers(0, self.vocab_size, size=self.seq_len + 1, dtype=np.int64)

    def __repr__(self) -> str:
        return (f"SyntheticTokens(vocab_size={self.vocab_size}, seq_len={self.seq_len}, "
                f"global_batch={self.global_batch}, seed={self.seed})")


class TokenFileData(RowSampledData):
    """Random windows of a raw ``uint8`` token file, memory-mapped read-only."""

    vocab_size = ByteTokenizer.vocab_size

    def __init__(self, path: Path, seq_len: int, global_batch: int, seed: int = 0):
        super().__init__(seq_len, global_batch, seed)
        self.path = Path(path)
        if not self.path.is_file():
            raise ValueError(f"data file '{self.path}' does not exist (give a prepared .tokens file)")
        self.n_tokens = os.path.getsize(self.path)
        need = self.seq_len + 1
        if self.n_tokens < need:
            raise ValueError(f"data file '{self.path}' holds {self.n_tokens} tokens, fewer than "
                             f"seq_len+1 = {need} needed for one sample")
        self._tokens: np.memmap | None = None

    @property
    def tokens(self) -> np.memmap:
        # Opened lazily, so the object pickles cheaply to worker processes (see __getstate__).
        if self._tokens is None:
            self._tokens = np.memmap(self.path, dtype=np.uint8, mode="r", shape=(self.n_tokens,))
        return self._tokens

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_tokens"] = None  # pickling a memmap would copy the whole file
        return state

    def _row(self, rng: np.random.Generator) -> np.ndarray:
        # Window start uniform over [0, n - seq_len - 1]: every full window is possible.
        start = int(rng.integers(0, self.n_tokens - self.seq_len, dtype=np.int64))
        return self.tokens[start : start + self.seq_len + 1].astype(np.int64)

    def __repr__(self) -> str:
        return (f"TokenFileData(path='{self.path}', n_tokens={self.n_tokens}, "
                f"seq_len={self.seq_len}, global_batch={self.global_batch}, seed={self.seed})")


def validate_data_source(source: str, path: str | None) -> None:
    """Cheap checks (valid source name, path present and existing) that read no data."""
    if source not in DATA_SOURCES:
        raise ValueError(f"data source {source!r} is not one of {', '.join(DATA_SOURCES)}")
    if source == "text":
        if path is None:
            raise ValueError("data source 'text' needs a data path "
                             "(give a text file or a folder of text files)")
        check_source_path(Path(path))
    elif path is not None:
        # A path with another source would be silently ignored; a wrong comparison is worse.
        raise ValueError(f"data path '{path}' is only used with data source 'text', "
                         f"not {source!r} (drop the path or use source 'text')")
    elif source == "stdlib" and not stdlib_root().is_dir():
        raise ValueError(f"standard library folder '{stdlib_root()}' does not exist "
                         f"(use data source 'synthetic' or 'text')")


def build_data(source: str, *, seq_len: int, global_batch: int, seed: int, vocab_size: int,
               path: str | None, cache_dir: Path) -> RowSampledData:
    """The dataset for a run; text and stdlib are tokenized once into ``cache_dir``."""
    validate_data_source(source, path)
    if source == "synthetic":
        return SyntheticTokens(vocab_size, seq_len, global_batch, seed)
    if vocab_size < ByteTokenizer.vocab_size:
        raise ValueError(f"model vocab_size {vocab_size} is smaller than the byte tokenizer's "
                         f"{ByteTokenizer.vocab_size} (give vocab_size >= "
                         f"{ByteTokenizer.vocab_size} or use data source 'synthetic')")
    if source == "text":
        tokens_path = prepare_token_file(Path(path), Path(cache_dir))
    else:
        tokens_path = stdlib_corpus(Path(cache_dir))
    return TokenFileData(tokens_path, seq_len, global_batch, seed)
