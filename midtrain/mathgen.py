"""Procedurally generated math problems with worked answers: the ``math`` domain
of the embedded corpus.

Eight problem kinds, each written out step by step so that a model can learn the
procedure, not just the answer: column addition with carries, subtraction with
borrows, multiplication by partial products, long division, linear equations
(unknown on one or both sides), fraction simplification with Euclid's algorithm,
fraction addition/subtraction, and order of operations. Deterministic for a seed.

    >>> print(generate_math_problems(1, seed=0)[0])  # doctest: +SKIP
"""

from __future__ import annotations

import math
import random
from fractions import Fraction
from typing import Iterable

_PLACES = ["ones", "tens", "hundreds", "thousands", "ten-thousands", "hundred-thousands", "millions"]


def _num(rng: random.Random, lo_digits: int, hi_digits: int) -> int:
    d = rng.randint(lo_digits, hi_digits)
    return rng.randint(10 ** (d - 1), 10**d - 1)


def _addition(rng: random.Random) -> str:
    a, b = _num(rng, 2, 6), _num(rng, 2, 6)
    lines, carry = [f"Problem: Compute {a} + {b}.", "Add column by column from the right, carrying tens:"], 0
    da, db = str(a)[::-1], str(b)[::-1]
    for i in range(max(len(da), len(db))):
        x, y = int(da[i]) if i < len(da) else 0, int(db[i]) if i < len(db) else 0
        s = x + y + carry
        plus = f" + {carry}" if carry else ""
        lines.append(f"{_PLACES[i]}: {x} + {y}{plus} = {s}, write {s % 10}, carry {s // 10}")
        carry = s // 10
    if carry:
        lines.append(f"the last carry {carry} goes in front")
    return "\n".join(lines + [f"Answer: {a + b}"])


def _subtraction(rng: random.Random) -> str:
    a, b = _num(rng, 2, 6), _num(rng, 2, 6)
    big, small = max(a, b), min(a, b)
    lines = [f"Problem: Compute {a} - {b}."]
    if a < b:
        lines.append(f"{b} is larger than {a}, so compute {b} - {a} and make it negative.")
    lines.append("Subtract column by column from the right, borrowing when needed:")
    da, db, borrow = str(big)[::-1], str(small)[::-1], 0
    for i in range(len(da)):
        x, y = int(da[i]), int(db[i]) if i < len(db) else 0
        minus = f" - {borrow}" if borrow else ""
        if x - borrow < y:
            lines.append(f"{_PLACES[i]}: {x}{minus} is less than {y}, borrow: {x + 10}{minus} - {y} = {x + 10 - borrow - y}")
            borrow = 1
        else:
            lines.append(f"{_PLACES[i]}: {x}{minus} - {y} = {x - borrow - y}")
            borrow = 0
    return "\n".join(lines + [f"Answer: {a - b}"])


def _multiplication(rng: random.Random) -> str:
    a, b = _num(rng, 2, 4), _num(rng, 1, 3)
    parts = [(int(c) * 10**i) for i, c in enumerate(str(b)[::-1]) if c != "0"]
    lines = [f"Problem: Compute {a} * {b}.", f"Split {b} by place value: {' + '.join(map(str, parts))}."]
    lines += [f"{a} * {p} = {a * p}" for p in parts]
    if len(parts) > 1:
        lines.append(f"Add the partial products: {' + '.join(str(a * p) for p in parts)} = {a * b}")
    return "\n".join(lines + [f"Answer: {a * b}"])


def _division(rng: random.Random) -> str:
    a, d = _num(rng, 3, 5), rng.randint(2, 19)
    lines, r = [f"Problem: Divide {a} by {d} with remainder.", "Long division, one digit at a time:"], 0
    for c in str(a):
        cur = r * 10 + int(c)
        q = cur // d
        r = cur - q * d
        lines.append(f"bring down {c}: {cur} / {d} = {q}, {q} * {d} = {q * d}, remainder {r}")
    lines.append(f"Check: {d} * {a // d} + {a % d} = {a}")
    return "\n".join(lines + [f"Answer: {a // d} remainder {a % d}"])


def _term(a: int, v: str) -> str:
    return v if a == 1 else "-" + v if a == -1 else f"{a}{v}"


def _signed(s: str, b: int) -> str:
    return s if b == 0 else f"{s} + {b}" if b > 0 else f"{s} - {-b}"


def _linear(rng: random.Random) -> str:
    v = rng.choice("xyntkm")
    x = rng.randint(-30, 30)
    a = rng.choice([i for i in range(-12, 13) if i != 0])
    b = rng.randint(-60, 60)
    if rng.random() < 0.5:  # a*v + b = c
        c = a * x + b
        lines = [f"Problem: Solve for {v}: {_signed(_term(a, v), b)} = {c}."]
    else:  # a*v + b = e*v + f, with a != e
        e = rng.choice([i for i in range(-12, 13) if i not in (0, a)])
        f = a * x + b - e * x  # so that x solves it
        lines = [f"Problem: Solve for {v}: {_signed(_term(a, v), b)} = {_signed(_term(e, v), f)}."]
        verb = f"Subtract {_term(e, v)} from" if e > 0 else f"Add {_term(-e, v)} to"
        a, c = a - e, f
        lines.append(f"{verb} both sides: {_signed(_term(a, v), b)} = {c}")
    if b:
        verb = f"Subtract {b} from" if b > 0 else f"Add {-b} to"
        lines.append(f"{verb} both sides: {_term(a, v)} = {c} - {b} = {c - b}" if b > 0
                     else f"{verb} both sides: {_term(a, v)} = {c} + {-b} = {c - b}")
    if a != 1:
        lines.append(f"Divide both sides by {a}: {v} = {c - b} / {a} = {x}")
    return "\n".join(lines + [f"Answer: {v} = {x}"])


def _euclid(a: int, b: int, lines: list[str]) -> int:
    a, b = max(a, b), min(a, b)
    while b:
        lines.append(f"{a} = {a // b} * {b} + {a % b}")
        a, b = b, a % b
    return a


def _frac(f: Fraction) -> str:
    return str(f.numerator) if f.denominator == 1 else f"{f.numerator}/{f.denominator}"


def _simplify(rng: random.Random) -> str:
    g = rng.randint(1, 30)
    n, d = rng.randint(1, 40) * g, rng.randint(2, 40) * g
    lines = [f"Problem: Simplify the fraction {n}/{d}.", f"Find gcd({n}, {d}) with Euclid's algorithm:"]
    g = _euclid(n, d, lines)
    lines.append(f"gcd = {g}")
    if g == 1:
        lines.append(f"{n}/{d} is already in lowest terms.")
    else:
        lines.append(f"{n} / {g} = {n // g} and {d} / {g} = {d // g}")
    return "\n".join(lines + [f"Answer: {_frac(Fraction(n, d))}"])


def _fraction_sum(rng: random.Random) -> str:
    a, b, c, d = rng.randint(1, 12), rng.randint(2, 12), rng.randint(1, 12), rng.randint(2, 12)
    op = rng.choice("+-")
    lcd = b * d // math.gcd(b, d)
    na, nc = a * lcd // b, c * lcd // d
    top = na + nc if op == "+" else na - nc
    lines = [f"Problem: Compute {a}/{b} {op} {c}/{d}.",
             f"The least common denominator of {b} and {d} is {lcd}.",
             f"{a}/{b} = {na}/{lcd} and {c}/{d} = {nc}/{lcd}",
             f"{na}/{lcd} {op} {nc}/{lcd} = {top}/{lcd}"]
    res = Fraction(top, lcd)
    g = math.gcd(top, lcd)
    if g > 1:
        lines.append(f"Divide top and bottom by gcd {g}: {top}/{lcd} = {_frac(res)}")
    return "\n".join(lines + [f"Answer: {_frac(res)}"])


def _order_of_operations(rng: random.Random) -> str:
    a, b, c, d = (rng.randint(1, 20) for _ in range(4))
    form = rng.randrange(4)
    if form == 0:
        expr = f"{a} + {b} * {c}"
        steps = [f"Multiply first: {b} * {c} = {b * c}", f"Then add: {a} + {b * c} = {a + b * c}"]
    elif form == 1:
        expr = f"({a} + {b}) * {c}"
        steps = [f"Parentheses first: {a} + {b} = {a + b}", f"Then multiply: {a + b} * {c} = {(a + b) * c}"]
    elif form == 2:
        expr = f"{a} * {b} - {c} * {d}"
        steps = [f"Multiplications first: {a} * {b} = {a * b} and {c} * {d} = {c * d}",
                 f"Then subtract: {a * b} - {c * d} = {a * b - c * d}"]
    else:
        expr = f"({a} - {b}) * ({c} + {d})"
        steps = [f"Parentheses first: {a} - {b} = {a - b} and {c} + {d} = {c + d}",
                 f"Then multiply: {a - b} * {c + d} = {(a - b) * (c + d)}"]
    return "\n".join([f"Problem: Evaluate {expr}."] + steps + [f"Answer: {eval(expr)}"])  # noqa: S307 -- our digits


_MATH_KINDS = (_addition, _subtraction, _multiplication, _division, _linear, _simplify, _fraction_sum, _order_of_operations)


def _math_stream(seed: int) -> Iterable[str]:
    rng = random.Random(seed)
    while True:
        yield rng.choice(_MATH_KINDS)(rng)


def generate_math_problems(n: int, seed: int = 1234) -> list[str]:
    """n worked arithmetic/algebra problems (deterministic for a seed); each ends 'Answer: ...'."""
    stream = _math_stream(seed)
    return [next(stream) for _ in range(n)]
