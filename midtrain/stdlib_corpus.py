"""The embedded default corpus: prose, code and math built from what is installed (no downloads).

    prose   English prose: docstrings (extracted with ``ast``), comment blocks and the
            pydoc topic help of the installed Python standard library; ascii paragraphs
            that are mostly letters
    code    the standard library's own Python source files
    math    procedurally generated arithmetic and algebra problems with worked answers
            (``midtrain.mathgen``)

Built on first use and cached under ``~/.cache/midtrain`` (or ``$MIDTRAIN_CACHE``); use it through
``midtrain.data.default_corpus``.
"""

from __future__ import annotations

import ast
import gc
import json
import os
import re
import sys
import sysconfig
import zlib
from pathlib import Path
from typing import Iterable

import numpy as np

from diagnostics.runs import atomic_write
from midtrain.corpus import BUILDER_VERSION, Corpus, DataError, Domain, _domain_from_docs
from midtrain.mathgen import _math_stream

__all__ = ["default_corpus", "default_cache_dir"]

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
    try:  # atomic: concurrent builders (DDP ranks) each write a temp file and rename
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, writer=lambda f: np.savez(f, **arrays))
    except OSError:  # unwritable cache: the corpus just lives in memory (atomic_write removed its temp file)
        pass


def _load_npz(path: Path) -> Corpus:
    with np.load(path, allow_pickle=False) as z:
        meta = json.loads(str(z["meta"]))
        doms = {n: Domain(n, z[f"{n}__train"], z[f"{n}__val"], meta["info"][n]) for n in meta["names"]}
    return Corpus(doms, meta["vocab_size"], f"default ({path})")

