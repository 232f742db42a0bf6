"""Turn a text file, a folder of text files or the Python standard library into a token file.

The token file is raw ``uint8`` (one byte token per byte of UTF-8 text) so that it can be
memory-mapped by every rank without loading it. It is written once into a cache folder under a key
that hashes the source's path and every file's (relative path, size, mtime_ns), so editing a file
makes a new entry instead of silently reusing stale tokens.
"""

from __future__ import annotations

import codecs
import hashlib
import json
import os
import sysconfig
import tempfile
from pathlib import Path
from typing import Callable

# Bump when the token file's layout or the file selection rules change, to orphan old entries.
_CACHE_VERSION = 1
_CHUNK = 1 << 20

# Folder names under the standard library that are tests, not library code (or not stdlib at all).
_STDLIB_SKIP_DIRS = frozenset(
    {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}
)


def _list_folder(root: Path, keep: Callable[[str], bool], skip_dir: Callable[[str], bool],
                 cache_dir: Path):
    """(relative posix path, path) of the regular files under ``root``, sorted by relative path."""
    found = []
    # The cache may live inside the source (e.g. source "." and cache "./.parallab-cache"): its
    # token files must not feed back into the corpus and change the key on every run.
    cache_dir = Path(cache_dir).resolve()
    # os.walk without followlinks: a symlinked folder cannot loop or pull in files from elsewhere.
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames
                       if not skip_dir(d) and (Path(dirpath) / d).resolve() != cache_dir]
        for name in filenames:
            path = Path(dirpath) / name
            rel = path.relative_to(root).as_posix()
            if keep(rel) and path.is_file():
                found.append((rel, path))
    found.sort(key=lambda item: item[0])
    return found


def _cache_key(kind: str, root: Path, files, max_bytes: int | None) -> str:
    entries = []
    for rel, path in files:
        st = path.stat()
        entries.append([rel, st.st_size, st.st_mtime_ns])
    blob = json.dumps(
        {"v": _CACHE_VERSION, "kind": kind, "source": str(root), "files": entries,
         "max_bytes": max_bytes},
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:32]


def _append_text(path: Path, out, budget: int | None) -> tuple[int, str | None]:
    """Append ``path``'s bytes to ``out`` (up to ``budget``); return (bytes written, why not text).

    When the file turns out not to be text, everything it wrote is truncated away again, so the
    output only ever holds whole text files (or the prefix cut by ``max_bytes``).
    """
    start = out.tell()
    decoder = codecs.getincrementaldecoder("utf-8")()
    written = 0
    cut = False
    with open(path, "rb") as f:
        while True:
            chunk = f.read(_CHUNK)
            if not chunk:
                break
            if budget is not None and written + len(chunk) >= budget:
                chunk, cut = chunk[: budget - written], True
            reason = None
            if b"\x00" in chunk:
                reason = "contains NUL bytes"
            else:
                try:
                    decoder.decode(chunk, final=False)
                except UnicodeDecodeError:
                    reason = "is not valid UTF-8"
            if reason is not None:
                out.seek(start)
                out.truncate()
                return 0, reason
            out.write(chunk)
            written += len(chunk)
            if cut:
                break
    if not cut:
        try:
            decoder.decode(b"", final=True)  # a file that ends inside a multi-byte character
        except UnicodeDecodeError:
            out.seek(start)
            out.truncate()
            return 0, "is not valid UTF-8"
    return written, None


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def _atomic_write_text(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _cached(tokens_path: Path, meta_path: Path) -> bool:
    """True when a complete entry exists: both files, and the token count matches the metadata."""
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        return tokens_path.stat().st_size == int(meta["n_tokens"])
    except (OSError, ValueError, KeyError, TypeError):
        return False


def _build(kind: str, root: Path, files, cache_dir: Path, max_bytes: int | None,
           single_file: bool) -> Path:
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    key = _cache_key(kind, root, files, max_bytes)
    tokens_path = cache_dir / f"{key}.tokens"
    meta_path = cache_dir / f"{key}.json"
    if _cached(tokens_path, meta_path):
        return tokens_path

    # Unique temp name: concurrent builders (e.g. every rank of a launch) never share a half file;
    # they all produce the same bytes, and the last os.replace wins harmlessly.
    fd, tmp = tempfile.mkstemp(dir=cache_dir, prefix=f".{key}.", suffix=".tmp")
    tmp_path = Path(tmp)
    try:
        n_tokens, n_files, n_skipped = 0, 0, 0
        with os.fdopen(fd, "w+b") as out:
            for _rel, path in files:
                budget = None if max_bytes is None else max_bytes - n_tokens
                if budget == 0:
                    break
                try:
                    written, why = _append_text(path, out, budget)
                except OSError as exc:
                    if single_file:
                        raise ValueError(f"data file '{path}' cannot be read ({exc.strerror}); "
                                         f"give a readable text file") from None
                    n_skipped += 1
                    continue
                if why is not None:
                    if single_file:
                        raise ValueError(f"data file '{path}' is not text: it {why} "
                                         f"(give a UTF-8 text file without NUL bytes)")
                    n_skipped += 1
                    continue
                n_tokens += written
                n_files += 1
            out.flush()
            os.fsync(out.fileno())
        if n_tokens == 0 and single_file:
            raise ValueError(f"data file '{root}' is empty (give a non-empty text file)")
        if n_tokens == 0:
            raise ValueError(f"data folder '{root}' holds no non-empty text files ({n_skipped} "
                             f"skipped as binary or not UTF-8; give a folder of UTF-8 text files)")
        meta = {"source": str(root), "kind": kind, "n_files": n_files, "n_skipped": n_skipped,
                "n_tokens": n_tokens, "max_bytes": max_bytes, "dtype": "uint8",
                "sha256": _sha256_file(tmp_path), "cache_version": _CACHE_VERSION}
        # Tokens first, metadata last: metadata is the "entry is complete" marker _cached checks.
        os.replace(tmp_path, tokens_path)
        _atomic_write_text(meta_path, json.dumps(meta, indent=2) + "\n")
    finally:
        tmp_path.unlink(missing_ok=True)
    return tokens_path


def _check_max_bytes(max_bytes: int | None) -> None:
    if max_bytes is not None and (isinstance(max_bytes, bool) or not isinstance(max_bytes, int)
                                  or max_bytes < 1):
        raise ValueError(f"max_bytes {max_bytes!r} is invalid (give a positive integer or None)")


def check_source_path(source: Path) -> Path:
    """Cheap checks on a data path (exists; a file is not empty); return it resolved."""
    source = Path(source)
    if not source.exists():
        raise ValueError(f"data path '{source}' does not exist "
                         f"(give a text file or a folder of text files)")
    if source.is_file() and source.stat().st_size == 0:
        raise ValueError(f"data file '{source}' is empty (give a non-empty text file)")
    if not (source.is_file() or source.is_dir()):
        raise ValueError(f"data path '{source}' is neither a file nor a folder "
                         f"(give a text file or a folder of text files)")
    return source.resolve()


def prepare_token_file(source: Path, cache_dir: Path, *, max_bytes: int | None = None) -> Path:
    """Tokenize a text file or a folder of text files (recursively) into a cached token file.

    In a folder, files are taken in relative-path order and those that are not UTF-8 text are
    skipped; ``max_bytes`` caps the number of tokens. Returns ``<cache_dir>/<key>.tokens``.
    """
    _check_max_bytes(max_bytes)
    root = check_source_path(source)
    if root.is_file():
        return _build("text", root, [(root.name, root)], cache_dir, max_bytes, single_file=True)
    files = _list_folder(root, keep=lambda rel: True, skip_dir=lambda name: False,
                         cache_dir=cache_dir)
    if not files:
        raise ValueError(f"data folder '{source}' holds no files "
                         f"(give a folder of text files)")
    return _build("text", root, files, cache_dir, max_bytes, single_file=False)


def stdlib_root() -> Path:
    """The running interpreter's standard library folder."""
    return Path(sysconfig.get_paths()["stdlib"]).resolve()


def stdlib_corpus(cache_dir: Path, *, max_bytes: int = 8_000_000) -> Path:
    """Token file of the standard library's own ``.py`` sources (no tests, no site-packages).

    A real text corpus present on every machine with Python, so it needs no download; it is
    deterministic for a given interpreter build.
    """
    _check_max_bytes(max_bytes)
    root = stdlib_root()
    if not root.is_dir():
        raise ValueError(f"standard library folder '{root}' does not exist "
                         f"(use data source 'synthetic' or 'text' on this interpreter)")
    files = _list_folder(root, keep=lambda rel: rel.endswith(".py"),
                         skip_dir=lambda name: name in _STDLIB_SKIP_DIRS, cache_dir=cache_dir)
    return _build("stdlib", root, files, cache_dir, max_bytes, single_file=False)


def read_meta(tokens_path: Path) -> dict:
    """The metadata written next to a token file."""
    return json.loads(Path(tokens_path).with_suffix(".json").read_text(encoding="utf-8"))
