"""Synthetic NuminaMath-like math problems with exact answers, for the CPU world.

Five families, each small enough for a tiny model to partly learn:

- ``arith``: multi-step integer arithmetic (answers may be negative);
- ``linear``: one linear equation in ``x`` (integer, possibly negative answers);
- ``fraction``: sum or difference of two fractions (answers like ``\\frac{3}{4}``);
- ``percent``: a percentage of a number (integer or decimal answers like ``4.5``);
- ``system``: a 2x2 linear system (tuple answers like ``(4, 3)``).

Every problem renders its solution in three styles, all correct and all ending in ``\\boxed{}``:

- ``native``: verbose natural language, one step per line ("First, we ...", "Then, ...",
  "Therefore, ..."), the style the tiny students are trained on;
- ``compact``: dense symbolic LaTeX (``\\(3x+5=20 \\Rightarrow x=5\\)``), the oracle's
  "syntactic compaction";
- ``reference``: a textbook paragraph with ``$...$`` math, used as the rows' ``solution`` field
  (the stand-in for NuminaMath's own chain of thought).

``latex_results`` rewrites a native solution's step results as inline LaTeX (``to get
\\(2x=10\\)``): the mixed prose-and-LaTeX text of real math writing, which the students read as a
minority of their chat answers and the rule oracle's refinement writes.

``solve_problem_text`` recovers a problem's family and numbers from its text alone, so the rule
oracle can answer any request that quotes a synthetic problem.
"""

from __future__ import annotations

import math
import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from fractions import Fraction
from typing import Literal

Style = Literal["native", "compact", "reference"]
STYLES: tuple[Style, ...] = ("native", "compact", "reference")
FAMILIES: tuple[str, ...] = ("arith", "linear", "fraction", "percent", "system")


@dataclass(frozen=True)
class SolvedProblem:
    """A synthetic problem with its exact answer and its solution in every style."""

    family: str
    problem: str
    answer: str
    native: str
    compact: str
    reference: str

    def render(self, style: Style) -> str:
        """The solution written in ``style``."""
        return {"native": self.native, "compact": self.compact, "reference": self.reference}[style]

    def to_row(self, style: Style = "reference") -> dict:
        """A NuminaMath-CoT-shaped row (source, problem, solution, messages) plus ``answer``."""
        solution = self.render(style)
        return {
            "source": f"synthetic_{self.family}",
            "problem": self.problem,
            "solution": solution,
            "messages": [
                {"role": "user", "content": self.problem},
                {"role": "assistant", "content": solution},
            ],
            "answer": self.answer,
        }


# ---------------------------------------------------------------- number formatting


def _signed(n: int) -> str:
    """``+ 5`` or ``- 5``: a term as it follows another one in an expression."""
    return f"+ {n}" if n >= 0 else f"- {-n}"


def _frac_latex(q: Fraction) -> str:
    """Exact LaTeX of a rational: ``3``, ``-\\frac{1}{2}``."""
    if q.denominator == 1:
        return str(q.numerator)
    sign = "-" if q < 0 else ""
    return f"{sign}\\frac{{{abs(q.numerator)}}}{{{q.denominator}}}"


def _decimal(q: Fraction) -> str:
    """A terminating rational as a plain decimal without trailing zeros: ``4.5``, ``12``."""
    if q.denominator == 1:
        return str(q.numerator)
    places = 0
    while (q * 10**places).denominator != 1:
        places += 1
    text = f"{float(q):.{places}f}"
    return text.rstrip("0").rstrip(".")


def _coef(a: int) -> str:
    """A coefficient in front of a variable: ``x`` for 1, ``3x`` otherwise."""
    return "" if a == 1 else str(a)


def _finish(native: list[str], compact: list[str], reference: str, answer: str) -> tuple:
    native_text = "\n".join([*native, f"Therefore, the answer is \\boxed{{{answer}}}."])
    compact_text = "\n".join([*compact, f"\\(\\therefore \\boxed{{{answer}}}\\)"])
    reference_text = f"{reference} The answer is $\\boxed{{{answer}}}$."
    return native_text, compact_text, reference_text


# A step's result at the end of its line: "... to get 2x = 10." or "So x = 5."
_RESULT_RE = re.compile(r"^(?P<head>.*?\b(?:to get|So)) (?P<math>[^a-wz].*?)\.$")


def latex_result(step: str) -> str:
    """``... to get 2x = 10.`` -> ``... to get \\(2x=10\\).`` (other lines unchanged)."""
    m = _RESULT_RE.match(step)
    if m is None or "\\(" in step:
        return step
    parts = [f"\\({part.replace(' ', '')}\\)" for part in m["math"].split(" and ")]
    return f"{m['head']} {' and '.join(parts)}."


def latex_results(solution: str) -> str:
    """``solution`` with each step's result written as inline LaTeX (``latex_result``)."""
    return "\n".join(latex_result(line) for line in solution.splitlines())


# ---------------------------------------------------------------- arith


_ARITH_VERBS = ("Compute", "Evaluate")
_ARITH_FORMS = ("{a} + {b} \\times {c} - {d}", "({a} + {b}) \\times {c}", "{a} \\times {b} - {c}")


def _arith(form: int, verb: int, a: int, b: int, c: int, d: int = 0) -> SolvedProblem:
    expr = _ARITH_FORMS[form].format(a=a, b=b, c=c, d=d)
    problem = f"{_ARITH_VERBS[verb]} ${expr}$."
    if form == 0:
        bc, s = b * c, a + b * c
        r = s - d
        native = [
            f"First, we multiply {b} by {c} to get {bc}.",
            f"Then, we add {a} and {bc} to get {s}.",
            f"Then, we subtract {d} from {s} to get {r}.",
        ]
        compact = [f"\\({b}\\times{c}={bc}\\), \\({a}+{bc}={s}\\), \\({s}-{d}={r}\\)"]
        ref = f"Multiplication comes first: ${b} \\times {c} = {bc}$, so ${expr} = {a} + {bc} - {d} = {r}$."
    elif form == 1:
        s = a + b
        r = s * c
        native = [
            f"First, we add {a} and {b} inside the parentheses to get {s}.",
            f"Then, we multiply {s} by {c} to get {r}.",
        ]
        compact = [f"\\(({a}+{b})\\times{c}={s}\\times{c}={r}\\)"]
        ref = f"The parentheses give ${a} + {b} = {s}$, so ${expr} = {s} \\times {c} = {r}$."
    else:
        ab = a * b
        r = ab - c
        native = [
            f"First, we multiply {a} by {b} to get {ab}.",
            f"Then, we subtract {c} from {ab} to get {r}.",
        ]
        compact = [f"\\({a}\\times{b}={ab}\\), \\({ab}-{c}={r}\\)"]
        ref = f"We have ${a} \\times {b} = {ab}$, so ${expr} = {ab} - {c} = {r}$."
    return SolvedProblem("arith", problem, str(r), *_finish(native, compact, ref, str(r)))


def _sample_arith(rng: random.Random) -> SolvedProblem:
    form = rng.randrange(3)
    return _arith(
        form, rng.randrange(2), rng.randint(1, 9), rng.randint(2, 5), rng.randint(2, 5),
        rng.randint(1, 9) if form == 0 else 0,
    )  # fmt: skip


_ARITH_RE = re.compile(
    r"(Compute|Evaluate) \$\s*(?:"
    r"(?P<a0>\d+) \+ (?P<b0>\d+) \\times (?P<c0>\d+) - (?P<d0>\d+)"
    r"|\((?P<a1>\d+) \+ (?P<b1>\d+)\) \\times (?P<c1>\d+)"
    r"|(?P<a2>\d+) \\times (?P<b2>\d+) - (?P<c2>\d+))\s*\$\."
)


def _parse_arith(m: re.Match) -> SolvedProblem:
    verb = _ARITH_VERBS.index(m.group(1))
    for form in range(3):
        if m.group(f"a{form}") is not None:
            nums = [int(m.group(f"{k}{form}")) for k in "abc"]
            d = int(m.group("d0")) if form == 0 else 0
            return _arith(form, verb, *nums, d)
    raise AssertionError("unreachable: the regex matched no form")


# ---------------------------------------------------------------- linear


def _linear(a: int, b: int, c: int) -> SolvedProblem:
    problem = f"Solve for $x$: ${a}x {_signed(b)} = {c}$."
    rhs = c - b
    x = rhs // a
    move = f"subtract {b} from" if b >= 0 else f"add {-b} to"
    native = [
        f"First, we {move} both sides to get {a}x = {rhs}.",
        f"Then, we divide both sides by {a} to get x = {x}.",
    ]
    compact = [
        f"\\({a}x{_signed(b).replace(' ', '')}={c} \\Rightarrow {a}x={rhs} \\Rightarrow x={x}\\)"
    ]
    ref = f"Moving the constant term gives ${a}x = {rhs}$, and dividing by ${a}$ gives $x = {x}$."
    return SolvedProblem("linear", problem, str(x), *_finish(native, compact, ref, str(x)))


def _sample_linear(rng: random.Random) -> SolvedProblem:
    a, x, b = rng.randint(2, 5), rng.randint(-5, 9), rng.choice([*range(-9, 0), *range(1, 10)])
    return _linear(a, b, a * x + b)


_LINEAR_RE = re.compile(r"Solve for \$x\$: \$\s*(\d+)x ([+-]) (\d+) = (-?\d+)\s*\$\.")


def _parse_linear(m: re.Match) -> SolvedProblem | None:
    a, sign, b, c = int(m.group(1)), m.group(2), int(m.group(3)), int(m.group(4))
    b = b if sign == "+" else -b
    if a == 0 or (c - b) % a:
        return None  # not a problem this generator writes: no integer solution
    return _linear(a, b, c)


# ---------------------------------------------------------------- fraction


def _fraction(a: int, b: int, op: str, c: int, d: int) -> SolvedProblem:
    expr = f"\\frac{{{a}}}{{{b}}} {op} \\frac{{{c}}}{{{d}}}"
    problem = f"Compute ${expr}$. Give your answer as a fraction in lowest terms."
    lcd = b * d // math.gcd(b, d)
    n1, n2 = a * (lcd // b), c * (lcd // d)
    n = n1 + n2 if op == "+" else n1 - n2
    result = Fraction(n, lcd)
    ans = _frac_latex(result)
    verb = "add" if op == "+" else "subtract"
    native = [
        f"First, we find the common denominator of {b} and {d}, which is {lcd}.",
        f"So \\frac{{{a}}}{{{b}}} = \\frac{{{n1}}}{{{lcd}}} and \\frac{{{c}}}{{{d}}} = \\frac{{{n2}}}{{{lcd}}}.",
        f"Then, we {verb} the numerators to get \\frac{{{n}}}{{{lcd}}}.",
        f"Then, we simplify \\frac{{{n}}}{{{lcd}}} to {ans}."
        if (n, lcd) != (result.numerator, result.denominator)
        else f"So the fraction \\frac{{{n}}}{{{lcd}}} is already in lowest terms.",
    ]
    compact = [
        f"\\({expr.replace(' ', '')}=\\frac{{{n1}{op}{n2}}}{{{lcd}}}=\\frac{{{n}}}{{{lcd}}}={ans}\\)"
    ]
    ref = f"Over the common denominator ${lcd}$ we get ${expr} = \\frac{{{n1} {op} {n2}}}{{{lcd}}} = {ans}$."
    return SolvedProblem("fraction", problem, ans, *_finish(native, compact, ref, ans))


def _sample_fraction(rng: random.Random) -> SolvedProblem:
    # One denominator divides the other (4 and 8, 3 and 3): the common denominator is the
    # larger one, so a tiny model needs few multiplication facts.
    b = rng.randint(2, 6)
    b, d = rng.choice([(b, b), (b, 2 * b), (2 * b, b)])
    return _fraction(rng.randint(1, 5), b, rng.choice("+-"), rng.randint(1, 5), d)


_FRACTION_RE = re.compile(
    r"Compute \$\s*\\frac\{(\d+)\}\{(\d+)\} ([+-]) \\frac\{(\d+)\}\{(\d+)\}\s*\$\. "
    r"Give your answer as a fraction in lowest terms\."
)


def _parse_fraction(m: re.Match) -> SolvedProblem | None:
    a, b, op, c, d = int(m.group(1)), int(m.group(2)), m.group(3), int(m.group(4)), int(m.group(5))
    return _fraction(a, b, op, c, d) if b and d else None


# ---------------------------------------------------------------- percent


_PERCENTS = (10, 20, 50)


def _percent(p: int, n: int) -> SolvedProblem:
    problem = f"What is ${p}\\%$ of ${n}$?"
    rate = _decimal(Fraction(p, 100))
    ans = _decimal(Fraction(p * n, 100))
    native = [
        f"First, we write {p}\\% as the decimal {rate}.",
        f"Then, we multiply {rate} by {n} to get {ans}.",
    ]
    compact = [f"\\({p}\\%\\times{n}=\\frac{{{p}\\cdot{n}}}{{100}}={ans}\\)"]
    ref = f"Since ${p}\\% = {rate}$, we compute ${rate} \\times {n} = {ans}$."
    return SolvedProblem("percent", problem, ans, *_finish(native, compact, ref, ans))


def _sample_percent(rng: random.Random) -> SolvedProblem:
    return _percent(rng.choice(_PERCENTS), rng.randint(2, 200))


_PERCENT_RE = re.compile(r"What is \$\s*(\d+)\\%\s*\$ of \$\s*(\d+)\s*\$\?")


def _parse_percent(m: re.Match) -> SolvedProblem:
    return _percent(int(m.group(1)), int(m.group(2)))


# ---------------------------------------------------------------- system


def _system(a: int, c1: int, c2: int) -> SolvedProblem:
    problem = (
        f"Solve the system of equations ${_coef(a)}x + y = {c1}$ and $x - y = {c2}$. "
        "Give your answer as an ordered pair $(x, y)$."
    )
    x = (c1 + c2) // (a + 1)
    y = x - c2
    ans = f"({x}, {y})"
    native = [
        f"First, we add the two equations to get {a + 1}x = {c1 + c2}.",
        f"So x = {x}.",
        f"Then, we substitute x = {x} into the second equation to get y = {x} - {c2}"
        f" = {y}." if c2 >= 0 else
        f"Then, we substitute x = {x} into the second equation to get y = {x} + {-c2} = {y}.",
    ]  # fmt: skip
    compact = [f"\\({a + 1}x={c1 + c2} \\Rightarrow x={x}\\), \\(y=x-({c2})={y}\\)"]
    ref = f"Adding the equations gives ${a + 1}x = {c1 + c2}$, so $x = {x}$ and $y = x - ({c2}) = {y}$."
    return SolvedProblem("system", problem, ans, *_finish(native, compact, ref, ans))


def _sample_system(rng: random.Random) -> SolvedProblem:
    a, x, y = rng.randint(1, 2), rng.randint(-5, 9), rng.randint(-5, 9)
    return _system(a, a * x + y, x - y)


_SYSTEM_RE = re.compile(
    r"Solve the system of equations \$\s*(\d*)x \+ y = (-?\d+)\s*\$ and "
    r"\$\s*x - y = (-?\d+)\s*\$\."
)


def _parse_system(m: re.Match) -> SolvedProblem | None:
    a, c1, c2 = int(m.group(1) or 1), int(m.group(2)), int(m.group(3))
    return _system(a, c1, c2) if a >= 1 and (c1 + c2) % (a + 1) == 0 else None


# ---------------------------------------------------------------- public API

_SAMPLERS: dict[str, Callable[[random.Random], SolvedProblem]] = {
    "arith": _sample_arith,
    "linear": _sample_linear,
    "fraction": _sample_fraction,
    "percent": _sample_percent,
    "system": _sample_system,
}
_PARSERS: tuple[tuple[re.Pattern, Callable[[re.Match], SolvedProblem | None]], ...] = (
    (_ARITH_RE, _parse_arith),
    (_LINEAR_RE, _parse_linear),
    (_FRACTION_RE, _parse_fraction),
    (_PERCENT_RE, _parse_percent),
    (_SYSTEM_RE, _parse_system),
)


def sample_problems(
    num_problems: int, seed: int, families: Sequence[str] = FAMILIES
) -> list[SolvedProblem]:
    """``num_problems`` seeded problems, families drawn uniformly (repeats are possible)."""
    unknown = set(families) - set(FAMILIES)
    if unknown:
        raise ValueError(f"unknown problem families {sorted(unknown)}; known: {FAMILIES}")
    rng = random.Random(seed)
    return [_SAMPLERS[rng.choice(list(families))](rng) for _ in range(num_problems)]


def generate_problems(
    num_problems: int,
    seed: int = 0,
    families: Sequence[str] = FAMILIES,
    solution_style: Style = "reference",
    unique: bool = True,
) -> list[dict]:
    """NuminaMath-CoT-shaped rows: source, problem, solution, messages, answer.

    With ``unique`` every problem text appears once (drawing more until there are enough).
    """
    if not unique:
        return [p.to_row(solution_style) for p in sample_problems(num_problems, seed, families)]
    rows: dict[str, dict] = {}
    batch_seed = seed
    while len(rows) < num_problems:
        for p in sample_problems(num_problems, batch_seed, families):
            rows.setdefault(p.problem, p.to_row(solution_style))
        batch_seed += 1_000_003  # a far-away seed: a fresh, still reproducible stream
        if batch_seed - seed > 50 * 1_000_003:
            raise ValueError(f"cannot draw {num_problems} distinct problems from {families}")
    return list(rows.values())[:num_problems]


def solve_problem_text(text: str) -> SolvedProblem | None:
    """The first synthetic problem quoted anywhere in ``text``, solved; ``None`` if there is none.

    Recognises the problem from its wording and numbers alone, so it works on the problem
    itself or on a longer prompt that quotes it (the earliest match in the text wins).
    """
    best: tuple[int, SolvedProblem] | None = None
    for pattern, parse in _PARSERS:
        for m in pattern.finditer(text):
            if best is not None and m.start() >= best[0]:
                break
            solved = parse(m)
            if solved is not None:
                best = (m.start(), solved)
                break
    return best[1] if best else None
