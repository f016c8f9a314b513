"""Data for the built-in loop: an embedded three-domain corpus, user corpora, mixtures.

Nothing is downloaded. The default corpus is built on first use from what is
installed and cached under ``~/.cache/midtrain`` (or ``$MIDTRAIN_CACHE``):

    prose   English prose: docstrings (extracted with ``ast``), comment blocks and the
            pydoc topic help of the installed Python standard library; ascii paragraphs
            that are mostly letters
    code    the standard library's own Python source files
    math    procedurally generated arithmetic and algebra problems with worked answers

Tokens are bytes (``ByteTokenizer``, vocab 256); documents are joined with the
end-of-text byte 0. Train and validation are split *by document* with a stable
hash, so no validation text is ever trained on.

Sampling is counter-based: ``MixtureSampler.global_batch(phase, step, micro, B)`` is a
pure function of ``(seed, phase, step, micro, B)``. Resuming needs no data state and
DDP ranks just take their slice with ``shard``. Sequences are aligned chunks of
``seq_len + 1`` tokens (x = chunk[:-1], y = chunk[1:]), so every example has a stable
id and is revisited -- what per-example difficulty tracking needs.

    python -c "from midtrain.data import *; c = default_corpus(); print(c.describe()); \
      b = MixtureSampler(c, {'prose': .5, 'code': .3, 'math': .2}, 64, seed=0).global_batch(0, 0, 0, 8); \
      print(b.x.shape, repr(ByteTokenizer().decode(b.x[0])))"
"""

from __future__ import annotations

import ast
import gc
import json

import os
import re
import sys
import sysconfig
import tempfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import numpy as np
import torch

from midtrain.mathgen import _math_stream, generate_math_problems

__all__ = [
    "DataError", "ByteTokenizer", "EOT", "Domain", "Corpus", "Batch", "MixtureSampler",
    "default_corpus", "load_corpus", "val_batches", "shard", "example_id", "decode_example_id",
    "generate_math_problems", "default_cache_dir", "BUILDER_VERSION",
]

EOT = 0  # end-of-text byte between documents
BUILDER_VERSION = 1  # bump when the default corpus recipe changes (invalidates caches)
DOMAIN_STRIDE = 2**40  # example id = domain_index * 2**40 + chunk start offset


class DataError(ValueError):
    """Bad or missing data: what was wrong, where, and what was expected."""


class ByteTokenizer:
    """UTF-8 bytes as tokens: vocab 256, token 0 (NUL) is the end-of-text separator."""

    vocab_size = 256
    eot = EOT

    def encode(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).copy()

    def decode(self, tokens: Iterable[int] | np.ndarray | torch.Tensor) -> str:
        if isinstance(tokens, torch.Tensor):
            tokens = tokens.detach().cpu().numpy()
        return bytes(np.asarray(tokens, dtype=np.int64).astype(np.uint8)).decode("utf-8", errors="replace")


# ----------------------------------------------------------------------------- corpus


@dataclass(frozen=True)
class _TokenFile:
    """Where a memmapped token array lives, so a fresh view can be opened per batch."""

    path: str
    dtype: str
    offset: int  # bytes
    length: int  # tokens

    def open(self) -> np.ndarray:
        return np.memmap(self.path, dtype=self.dtype, mode="r", offset=self.offset, shape=(self.length,))


@dataclass
class Domain:
    """One data domain: 1-d token streams for train and validation (uint8/uint16/memmap)."""

    name: str
    train: np.ndarray
    val: np.ndarray
    info: dict = field(default_factory=dict)  # train_docs, val_docs, source ...
    train_file: _TokenFile | None = field(default=None, repr=False)
    val_file: _TokenFile | None = field(default=None, repr=False)

    def stream(self, split: str = "train") -> np.ndarray:
        """The split's tokens; memmapped files get a fresh view (avoids memmap page growth)."""
        f = self.train_file if split == "train" else self.val_file
        if f is not None:
            return f.open()
        return self.train if split == "train" else self.val


@dataclass
class Corpus:
    domains: dict[str, Domain]
    vocab_size: int = 256
    source: str = ""

    def names(self) -> list[str]:
        return list(self.domains)

    def index(self, name: str) -> int:
        if name not in self.domains:
            raise DataError(f"unknown domain {name!r}; this corpus has {self.names()}.")
        return self.names().index(name)

    def describe(self) -> str:
        lines = [f"corpus {self.source or '(in memory)'}: {len(self.domains)} domains, vocab {self.vocab_size}"]
        for d in self.domains.values():
            docs = ""
            if "train_docs" in d.info:
                docs = f"  docs {d.info['train_docs']:,}/{d.info.get('val_docs', 0):,}"
            lines.append(f"  {d.name:<12} train {len(d.train):>12,} tokens  val {len(d.val):>10,} tokens{docs}")
        return "\n".join(lines)


def _is_val(key: str, val_fraction: float) -> bool:
    """Stable document-level split: crc32 of the document's name (group key)."""
    return zlib.crc32(key.encode("utf-8")) % 10_000 < round(val_fraction * 10_000)


def _join(docs: list[bytes]) -> np.ndarray:
    """Documents -> one uint8 stream, each document followed by EOT."""
    if not docs:
        return np.zeros(0, dtype=np.uint8)
    return np.frombuffer(b"\x00".join(docs) + b"\x00", dtype=np.uint8).copy()


def _tail_split(n: int, val_fraction: float) -> int:
    """Train length when the validation split is the last val_fraction of a stream."""
    if val_fraction <= 0 or n < 2:
        return n
    return n - min(n - 1, max(1, round(n * val_fraction)))


def _domain_from_docs(name: str, docs: list[tuple[str, bytes]], val_fraction: float, source: str) -> Domain:
    """Split (key, text) documents by key hash; if one side ends up empty, split the stream's tail."""
    train = [t for k, t in docs if not _is_val(k, val_fraction)]
    val = [t for k, t in docs if _is_val(k, val_fraction)]
    if val_fraction > 0 and (not train or not val):  # too few documents for a by-document split
        stream = _join([t for _, t in docs])
        cut = _tail_split(len(stream), val_fraction)
        info = {"train_docs": len(docs), "val_docs": 0, "split": "tail", "source": source}
        return Domain(name, stream[:cut].copy(), stream[cut:].copy(), info)
    info = {"train_docs": len(train), "val_docs": len(val), "split": "document", "source": source}
    return Domain(name, _join(train), _join(val), info)


# ----------------------------------------------------------------------------- default corpus

_SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__", "idlelib",
              "tkinter", "turtledemo", "encodings", "pydoc_data", "lib2to3", "ensurepip", "lib-dynload"}
_NOT_PROSE = re.compile(r"[^A-Za-z \n]")
_PARAGRAPH = re.compile(r"\n[ \t]*\n")


def default_cache_dir() -> Path:
    return Path(os.environ.get("MIDTRAIN_CACHE") or Path.home() / ".cache" / "midtrain")


def _stdlib_sources(max_file_bytes: int = 256_000) -> list[tuple[str, str]]:
    """(relative path, source) of the stdlib's .py files, in a deterministic hash-shuffled order.

    Sorted walk (determinism), then ordered by crc32 of the path so a byte cap samples the
    whole library rather than its alphabetical start. Tests, site-packages, GUI data and
    non-utf8 files are skipped.
    """
    root = Path(sysconfig.get_paths()["stdlib"])
    out = []
    for dirpath, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d not in _SKIP_DIRS and not d.startswith(("test", "config-", ".")))
        for f in sorted(files):
            if not f.endswith(".py") or f.startswith("test_"):
                continue
            p = Path(dirpath) / f
            try:
                raw = p.read_bytes()
                if len(raw) > max_file_bytes or b"\x00" in raw:
                    continue
                out.append((p.relative_to(root).as_posix(), raw.decode("utf-8")))
            except (OSError, UnicodeDecodeError):
                continue
    topics = root / "pydoc_data" / "topics.py"  # the pydoc help text (language reference): prose only
    try:
        out.append(("pydoc_data/topics.py", topics.read_text("utf-8")))
    except (OSError, UnicodeDecodeError):
        pass
    out.sort(key=lambda kv: (zlib.crc32(kv[0].encode()), kv[0]))
    return out


def _prose(text: str, min_len: int = 40) -> str:
    """Keep the paragraphs that are ascii English prose (>= 85% letters/space, no doctests)."""
    kept = []
    for p in _PARAGRAPH.split(text):
        p = p.strip()
        if len(p) >= min_len and p.isascii() and ">>>" not in p and len(_NOT_PROSE.sub("", p)) >= 0.85 * len(p):
            kept.append(p)
    out = "\n\n".join(kept)
    return out if len(out) >= 60 else ""


_DOC_OWNERS = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
_COMPOUND = _DOC_OWNERS + (ast.If, ast.For, ast.AsyncFor, ast.While, ast.With, ast.AsyncWith, ast.Try, ast.ExceptHandler)


def _docstrings(tree: ast.Module) -> list[str]:
    """Module, class and function docstrings, in source order (walks compound statements only: fast)."""
    out, stack = [], [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, _DOC_OWNERS):
            doc = ast.get_docstring(node, clean=True)
            if doc:
                out.append(doc)
        children = []
        for attr in ("body", "orelse", "handlers", "finalbody"):
            children += [c for c in getattr(node, attr, ()) if isinstance(c, _COMPOUND)]
        stack.extend(reversed(children))
    return out


def _comment_blocks(source: str) -> list[str]:
    """Runs of >= 2 full-line '#' comments, joined as one paragraph."""
    out, block = [], []
    for line in source.splitlines() + [""]:
        s = line.strip()
        if s.startswith("#") and not s.startswith("#!"):
            block.append(s.lstrip("#").strip())
            continue
        if len(block) >= 2:
            out.append("\n".join(b for b in block if b))
        block = []
    return out


def _prose_docs(rel: str, source: str) -> list[str]:
    if rel == "pydoc_data/topics.py":
        try:
            tree = ast.parse(source)
            topics = next(ast.literal_eval(n.value) for n in tree.body
                          if isinstance(n, ast.Assign) and isinstance(n.value, ast.Dict))
        except (SyntaxError, ValueError, StopIteration):
            return []
        docs = [_prose(v) for _, v in sorted(topics.items()) if isinstance(v, str)]
    else:
        try:
            tree = ast.parse(source)
        except (SyntaxError, ValueError):
            return []
        docs = [_prose(d) for d in _docstrings(tree)]
        docs += [_prose(c, min_len=80) for c in _comment_blocks(source)]
    return [d for d in docs if d]


def _capped(docs: Iterable[tuple[str, str]], cap: int) -> list[tuple[str, bytes]]:
    """Take whole (key, text) documents, dropping exact duplicates, until the next would pass `cap` bytes."""
    out, seen, total = [], set(), 0
    for key, text in docs:
        b = text.replace("\x00", "").encode("utf-8")
        if not b or b in seen:
            continue
        if total + len(b) + 1 > cap:
            break
        seen.add(b)
        out.append((key, b))
        total += len(b) + 1
    return out


def _build_default(domain_bytes: int, val_fraction: float, seed: int) -> Corpus:
    sources = _stdlib_sources()
    if not sources:
        raise DataError(f"found no readable Python files under the standard library at "
                        f"{sysconfig.get_paths()['stdlib']!r}; the default corpus is built from them. "
                        "Pass a corpus of your own with load_corpus(path) instead.")

    def prose_iter():  # split key is the source file, so a val file's docstrings stay out of train code
        for rel, src in sources:
            for d in _prose_docs(rel, src):
                yield rel, d

    code = ((rel, src) for rel, src in sources if rel != "pydoc_data/topics.py")
    math_docs = ((f"math/{i:07d}", t) for i, t in enumerate(_math_stream(seed)))  # the cap stops it
    domains = {}
    for name, docs, src in (("prose", prose_iter(), "stdlib"), ("code", code, "stdlib"), ("math", math_docs, "generated")):
        domains[name] = _domain_from_docs(name, _capped(docs, domain_bytes), val_fraction, src)
    return Corpus(domains, 256, "default")


def default_corpus(cache_dir: str | os.PathLike | None = None, *, domain_bytes: int = 3_000_000,
                   val_fraction: float = 0.05, seed: int = 1234, use_cache: bool = True) -> Corpus:
    """The embedded prose / code / math corpus (byte tokens), built once and cached as npz.

    cache_dir: defaults to $MIDTRAIN_CACHE or ~/.cache/midtrain; the file is keyed by the
    Python version, BUILDER_VERSION and the arguments. An unwritable cache just means the
    corpus is rebuilt in memory (a few seconds). domain_bytes caps each domain's size.
    """
    if domain_bytes < 1000:
        raise DataError(f"domain_bytes must be at least 1000, got {domain_bytes}.")
    if not 0 <= val_fraction < 1:
        raise DataError(f"val_fraction must be in [0, 1), got {val_fraction}.")
    v, where = sys.version_info, zlib.crc32(sysconfig.get_paths()["stdlib"].encode()) % 10_000
    key = f"default_py{v.major}.{v.minor}.{v.micro}-{where:04d}_b{BUILDER_VERSION}_{domain_bytes}_{val_fraction:g}_{seed}.npz"
    path = Path(cache_dir if cache_dir is not None else default_cache_dir()) / key
    if use_cache and path.is_file():
        try:
            return _load_npz(path)
        except Exception:  # corrupt or foreign file: rebuild and overwrite
            pass
    gc_was_enabled = gc.isenabled()
    gc.disable()  # ast.parse makes millions of short-lived nodes; the cyclic GC only slows it
    try:
        corpus = _build_default(domain_bytes, val_fraction, seed)
    finally:
        if gc_was_enabled:
            gc.enable()
    if use_cache:
        _save_npz(corpus, path)
    corpus.source = f"default ({path if path.is_file() else 'in memory'})"
    return corpus


def _save_npz(corpus: Corpus, path: Path) -> None:
    arrays = {}
    for n, d in corpus.domains.items():
        arrays[f"{n}__train"], arrays[f"{n}__val"] = d.train, d.val
    arrays["meta"] = np.array(json.dumps({"names": corpus.names(), "vocab_size": corpus.vocab_size,
                                          "info": {n: d.info for n, d in corpus.domains.items()}}))
    tmp = None
    try:  # atomic: concurrent builders (DDP ranks) each write a temp file and rename
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
        os.replace(tmp, path)
    except OSError:  # unwritable cache: the corpus just lives in memory
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)


def _load_npz(path: Path) -> Corpus:
    with np.load(path, allow_pickle=False) as z:
        meta = json.loads(str(z["meta"]))
        doms = {n: Domain(n, z[f"{n}__train"], z[f"{n}__val"], meta["info"][n]) for n in meta["names"]}
    return Corpus(doms, meta["vocab_size"], f"default ({path})")


# ----------------------------------------------------------------------------- user corpora

_EXPECTED = (
    "load_corpus expects one of: a directory of .txt/.md files (files in a first-level "
    "subdirectory form the domain named after it, files at the top form domain 'text'); a .jsonl "
    "file or a directory of them, one JSON object per line like {\"text\": \"...\", \"domain\": \"...\"} "
    "(domain optional); or nanoGPT-style token files -- headerless little-endian uint16 train.bin "
    "(and optionally val.bin) in the directory, or in <domain>/ subdirectories."
)
_TEXT_SUFFIXES = (".txt", ".md")


def load_corpus(path: str | os.PathLike, val_fraction: float = 0.05, dtype: str = "uint16",
                vocab_size: int | None = None) -> Corpus:
    """Load a user corpus (see _EXPECTED). Text is byte-tokenized (vocab 256).

    .bin token files are memory-mapped (`dtype`, default nanoGPT's uint16; vocab_size then
    defaults to 65536). Without val.bin the last val_fraction of train.bin is validation.
    Text documents are split by a stable hash of their path (and line, for jsonl).
    """
    p = Path(path).expanduser()
    if not 0 <= val_fraction < 1:
        raise DataError(f"val_fraction must be in [0, 1), got {val_fraction}.")
    if not p.exists():
        raise DataError(f"data path {str(p)!r} does not exist. {_EXPECTED}")
    if p.is_file():
        if p.suffix == ".bin":
            return _bin_corpus({"text": p}, val_fraction, dtype, vocab_size, str(p))
        if p.suffix in _TEXT_SUFFIXES + (".jsonl",):
            return _text_corpus([(p, p.name, "text")], val_fraction, vocab_size, str(p))
        raise DataError(f"data file {str(p)!r} has an unsupported type {p.suffix!r}. {_EXPECTED}")
    bins = {"text": p / "train.bin"} if (p / "train.bin").is_file() else {}
    for sub in sorted(q for q in p.iterdir() if q.is_dir() and not q.name.startswith(".")):
        if (sub / "train.bin").is_file():
            bins[sub.name] = sub / "train.bin"
    if bins:  # token files win: a nanoGPT data dir also holds input.txt and prepare.py
        return _bin_corpus(bins, val_fraction, dtype, vocab_size, str(p))
    files = []
    for f in sorted(p.rglob("*")):
        rel = f.relative_to(p)
        if f.is_file() and f.suffix in _TEXT_SUFFIXES + (".jsonl",) and not any(s.startswith(".") for s in rel.parts):
            files.append((f, rel.as_posix(), rel.parts[0] if len(rel.parts) > 1 else "text"))
    if not files:
        what = "is empty" if not any(p.iterdir()) else "has no .txt, .md, .jsonl or train.bin files"
        raise DataError(f"data directory {str(p)!r} {what}. {_EXPECTED}")
    return _text_corpus(files, val_fraction, vocab_size, str(p))


def _text_corpus(files: list[tuple[Path, str, str]], val_fraction: float, vocab_size: int | None, source: str) -> Corpus:
    by_domain: dict[str, list[tuple[str, bytes]]] = {}
    for f, rel, domain in files:
        if f.suffix == ".jsonl":
            for key, dom, text in _read_jsonl(f, rel, domain):
                by_domain.setdefault(dom, []).append((key, text))
        else:
            try:
                text = f.read_bytes().replace(b"\x00", b"")
            except OSError as e:
                raise DataError(f"cannot read {str(f)!r}: {e}") from e
            if text.strip():
                by_domain.setdefault(domain, []).append((rel, text))
    if not by_domain:
        raise DataError(f"the data at {source!r} holds no text (all files are empty). {_EXPECTED}")
    if vocab_size is not None and vocab_size < 256:
        raise DataError(f"text is byte-tokenized (256 tokens) but vocab_size={vocab_size} was asked for.")
    doms = {n: _domain_from_docs(n, by_domain[n], val_fraction, source) for n in sorted(by_domain)}
    return Corpus(doms, vocab_size or 256, source)


def _read_jsonl(f: Path, rel: str, default_domain: str) -> Iterable[tuple[str, str, bytes]]:
    try:
        lines = f.read_text("utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"cannot read {str(f)!r} as utf-8 JSON lines: {e}") from e
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{f}:{i}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{where}: malformed JSON ({e.msg} at column {e.colno}); each line must be an "
                            'object like {"text": "...", "domain": "..."}.') from e
        if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
            raise DataError(f'{where}: expected an object with a string "text" field, got {line[:80]!r}.')
        dom = obj.get("domain", default_domain)
        if not isinstance(dom, str) or not dom or "/" in dom or dom != dom.strip():
            raise DataError(f"{where}: domain must be a non-empty string without '/' or surrounding spaces, got {dom!r}.")
        text = obj["text"].replace("\x00", "").encode("utf-8")
        if text.strip():
            yield f"{rel}:{i}", dom, text


def _token_file(path: Path, dtype: np.dtype) -> _TokenFile:
    size = path.stat().st_size
    if size % dtype.itemsize:
        raise DataError(f"{str(path)!r} is {size} bytes, not a multiple of {dtype.itemsize}: not a headerless "
                        f"{dtype.name} token file (nanoGPT .bin files are little-endian uint16 arrays).")
    if size == 0:
        raise DataError(f"{str(path)!r} is empty: no tokens.")
    return _TokenFile(str(path), dtype.str, 0, size // dtype.itemsize)


def _bin_corpus(bins: dict[str, Path], val_fraction: float, dtype: str, vocab_size: int | None, source: str) -> Corpus:
    try:
        dt = np.dtype(dtype).newbyteorder("<")
    except TypeError as e:
        raise DataError(f"unknown token dtype {dtype!r}; use uint16 (nanoGPT) or uint32.") from e
    if dt.kind != "u":
        raise DataError(f"token dtype must be unsigned (uint8/uint16/uint32), got {dtype!r}.")
    if vocab_size is None:
        if dt.itemsize > 2:
            raise DataError(f"pass vocab_size for {dtype} token files (it cannot be inferred cheaply).")
        vocab_size = 2 ** (8 * dt.itemsize)
    doms = {}
    for name, train_path in bins.items():
        tf = _token_file(train_path, dt)
        vpath = train_path.with_name("val.bin")
        if vpath.is_file():
            vf = _token_file(vpath, dt)
        else:  # no val.bin: the tail of train.bin is validation
            cut = _tail_split(tf.length, val_fraction)
            vf = _TokenFile(tf.path, tf.dtype, cut * dt.itemsize, tf.length - cut)
            tf = _TokenFile(tf.path, tf.dtype, 0, cut)
        head = tf.open()[: 1 << 20]
        if len(head) and int(head.max()) >= vocab_size:
            raise DataError(f"{str(train_path)!r} has token {int(head.max())} >= vocab_size {vocab_size}; "
                            "pass the right dtype/vocab_size.")
        info = {"source": str(train_path), "split": "val.bin" if vpath.is_file() else "tail"}
        val = vf.open() if vf.length else np.zeros(0, dtype=dt)
        doms[name] = Domain(name, tf.open(), val, info, tf, vf if vf.length else None)
    return Corpus(doms, vocab_size, source)


# ----------------------------------------------------------------------------- batches


def example_id(domain_index: int | np.ndarray, offset: int | np.ndarray) -> np.ndarray:
    """Stable int64 id of a training chunk: domain_index * 2**40 + start offset."""
    return np.asarray(domain_index, dtype=np.int64) * DOMAIN_STRIDE + np.asarray(offset, dtype=np.int64)


def decode_example_id(ids) -> tuple[np.ndarray, np.ndarray]:
    """ids -> (domain_index, offset). Validation ids are negative (-1 - id) and decode the same."""
    ids = ids.detach().cpu().numpy() if isinstance(ids, torch.Tensor) else np.asarray(ids, dtype=np.int64)
    ids = np.where(ids < 0, -1 - ids, ids)
    return ids // DOMAIN_STRIDE, ids % DOMAIN_STRIDE


@dataclass
class Batch:
    x: torch.Tensor  # (B, T) long, inputs
    y: torch.Tensor  # (B, T) long, targets = inputs shifted by one
    ids: torch.Tensor  # (B,) int64 example ids (see example_id)
    domains: torch.Tensor  # (B,) long, index into domain_names
    domain_names: list[str]

    @property
    def size(self) -> int:
        return self.x.shape[0]

    def to(self, device, non_blocking: bool = False) -> "Batch":
        t = lambda v: v.to(device, non_blocking=non_blocking)  # noqa: E731
        return Batch(t(self.x), t(self.y), t(self.ids), t(self.domains), self.domain_names)

    def pin_memory(self) -> "Batch":
        return Batch(self.x.pin_memory(), self.y.pin_memory(), self.ids.pin_memory(), self.domains.pin_memory(),
                     self.domain_names)

    def __getitem__(self, sl: slice) -> "Batch":
        return Batch(self.x[sl], self.y[sl], self.ids[sl], self.domains[sl], self.domain_names)


def _gather(corpus: Corpus, split: str, dom_idx: np.ndarray, starts: np.ndarray, seq_len: int, sign: int = 1) -> Batch:
    names = corpus.names()
    chunks = np.empty((len(dom_idx), seq_len + 1), dtype=np.int64)  # (B, T+1)
    span = np.arange(seq_len + 1)
    for d in np.unique(dom_idx):
        rows = dom_idx == d
        arr = corpus.domains[names[d]].stream(split)  # fresh memmap view per batch
        chunks[rows] = arr[starts[rows, None] + span]
    ids = example_id(dom_idx, starts)
    if sign < 0:
        ids = -1 - ids
    return Batch(torch.from_numpy(np.ascontiguousarray(chunks[:, :-1])), torch.from_numpy(np.ascontiguousarray(chunks[:, 1:])),
                 torch.from_numpy(ids), torch.from_numpy(dom_idx.astype(np.int64)), names)


def shard(batch: Batch, rank: int, world_size: int) -> Batch:
    """This rank's contiguous slice of a global batch (DDP)."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise DataError(f"rank {rank} is not in range for world_size {world_size}.")
    if batch.size % world_size:
        raise DataError(f"a batch of {batch.size} sequences does not split evenly over {world_size} ranks.")
    per = batch.size // world_size
    return batch[rank * per:(rank + 1) * per]


class MixtureSampler:
    """Counter-based mixture sampler: each global batch is a pure function of its coordinates.

    Per sequence: domain ~ Categorical(weights), then a chunk index uniform over the domain's
    train stream cut into aligned chunks of seq_len + 1 tokens (x = chunk[:-1], y = chunk[1:]).
    """

    def __init__(self, corpus: Corpus, weights: dict[str, float], seq_len: int, seed: int = 0):
        names = corpus.names()
        if not isinstance(weights, dict) or not weights:
            raise DataError(f"weights must be a non-empty dict domain -> weight over {names}, got {weights!r}.")
        unknown = sorted(set(weights) - set(names))
        if unknown:
            raise DataError(f"unknown domain(s) {unknown} in the mixture weights; valid domains are {names}.")
        w = np.array([float(weights.get(n, 0.0)) for n in names])
        if not np.all(np.isfinite(w)) or np.any(w < 0):
            raise DataError(f"mixture weights must be finite and non-negative, got {weights}.")
        if w.sum() <= 0:
            raise DataError(f"mixture weights are all zero: {weights}; give at least one domain a positive weight.")
        if seq_len < 1:
            raise DataError(f"seq_len must be positive, got {seq_len}.")
        self.corpus, self.seq_len, self.seed = corpus, int(seq_len), int(seed)
        self.domain_names = names
        self.probs = w / w.sum()
        self.n_chunks = np.zeros(len(names), dtype=np.int64)
        for i, n in enumerate(names):
            length = len(corpus.domains[n].train)
            if self.probs[i] > 0:
                if length < seq_len + 1:
                    raise DataError(f"domain {n!r} has {length} training tokens, fewer than seq_len + 1 = {seq_len + 1}; "
                                    "use a shorter seq_len or give the domain weight 0.")
                self.n_chunks[i] = length // (seq_len + 1)

    @property
    def weights(self) -> dict[str, float]:
        return dict(zip(self.domain_names, self.probs.tolist()))

    def rng(self, phase_index: int, step: int, micro: int, batch_size: int) -> np.random.Generator:
        coords = [self.seed, phase_index, step, micro, batch_size]
        if any(int(c) < 0 for c in coords):
            raise DataError(f"seed, phase_index, step, micro and batch_size must be non-negative, got {coords}.")
        return np.random.default_rng(np.random.SeedSequence([int(c) for c in coords]))

    def global_batch(self, phase_index: int, step: int, micro: int, batch_size: int) -> Batch:
        """The global batch (all ranks) for these coordinates: x, y (B, T) long."""
        if batch_size < 1:
            raise DataError(f"batch_size must be positive, got {batch_size}.")
        rng = self.rng(phase_index, step, micro, batch_size)
        dom = rng.choice(len(self.domain_names), size=batch_size, p=self.probs)  # (B,)
        starts = rng.integers(0, self.n_chunks[dom]) * (self.seq_len + 1)  # (B,) aligned offsets
        return _gather(self.corpus, "train", dom, starts, self.seq_len)

    shard = staticmethod(shard)


def val_batches(corpus: Corpus, domain: str, seq_len: int, batch_size: int, n_batches: int) -> list[Batch]:
    """Fixed validation batches: evenly spaced aligned chunks of the domain's val split.

    Uses what exists if the split holds fewer than batch_size * n_batches chunks (the last
    batch may be smaller). Ids are negative (-1 - example_id) so they never clash with training ids.
    """
    d = corpus.index(domain)
    n = len(corpus.domains[domain].val)
    if n < seq_len + 1:
        raise DataError(f"domain {domain!r} has {n} validation tokens, fewer than seq_len + 1 = {seq_len + 1}; "
                        "use a shorter seq_len or a larger val_fraction.")
    if batch_size < 1 or n_batches < 1:
        raise DataError(f"batch_size and n_batches must be positive, got {batch_size} and {n_batches}.")
    avail, need = n // (seq_len + 1), batch_size * n_batches
    idx = (np.arange(need) * avail) // need if avail >= need else np.arange(avail)
    starts = idx.astype(np.int64) * (seq_len + 1)
    dom = np.full(len(starts), d, dtype=np.int64)
    return [_gather(corpus, "val", dom[i:i + batch_size], starts[i:i + batch_size], seq_len, sign=-1)
            for i in range(0, len(starts), batch_size)]
