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

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import numpy as np
import torch

from midtrain.corpus import (  # noqa: F401  (re-exported: the public data API lives here)
    BUILDER_VERSION, DOMAIN_STRIDE, EOT, ByteTokenizer, Corpus, DataError, Domain, _TokenFile,
    _domain_from_docs, _tail_split,
)
from midtrain.mathgen import generate_math_problems  # noqa: F401
from midtrain.stdlib_corpus import default_cache_dir, default_corpus  # noqa: F401

__all__ = [
    "DataError", "ByteTokenizer", "EOT", "Domain", "Corpus", "Batch", "MixtureSampler",
    "default_corpus", "load_corpus", "check_phases", "val_batches", "shard", "example_id", "decode_example_id",
    "generate_math_problems", "default_cache_dir", "BUILDER_VERSION",
]

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


def check_phases(corpus: Corpus, phases: Iterable) -> None:
    """DataError, naming the phase, for a phase the corpus cannot serve: each phase (``name``,
    ``mixture``, ``seq_len``, as in ``midtrain.config.Phase``) builds its sampler up front, so a
    domain shorter than one sequence is found before a run directory is written."""
    for p in phases:
        try:
            MixtureSampler(corpus, p.mixture, p.seq_len)
        except DataError as e:
            raise DataError(f"phase {p.name!r}: {e} (data: {corpus.source or 'in memory'})") from None


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
