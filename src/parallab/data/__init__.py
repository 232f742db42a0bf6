"""Data for parallab: byte tokenizer, cached token files, and rank-sharded deterministic batches."""

from .batches import (
    DATA_SOURCES,
    RowSampledData,
    SyntheticTokens,
    TokenFileData,
    build_data,
    validate_data_source,
)
from .corpus import prepare_token_file, read_meta, stdlib_corpus, stdlib_root
from .tokenizer import ByteTokenizer

__all__ = [
    "DATA_SOURCES",
    "ByteTokenizer",
    "RowSampledData",
    "SyntheticTokens",
    "TokenFileData",
    "build_data",
    "prepare_token_file",
    "read_meta",
    "stdlib_corpus",
    "stdlib_root",
    "validate_data_source",
]
