"""Unit tests for parallab.data: tokenizer, cached token files, rank-sharded batches."""

from __future__ import annotations

import hashlib
import os
import pickle
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

try:
    import parallab.data  # noqa: F401
except ModuleNotFoundError:  # running from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "src"))

from parallab.data import (
    ByteTokenizer,
    SyntheticTokens,
    TokenFileData,
    build_data,
    prepare_token_file,
    read_meta,
    stdlib_corpus,
    validate_data_source,
)

TEXT = "Hello, wörld! ünïcode ✓ 日本語 🚀\n" * 40


def _write(path: Path, data: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(data, str):
        data = data.encode("utf-8")
    path.write_bytes(data)
    return path


def _bump_mtime(path: Path) -> None:
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))


# --- tokenizer ---------------------------------------------------------------------------------

def test_tokenizer_roundtrip_non_ascii():
    tok = ByteTokenizer()
    ids = tok.encode(TEXT)
    assert tok.vocab_size == 256
    assert ids.dtype == np.uint8 and len(ids) == len(TEXT.encode("utf-8"))
    assert tok.decode(ids) == TEXT
    assert tok.decode(torch.from_numpy(ids.astype(np.int64))) == TEXT
    assert tok.decode(list(ids)) == TEXT
    assert np.array_equal(tok.encode(TEXT.encode("utf-8")), ids)


def test_tokenizer_decode_replaces_invalid_utf8_and_rejects_out_of_range():
    tok = ByteTokenizer()
    assert tok.decode([0x68, 0xFF, 0x69]) == "h\ufffdi"
    with pytest.raises(ValueError, match="256"):
        tok.decode([1, 256])


# --- token files -------------------------------------------------------------------------------

def test_single_file_tokens_and_metadata(tmp_path):
    src = _write(tmp_path / "a.txt", TEXT)
    out = prepare_token_file(src, tmp_path / "cache")
    assert out.suffix == ".tokens" and out.parent == tmp_path / "cache"
    assert out.read_bytes() == TEXT.encode("utf-8")
    meta = read_meta(out)
    assert meta["n_tokens"] == len(TEXT.encode("utf-8"))
    assert meta["n_files"] == 1
    assert meta["source"] == str(src.resolve())
    assert meta["sha256"] == hashlib.sha256(out.read_bytes()).hexdigest()


def test_folder_sorted_recursive_skips_binary(tmp_path):
    root = tmp_path / "corpus"
    _write(root / "b.txt", "second\n")
    _write(root / "a" / "z.md", "first\n")
    _write(root / "c", "third, no extension\n")
    _write(root / "blob.bin", b"abc\x00def")
    _write(root / "latin1.txt", "caf\u00e9".encode("latin-1"))
    out = prepare_token_file(root, tmp_path / "cache")
    assert out.read_bytes() == b"first\nsecond\nthird, no extension\n"
    meta = read_meta(out)
    assert meta["n_files"] == 3 and meta["n_skipped"] == 2


def test_max_bytes_caps_tokens(tmp_path):
    root = tmp_path / "corpus"
    _write(root / "a.txt", "a" * 100)
    _write(root / "b.txt", "b" * 100)
    out = prepare_token_file(root, tmp_path / "cache", max_bytes=150)
    assert out.read_bytes() == b"a" * 100 + b"b" * 50
    with pytest.raises(ValueError, match="max_bytes 0"):
        prepare_token_file(root, tmp_path / "cache", max_bytes=0)


def test_cache_reuse_and_invalidation(tmp_path):
    cache = tmp_path / "cache"
    src = _write(tmp_path / "a.txt", "first version\n")
    first = prepare_token_file(src, cache)
    mtime = first.stat().st_mtime_ns
    # Same source: the same entry, not rewritten.
    assert prepare_token_file(src, cache) == first
    assert first.stat().st_mtime_ns == mtime
    # Changed content (and mtime): a new entry with the new text; the old one is untouched.
    _write(src, "second version, longer\n")
    _bump_mtime(src)
    second = prepare_token_file(src, cache)
    assert second != first
    assert second.read_bytes() == b"second version, longer\n"
    assert first.read_bytes() == b"first version\n"
    # max_bytes is part of the key.
    assert prepare_token_file(src, cache, max_bytes=5) not in (first, second)


def test_folder_cache_invalidated_by_added_file(tmp_path):
    root, cache = tmp_path / "corpus", tmp_path / "cache"
    _write(root / "a.txt", "one\n")
    first = prepare_token_file(root, cache)
    _write(root / "b.txt", "two\n")
    second = prepare_token_file(root, cache)
    assert second != first and second.read_bytes() == b"one\ntwo\n"


def test_cache_inside_source_folder_is_not_read_back(tmp_path):
    root = tmp_path / "corpus"
    _write(root / "a.txt", "only this\n")
    first = prepare_token_file(root, root / ".cache")
    assert prepare_token_file(root, root / ".cache") == first
    assert first.read_bytes() == b"only this\n"


def test_incomplete_entry_is_rebuilt_and_no_temp_files_left(tmp_path):
    cache = tmp_path / "cache"
    src = _write(tmp_path / "a.txt", TEXT)
    out = prepare_token_file(src, cache)
    # Only finished files in the cache: no temp leftovers from the atomic writes.
    assert sorted(p.name for p in cache.iterdir()) == sorted([out.name, out.with_suffix(".json").name])
    assert not [p for p in cache.iterdir() if p.name.startswith(".") or p.suffix == ".tmp"]
    # A truncated token file (size disagrees with metadata) is never reused.
    out.write_bytes(b"half")
    assert prepare_token_file(src, cache).read_bytes() == TEXT.encode("utf-8")
    # A failed build (not text) leaves nothing behind either.
    bad = _write(tmp_path / "bad.txt", b"\x00\x01")
    with pytest.raises(ValueError):
        prepare_token_file(bad, cache)
    assert len(list(cache.iterdir())) == 2


def test_error_missing_path(tmp_path):
    missing = tmp_path / "nope" / "x.txt"
    with pytest.raises(ValueError, match="does not exist") as e:
        prepare_token_file(missing, tmp_path / "cache")
    assert str(missing) in str(e.value) and "\n" not in str(e.value)


def test_error_empty_file(tmp_path):
    empty = _write(tmp_path / "empty.txt", b"")
    with pytest.raises(ValueError, match="is empty") as e:
        prepare_token_file(empty, tmp_path / "cache")
    assert str(empty) in str(e.value)


@pytest.mark.parametrize("data, why", [(b"ab\x00cd", "NUL"), (b"caf\xe9 ok", "UTF-8"),
                                       (b"ends mid char \xe2\x82", "UTF-8")])
def test_error_file_not_text(tmp_path, data, why):
    bad = _write(tmp_path / "bad.dat", data)
    with pytest.raises(ValueError, match=why) as e:
        prepare_token_file(bad, tmp_path / "cache")
    assert str(bad.resolve()) in str(e.value) and "\n" not in str(e.value)


def test_error_folder_without_text(tmp_path):
    empty_dir = tmp_path / "empty"
    empty_dir.mkdir()
    with pytest.raises(ValueError, match="no files") as e:
        prepare_token_file(empty_dir, tmp_path / "cache")
    assert str(empty_dir) in str(e.value)
    binary_dir = tmp_path / "binary"
    _write(binary_dir / "x.bin", b"\x00\x00")
    _write(binary_dir / "y.txt", b"")
    with pytest.raises(ValueError, match="no non-empty text files") as e:
        prepare_token_file(binary_dir, tmp_path / "cache")
    assert str(binary_dir.resolve()) in str(e.value)


def test_stdlib_corpus_builds_and_is_deterministic(tmp_path):
    a = stdlib_corpus(tmp_path / "c1", max_bytes=200_000)
    b = stdlib_corpus(tmp_path / "c2", max_bytes=200_000)
    assert a.stat().st_size == 200_000
    assert a.read_bytes() == b.read_bytes()
    meta = read_meta(a)
    assert meta["kind"] == "stdlib" and meta["sha256"] == read_meta(b)["sha256"]
    text = ByteTokenizer().decode(np.fromfile(a, dtype=np.uint8))
    assert "def " in text or "import " in text


# --- batches -----------------------------------------------------------------------------------

@pytest.fixture
def token_file(tmp_path) -> Path:
    return prepare_token_file(_write(tmp_path / "a.txt", TEXT * 5), tmp_path / "cache")


def _datasets(token_file):
    return [SyntheticTokens(vocab_size=97, seq_len=16, global_batch=8, seed=3),
            TokenFileData(token_file, seq_len=16, global_batch=8, seed=3)]


@pytest.mark.parametrize("which", [0, 1], ids=["synthetic", "text"])
@pytest.mark.parametrize("world", [2, 4])
def test_rank_shards_concatenate_to_single_device_batch(token_file, which, world):
    data = _datasets(token_file)[which]
    for step in (0, 1, 7):
        x1, y1 = data.batch(step)
        assert x1.shape == (8, 16) and x1.dtype == torch.int64 and y1.dtype == torch.int64
        shards = [data.batch(step, rank=r, world=world) for r in range(world)]
        assert all(x.shape == (8 // world, 16) for x, _ in shards)
        assert torch.equal(torch.cat([x for x, _ in shards]), x1)
        assert torch.equal(torch.cat([y for _, y in shards]), y1)


@pytest.mark.parametrize("which", [0, 1], ids=["synthetic", "text"])
def test_batches_deterministic_and_shifted(token_file, which):
    data = _datasets(token_file)[which]
    x, y = data.batch(5)
    again = _datasets(token_file)[which].batch(5)
    assert torch.equal(x, again[0]) and torch.equal(y, again[1])
    assert torch.equal(x[:, 1:], y[:, :-1])
    assert not torch.equal(x, data.batch(6)[0])  # steps differ
    assert not torch.equal(x[0], x[1])  # rows differ
    assert int(x.min()) >= 0 and int(x.max()) < data.vocab_size


def test_text_windows_come_from_the_file(token_file):
    data = TokenFileData(token_file, seq_len=16, global_batch=8, seed=0)
    raw = token_file.read_bytes()
    x, y = data.batch(2)
    for row_x, row_y in zip(x, y):
        window = bytes(row_x.tolist()) + bytes(row_y[-1:].tolist())
        assert window in raw
    # A pickled copy (as sent to worker processes) reopens the file and agrees.
    clone = pickle.loads(pickle.dumps(data))
    assert torch.equal(clone.batch(2)[0], x)


def test_window_covers_whole_file_when_exactly_seq_len_plus_one(tmp_path):
    path = tmp_path / "t.tokens"
    path.write_bytes(bytes(range(17)))
    data = TokenFileData(path, seq_len=16, global_batch=2, seed=0)
    x, y = data.batch(0)
    assert x[0].tolist() == list(range(16)) and y[0].tolist() == list(range(1, 17))


def test_error_batch_not_divisible(token_file):
    data = SyntheticTokens(vocab_size=50, seq_len=8, global_batch=6, seed=0)
    with pytest.raises(ValueError, match="global_batch 6.*world size 4"):
        data.batch(0, rank=0, world=4)
    with pytest.raises(ValueError, match="rank 2"):
        data.batch(0, rank=2, world=2)


def test_error_token_file_too_short(tmp_path):
    path = tmp_path / "short.tokens"
    path.write_bytes(b"abc")
    with pytest.raises(ValueError, match=r"holds 3 tokens, fewer than seq_len\+1 = 9") as e:
        TokenFileData(path, seq_len=8, global_batch=2, seed=0)
    assert str(path) in str(e.value)


# --- build_data / validate_data_source ---------------------------------------------------------

def test_build_data_sources(tmp_path):
    src = _write(tmp_path / "a.txt", TEXT)
    common = dict(seq_len=8, global_batch=4, seed=1, cache_dir=tmp_path / "cache")
    syn = build_data("synthetic", vocab_size=1000, path=None, **common)
    assert isinstance(syn, SyntheticTokens) and syn.vocab_size == 1000
    txt = build_data("text", vocab_size=512, path=str(src), **common)
    assert isinstance(txt, TokenFileData) and txt.vocab_size == 256
    assert txt.batch(0)[0].shape == (4, 8)


def test_build_data_errors(tmp_path):
    common = dict(seq_len=8, global_batch=4, seed=1, cache_dir=tmp_path / "cache")
    with pytest.raises(ValueError, match="'text' needs a data path"):
        build_data("text", vocab_size=256, path=None, **common)
    with pytest.raises(ValueError, match="model vocab_size 100 is smaller than the byte "
                                         "tokenizer's 256"):
        build_data("stdlib", vocab_size=100, path=None, **common)
    with pytest.raises(ValueError, match="'wiki'"):
        build_data("wiki", vocab_size=256, path=None, **common)


def test_validate_data_source(tmp_path):
    src = _write(tmp_path / "a.txt", "x")
    validate_data_source("synthetic", None)
    validate_data_source("stdlib", None)
    validate_data_source("text", str(src))
    validate_data_source("text", str(tmp_path))
    with pytest.raises(ValueError, match="'bogus' is not one of synthetic, text, stdlib"):
        validate_data_source("bogus", None)
    with pytest.raises(ValueError, match="does not exist") as e:
        validate_data_source("text", str(tmp_path / "missing"))
    assert str(tmp_path / "missing") in str(e.value)
    with pytest.raises(ValueError, match="is empty"):
        validate_data_source("text", str(_write(tmp_path / "e.txt", b"")))
    with pytest.raises(ValueError, match="only used with data source 'text'"):
        validate_data_source("synthetic", str(src))
    # Validation reads no data and writes no cache.
    assert not (tmp_path / "cache").exists()
