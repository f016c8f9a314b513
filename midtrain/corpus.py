"""Corpus types shared by the data modules: byte tokenizer, domains, corpora, document splits.

``midtrain.data`` re-exports everything public here; ``midtrain.stdlib_corpus`` builds the
embedded default corpus from these types.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from typing import Iterable

import numpy as np
import torch

__all__ = ["DataError", "ByteTokenizer", "EOT", "Domain", "Corpus", "BUILDER_VERSION", "DOMAIN_STRIDE"]

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

