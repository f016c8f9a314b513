"""Tests for midtrain.data: embedded corpus, user corpora, mixture sampling, validation batches."""

import json
import re
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch

from midtrain.data import (
    EOT, Batch, ByteTokenizer, Corpus, DataError, Domain, MixtureSampler, decode_example_id, default_corpus,
    generate_math_problems, load_corpus, shard, val_batches,
)

SMALL = 200_000  # bytes per domain for the quick determinism builds


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("midtrain_cache")


@pytest.fixture(scope="module")
def corpus(cache_dir):
    return default_corpus(cache_dir)  # full default size, built once for this module


def toy_corpus(lengths=None, seed=0):
    """In-memory corpus with distinct token ranges per domain (cheap to check what was sampled)."""
    rng = np.random.default_rng(seed)
    lengths = lengths or {"a": 5000, "b": 3000, "c": 2000}
    doms = {n: Domain(n, rng.integers(1, 256, n_tok).astype(np.uint8), rng.integers(1, 256, 400).astype(np.uint8))
            for n, n_tok in lengths.items()}
    return Corpus(doms, 256)


def docs(stream):
    return [d for d in bytes(np.asarray(stream)).split(b"\x00") if d]


# ----------------------------------------------------------------------------- default corpus


def test_default_corpus_domains_and_sizes(corpus, cache_dir):
    assert corpus.names() == ["prose", "code", "math"]
    assert corpus.vocab_size == 256
    for d in corpus.domains.values():
        assert d.train.dtype == np.uint8 and d.train.ndim == 1
        assert len(d.train) > 1_000_000, d.name
        assert len(d.val) > 10_000, d.name
        assert len(d.val) < 0.2 * len(d.train), d.name
        assert d.train[-1] == EOT
    prose = bytes(corpus.domains["prose"].train[:200_000])
    assert max(prose) < 128  # ascii
    assert prose.count(b" the ") > 500  # English
    code = bytes(corpus.domains["code"].train[:200_000]).decode("utf-8")
    assert "def " in code and "import " in code
    assert list(cache_dir.glob("default_*.npz")), "the built corpus is cached"
    text = corpus.describe()
    assert all(n in text for n in corpus.names())


def test_default_corpus_deterministic(corpus, cache_dir, tmp_path):
    a = default_corpus(tmp_path / "a", domain_bytes=SMALL)
    b = default_corpus(tmp_path / "b", domain_bytes=SMALL)
    for n in a.names():
        assert len(a.domains[n].train) > SMALL // 2
        assert np.array_equal(a.domains[n].train, b.domains[n].train)
        assert np.array_equal(a.domains[n].val, b.domains[n].val)
    again = default_corpus(cache_dir)  # loaded from the cache written by the fixture
    for n in corpus.names():
        assert np.array_equal(again.domains[n].train, corpus.domains[n].train)
        assert np.array_equal(again.domains[n].val, corpus.domains[n].val)


def test_default_corpus_train_val_documents_disjoint(corpus):
    for d in corpus.domains.values():
        train, val = set(docs(d.train)), set(docs(d.val))
        assert train and val
        assert not train & val, f"{d.name}: {len(train & val)} documents in both splits"
    # the prose of a validation source file stays out of the training code too
    code_train = bytes(corpus.domains["code"].train)
    leaked = [v for v in docs(corpus.domains["prose"].val) if len(v) > 200 and v in code_train]
    assert len(leaked) < 0.05 * len(docs(corpus.domains["prose"].val))


def test_default_corpus_unwritable_cache_builds_in_memory(tmp_path, monkeypatch):
    blocker = tmp_path / "not_a_dir"
    blocker.write_text("x")
    c = default_corpus(blocker / "cache", domain_bytes=20_000)
    assert c.names() == ["prose", "code", "math"]
    monkeypatch.setenv("MIDTRAIN_CACHE", str(tmp_path / "env_cache"))
    default_corpus(domain_bytes=20_000)
    assert list((tmp_path / "env_cache").glob("*.npz"))


def _lin(side, v, x):
    m = re.fullmatch(rf"(-?\d*){v}(?: ([+-]) (\d+))?", side)
    if m is None:
        return int(side)
    coef = {"": 1, "-": -1}.get(m.group(1), None)
    coef = int(m.group(1)) if coef is None else coef
    const = 0 if m.group(2) is None else int(m.group(3)) * (1 if m.group(2) == "+" else -1)
    return coef * x + const


_STEP = re.compile(r"(?<![\d/])((?:-?\d+ [-+*] )+-?\d+) = (-?\d+)(?![/\d])")


def check_math(doc: str):
    for expr, value in _STEP.findall(doc):  # every worked step "a op b (op c) = d" is right
        assert eval(expr) == int(value), f"{expr} = {value} in\n{doc}"
    lines = doc.strip().split("\n")
    problem, answer = lines[0], lines[-1]
    assert answer.startswith("Answer: "), doc
    ans = answer[len("Answer: "):]
    if m := re.fullmatch(r"Problem: Compute (\d+)/(\d+) ([+-]) (\d+)/(\d+)\.", problem):
        a, b, op, c, d = m.groups()
        want = Fraction(int(a), int(b)) + (1 if op == "+" else -1) * Fraction(int(c), int(d))
        assert Fraction(ans) == want, doc
    elif m := re.fullmatch(r"Problem: Compute (\d+) ([-+*]) (\d+)\.", problem):
        a, op, b = int(m.group(1)), m.group(2), int(m.group(3))
        assert int(ans) == {"+": a + b, "-": a - b, "*": a * b}[op], doc
    elif m := re.fullmatch(r"Problem: Divide (\d+) by (\d+) with remainder\.", problem):
        a, d = int(m.group(1)), int(m.group(2))
        assert ans == f"{a // d} remainder {a % d}", doc
    elif m := re.fullmatch(r"Problem: Solve for (\w): (.+) = (.+)\.", problem):
        v, left, right = m.groups()
        assert ans.startswith(f"{v} = "), doc
        x = int(ans.split(" = ")[1])
        assert _lin(left, v, x) == _lin(right, v, x), doc
    elif m := re.fullmatch(r"Problem: Simplify the fraction (\d+)/(\d+)\.", problem):
        f = Fraction(int(m.group(1)), int(m.group(2)))
        assert Fraction(ans) == f and ans == (str(f.numerator) if f.denominator == 1 else f"{f.numerator}/{f.denominator}"), doc
    elif m := re.fullmatch(r"Problem: Evaluate ([\d+\-*() ]+)\.", problem):
        assert int(ans) == eval(m.group(1)), doc
    else:
        raise AssertionError(f"unrecognised problem: {doc}")
    return problem.split()[1]


def test_math_problems_have_correct_answers(corpus):
    seen = set()
    for doc in docs(corpus.domains["math"].train)[:800] + docs(corpus.domains["math"].val)[:200]:
        seen.add(check_math(doc.decode()))
    for doc in generate_math_problems(3000, seed=7):
        seen.add(check_math(doc))
    assert seen == {"Compute", "Divide", "Solve", "Simplify", "Evaluate"}
    assert generate_math_problems(50, seed=7) == generate_math_problems(50, seed=7)
    assert generate_math_problems(50, seed=7) != generate_math_problems(50, seed=8)


def test_byte_tokenizer_roundtrip():
    tok = ByteTokenizer()
    s = "héllo wörld\n"
    ids = tok.encode(s)
    assert ids.dtype == np.uint8 and tok.vocab_size == 256
    assert tok.decode(ids) == s and tok.decode(torch.tensor(ids.astype(np.int64))) == s


# ----------------------------------------------------------------------------- sampling


def test_domain_frequencies_match_weights():
    c = toy_corpus()
    weights = {"a": 0.5, "b": 0.3, "c": 0.2}
    s = MixtureSampler(c, weights, seq_len=8, seed=3)
    doms = torch.cat([s.global_batch(0, step, 0, 4096).domains for step in range(5)]).numpy()
    n = len(doms)
    for i, name in enumerate(c.names()):
        p = weights[name]
        assert abs((doms == i).sum() - n * p) <= 4 * np.sqrt(n * p * (1 - p)), name
    s0 = MixtureSampler(c, {"a": 2.0, "b": 0.0}, seq_len=8, seed=3)  # unnormalised, c missing = 0
    assert s0.weights == {"a": 1.0, "b": 0.0, "c": 0.0}
    assert (s0.global_batch(0, 0, 0, 256).domains == 0).all()


def test_global_batch_is_a_pure_function_of_coordinates():
    c = toy_corpus()
    s = MixtureSampler(c, {"a": 1, "b": 1, "c": 1}, seq_len=16, seed=11)
    b1 = s.global_batch(1, 7, 2, 32)
    b2 = MixtureSampler(c, {"a": 1, "b": 1, "c": 1}, seq_len=16, seed=11).global_batch(1, 7, 2, 32)
    for f in ("x", "y", "ids", "domains"):
        assert torch.equal(getattr(b1, f), getattr(b2, f))
    assert b1.x.dtype == torch.long and b1.y.dtype == torch.long and b1.ids.dtype == torch.int64
    assert b1.x.shape == (32, 16) and b1.size == 32 and b1.domain_names == ["a", "b", "c"]
    for other in (s.global_batch(1, 8, 2, 32), s.global_batch(1, 7, 3, 32), s.global_batch(0, 7, 2, 32),
                  MixtureSampler(c, {"a": 1, "b": 1, "c": 1}, seq_len=16, seed=12).global_batch(1, 7, 2, 32)):
        assert not torch.equal(b1.ids, other.ids)


def test_shards_concatenate_to_global_batch():
    c = toy_corpus()
    s = MixtureSampler(c, {"a": 1, "b": 1}, seq_len=8, seed=0)
    g = s.global_batch(0, 5, 0, 24)
    parts = [s.shard(g, r, 4) for r in range(4)]
    assert all(p.size == 6 for p in parts)
    for f in ("x", "y", "ids", "domains"):
        assert torch.equal(torch.cat([getattr(p, f) for p in parts]), getattr(g, f))
    assert torch.equal(shard(g, 0, 1).x, g.x)
    with pytest.raises(DataError, match="evenly"):
        shard(g, 0, 5)
    with pytest.raises(DataError, match="rank"):
        shard(g, 4, 4)


def test_x_y_shift_and_ids_decode_to_domain_and_offset():
    c = toy_corpus()
    T = 12
    b = MixtureSampler(c, {"a": 0.4, "b": 0.3, "c": 0.3}, seq_len=T, seed=5).global_batch(0, 0, 0, 64)
    assert torch.equal(b.x[:, 1:], b.y[:, :-1])
    dom, off = decode_example_id(b.ids)
    assert np.array_equal(dom, b.domains.numpy())
    assert (off % (T + 1) == 0).all()
    for i in range(b.size):
        stream = c.domains[b.domain_names[dom[i]]].train
        chunk = stream[off[i]:off[i] + T + 1].astype(np.int64)
        assert off[i] + T + 1 <= len(stream)
        assert np.array_equal(b.x[i].numpy(), chunk[:-1]) and np.array_equal(b.y[i].numpy(), chunk[1:])
    moved = b.to("cpu")
    assert isinstance(moved, Batch) and torch.equal(moved.x, b.x)


def test_val_batches_fixed_and_short_split():
    c = toy_corpus()  # 400 val tokens per domain
    v1 = val_batches(c, "b", seq_len=9, batch_size=4, n_batches=3)
    v2 = val_batches(c, "b", seq_len=9, batch_size=4, n_batches=3)
    assert len(v1) == 3 and all(b.x.shape == (4, 9) for b in v1)
    assert all(torch.equal(a.x, b.x) and torch.equal(a.ids, b.ids) for a, b in zip(v1, v2))
    ids = torch.cat([b.ids for b in v1])
    assert (ids < 0).all() and len(set(ids.tolist())) == 12  # val ids never clash with train ids
    dom, off = decode_example_id(ids)
    assert (dom == 1).all() and (off % 10 == 0).all()
    assert np.array_equal(v1[0].x[0].numpy(), c.domains["b"].val[off[0]:off[0] + 9])
    short = val_batches(c, "b", seq_len=99, batch_size=3, n_batches=10)  # only 4 chunks of 100 exist
    assert [b.size for b in short] == [3, 1]
    with pytest.raises(DataError, match="validation tokens"):
        val_batches(c, "b", seq_len=400, batch_size=1, n_batches=1)
    with pytest.raises(DataError, match="unknown domain"):
        val_batches(c, "zzz", seq_len=8, batch_size=1, n_batches=1)


def test_sampler_on_default_corpus(corpus):
    s = MixtureSampler(corpus, {"prose": 0.5, "code": 0.3, "math": 0.2}, seq_len=64, seed=0)
    b = s.global_batch(0, 0, 0, 16)
    assert b.x.shape == (16, 64) and int(b.x.max()) < 256
    assert {len(val_batches(corpus, d, 64, 8, 2)) for d in corpus.names()} == {2}


# ----------------------------------------------------------------------------- user data


def test_load_txt_directory(tmp_path):
    (tmp_path / "legal").mkdir()
    (tmp_path / "legal" / "deep").mkdir()
    (tmp_path / "top.txt").write_text("top level text " * 50)
    for i in range(40):
        (tmp_path / "legal" / f"doc{i:02d}.md").write_text(f"legal document {i} " * 20)
    (tmp_path / "legal" / "deep" / "x.txt").write_text("nested file " * 10)
    (tmp_path / "ignored.csv").write_text("a,b")
    c = load_corpus(tmp_path)
    assert c.names() == ["legal", "text"] and c.vocab_size == 256
    legal = c.domains["legal"]
    all_docs = set(docs(legal.train)) | set(docs(legal.val))
    assert b"nested file " * 10 in all_docs and len(all_docs) == 41
    assert len(legal.val) > 0 and not set(docs(legal.train)) & set(docs(legal.val))
    text = c.domains["text"]  # a single document: the tail of its stream is validation
    assert len(text.train) > 0 and len(text.val) > 0
    s = MixtureSampler(c, {"legal": 1, "text": 1}, seq_len=32, seed=0)
    assert s.global_batch(0, 0, 0, 8).x.shape == (8, 32)


def test_load_jsonl_with_domains(tmp_path):
    lines = [json.dumps({"text": f"story number {i} " * 8, "domain": "stories" if i % 2 else "news"}) for i in range(60)]
    lines.insert(5, "")  # blank lines are fine
    lines.append(json.dumps({"text": "no domain given here " * 5}))
    (tmp_path / "data.jsonl").write_text("\n".join(lines) + "\n")
    c = load_corpus(tmp_path / "data.jsonl")
    assert c.names() == ["news", "stories", "text"]
    assert sum(d.info["train_docs"] + d.info["val_docs"] for d in c.domains.values()) == 61
    assert b"story number 3 " in bytes(c.domains["stories"].train) + bytes(c.domains["stories"].val)
    assert load_corpus(tmp_path).names() == c.names()  # a directory of .jsonl files


def test_load_bin_token_files(tmp_path):
    rng = np.random.default_rng(0)
    train = rng.integers(0, 50_000, 10_000).astype("<u2")
    val = rng.integers(0, 50_000, 1000).astype("<u2")
    train.tofile(tmp_path / "train.bin")
    val.tofile(tmp_path / "val.bin")
    (tmp_path / "input.txt").write_text("the raw text nanoGPT prepared from")
    (tmp_path / "wiki").mkdir()
    wiki = rng.integers(0, 50_000, 4000).astype("<u2")
    wiki.tofile(tmp_path / "wiki" / "train.bin")  # no val.bin: the tail is validation
    c = load_corpus(tmp_path)
    assert c.names() == ["text", "wiki"] and c.vocab_size == 65536
    t = c.domains["text"]
    assert isinstance(t.train, np.memmap) and np.array_equal(t.train, train) and np.array_equal(t.val, val)
    assert t.stream("train") is not t.stream("train")  # fresh memmap per batch
    w = c.domains["wiki"]
    assert len(w.train) + len(w.val) == 4000 and len(w.val) == 200
    assert np.array_equal(np.concatenate([w.train, w.val]), wiki)
    b = MixtureSampler(c, {"text": 1, "wiki": 1}, seq_len=20, seed=1).global_batch(0, 0, 0, 16)
    dom, off = decode_example_id(b.ids)
    for i in range(16):
        src = c.domains[c.names()[dom[i]]].train
        assert np.array_equal(b.x[i].numpy(), src[off[i]:off[i] + 20].astype(np.int64))
    assert int(b.x.max()) > 255
    assert val_batches(c, "wiki", 20, 4, 2)[0].x.shape == (4, 20)
    assert load_corpus(tmp_path / "train.bin", vocab_size=50_000).vocab_size == 50_000


def test_bad_inputs_raise_data_error(tmp_path):
    with pytest.raises(DataError, match="does not exist.*expects"):
        load_corpus(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="is empty.*txt"):
        load_corpus(tmp_path / "empty")
    odd = tmp_path / "odd"
    odd.mkdir()
    (odd / "train.bin").write_bytes(b"\x01\x02\x03")
    with pytest.raises(DataError, match="3 bytes.*multiple of 2"):
        load_corpus(odd)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": oops}\n')
    with pytest.raises(DataError, match=r"bad\.jsonl:2: malformed JSON"):
        load_corpus(bad)
    bad.write_text('{"text": "fine"}\n{"body": "no text"}\n')
    with pytest.raises(DataError, match=r"bad\.jsonl:2: .*\"text\""):
        load_corpus(bad)
    c = toy_corpus({"a": 5000, "b": 30})
    with pytest.raises(DataError, match=r"unknown domain.*\['zzz'\].*\['a', 'b'\]"):
        MixtureSampler(c, {"a": 1, "zzz": 1}, seq_len=8, seed=0)
    with pytest.raises(DataError, match="non-negative"):
        MixtureSampler(c, {"a": 1, "b": -1}, seq_len=8, seed=0)
    with pytest.raises(DataError, match="all zero"):
        MixtureSampler(c, {"a": 0, "b": 0}, seq_len=8, seed=0)
    with pytest.raises(DataError, match=r"'b' has 30 training tokens.*seq_len \+ 1 = 65"):
        MixtureSampler(c, {"a": 1, "b": 1}, seq_len=64, seed=0)
    MixtureSampler(c, {"a": 1, "b": 0}, seq_len=64, seed=0)  # a short domain with weight 0 is fine
