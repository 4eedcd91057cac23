"""The answer checker: final-answer extraction and math-verify verification, without eval.

Every stage that grades a response (rejection sampling, evaluation, `qup grade`) goes through
this module, so "correct" means the same thing everywhere:

1. `extract_answer` takes the final answer out of a response: the last `\\boxed{...}` /
   `\\fbox{...}` (or `\\boxed 5`) with the boxes that only commas or "and"/"or" separate
   from it (`answer_parts`), by default; in lenient mode it falls back to "the answer is X",
   then to the last number, and says which rule fired (`Extraction.mode`).
2. `screen_answer` refuses answers that are too long (over `MAX_ANSWER_CHARS`), too deeply
   nested (over `MAX_NESTING_DEPTH` brackets) or look like code, before any parser sees them:
   status "parse_error", at once.
3. `Gold.parse` parses a gold answer once (reuse it for the 8 or 16 samples of a problem), and
   `compare` verifies an extracted answer against it: `quick_verdict` settles plain numbers and
   identical text exactly, explicit rules settle systems, `\\neq`, and decimals that round an
   exact value, everything else goes to math-verify's LaTeX parser and `verify`.

`check` chains them in this process and is *not* bounded in time: a model can write an answer
whose comparison never ends (`9^{9^{9^{9}}}`). Grade untrusted text with
`qup_ray.grading.BoundedChecker` / `grade_pairs`, which run these functions in child processes
with a deadline.

No text from a model is ever executed. In math-verify, model text can reach Python `eval`
(sympy's `parse_expr`) in two ways: its plain-expression extractor (`ExprExtractionConfig`),
which this module never uses, and `sympy.Number(token)` on the digits of a LaTeX NUMBER token
(`Integer (12 )`). Library code also sympifies its own constant strings ("E", "x"). While a check
runs, `eval_guard` lets sympy's `eval_expr` evaluate only such literals (see `is_safe_code`)
and refuses anything else; a refusal makes the verdict "parse_error", since libraries may
swallow the exception. `screen_answer` also refuses code-like answers (`__`, `lambda`,
`import`, `exec`, ...) before parsing, and grading workers refuse process creation and file
writes (`qup_ray.grading`).
"""

from __future__ import annotations

import contextlib
import logging
import re
import threading
import types
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from fractions import Fraction
from functools import lru_cache
from typing import Any

import math_verify.grader
import math_verify.parser
import sympy.parsing.sympy_parser as sympy_parser
import sympy.physics.units  # noqa: F401  (see the eval guard)
from math_verify import LatexExtractionConfig, parse, verify

logger = logging.getLogger(__name__)

STATUSES = ("ok", "no_answer", "parse_error", "timeout")
EXTRACT_MODES = ("boxed", "lenient_phrase", "lenient_last_number")

# Longer answers and deeper bracket nesting are refused before parsing (status "parse_error"):
# no real final answer comes near them, and the ANTLR LaTeX parser is slow or recursive on them.
MAX_ANSWER_CHARS = 1000
MAX_NESTING_DEPTH = 40

# We bound time ourselves (qup_ray.grading): math-verify's signal-based timeouts only work in a
# main thread and turn a timeout into a silent "wrong", so they are off and their warning is moot.
math_verify.parser.TIMEOUT_WARNING_SHOWN = True
math_verify.grader.TIMEOUT_WARNING_SHOWN = True

_LATEX_ONLY = (LatexExtractionConfig(),)


@dataclass(frozen=True)
class GradeResult:
    """The verdict on one response.

    `correct` is True/False only when `status == "ok"`; otherwise the answer could not be
    verified (no answer, unparseable, timed out) and `correct` is None, never a silent False.
    `extract_mode` says which extraction rule found `extracted` (None when nothing was found).
    """

    extracted: str | None
    correct: bool | None
    status: str
    extract_mode: str | None

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise ValueError(f"status must be one of {STATUSES}, got {self.status!r}")
        if (self.correct is None) != (self.status != "ok"):
            raise ValueError(f"correct={self.correct!r} contradicts status={self.status!r}")

    def as_row(self) -> dict[str, Any]:
        """The fields added to an output row."""
        return asdict(self)


@dataclass(frozen=True)
class Extraction:
    """A final answer taken out of a response, and the rule that found it (None: nothing)."""

    text: str | None
    mode: str | None


# --- extraction -------------------------------------------------------------------------------

_BOX_RE = re.compile(r"\\(?:boxed|fbox)(?![A-Za-z])")
_PHRASE_RE = re.compile(r"(?:final answer|answer)\s*(?:is|:|=)\s*:?\s*", re.IGNORECASE)
# \{ and \} (any backslash pair) are literal characters, not grouping braces.
_BRACE_TOKEN_RE = re.compile(r"\\.|[{}]", re.DOTALL)
_NUMBER_RE = re.compile(r"(?<![\w.])-?\d+(?:\.\d+)?(?:/\d+)?")
_BOX_TOKEN_RE = re.compile(r"[^\s$]+")


def _closing_brace(text: str, open_at: int, stop: int) -> int | None:
    depth = 0
    for token in _BRACE_TOKEN_RE.finditer(text, open_at, stop):
        brace = token.group(0)
        if brace == "{":
            depth += 1
        elif brace == "}":
            depth -= 1
            if depth == 0:
                return token.start()
    return None


def _box_at(text: str, command_end: int, stop: int) -> tuple[str, int] | None:
    """(content, end) of the box whose command ends at `command_end`, read no further than
    `stop`; None when it is unbalanced there, or `\\boxed` is glued to something else."""
    at = command_end
    while at < stop and text[at] in " \t":
        at += 1
    if at < stop and text[at] == "{":
        close = _closing_brace(text, at, stop)
        return None if close is None else (text[at + 1 : close], close + 1)
    if at == command_end or at >= stop:
        return None  # "\boxed" glued to something else, or at the very end
    # `\boxed 5`: TeX takes one token; models mean the word that follows.
    token = _BOX_TOKEN_RE.match(text, at, stop)
    return (token.group(0).rstrip(".,;"), token.end()) if token else None


def last_boxed(text: str) -> str | None:
    """Content of the last `\\boxed{...}` / `\\fbox{...}` / `\\boxed X` in `text`.

    None when there is none or when the last one is unbalanced (a truncated generation has no
    final answer, even if an earlier box had one).
    """
    matches = list(_BOX_RE.finditer(text))
    if not matches:
        return None
    box = _box_at(text, matches[-1].end(), len(text))
    return None if box is None else box[0]


def _phrase_answer(text: str) -> str | None:
    """X in the last "the answer is X" / "Answer: X", cut at the end of its sentence."""
    matches = list(_PHRASE_RE.finditer(text))
    if not matches:
        return None
    rest = text[matches[-1].end() :].strip()
    for opener, closer in (("$$", "$$"), ("$", "$"), ("\\(", "\\)"), ("\\[", "\\]")):
        if rest.startswith(opener):
            close = rest.find(closer, len(opener))
            return rest[len(opener) : close].strip() if close > 0 else None
    sentence = re.split(r"\n|\.(?=\s|$)", rest, maxsplit=1)[0]
    return sentence.strip().strip("*").strip() or None


MAX_ANSWER_PARTS = 16
# What may stand between two boxes of one answer ("\\boxed{1}, \\boxed{2}", "$\\boxed{1}$ and
# $\\boxed{-2}$"): math delimiters, spacing, commas, "and"/"or". Any other word ("but on
# reflection", "finally") means the earlier box was a step of the work, not part of the answer.
_GAP_RE = re.compile(
    r"(?:\s|\$|\\[()\[\]]|[,;&]|\\\\|\\q?quad(?![A-Za-z])|\\[,;:! ]|\b(?:and|or)\b"
    r"|\\(?:text|mathrm|textrm)\{\s*(?:and|or|,)?\s*\})*"
)
# "x = ", "x_1 = ", "\\alpha = " right before a box: the variable the boxed value is given for.
_LABEL_RE = re.compile(
    r"(?<=[\s$(\[,;])(?P<label>(?:[A-Za-z]|\\[A-Za-z]+)(?:_\{?[A-Za-z0-9]+\}?)?)\s*=\s*\$?\s*$"
)
_LABEL_LOOKBACK_CHARS = 40


def _label_before(text: str, at: int) -> re.Match[str] | None:
    start = max(0, at - _LABEL_LOOKBACK_CHARS)
    window = text[start:at] if start else " " + text[:at]
    return _LABEL_RE.search(window)


def answer_parts(text: str) -> list[str]:
    """The boxed parts of the final answer of a solution or response, in order.

    The final answer is the last box together with the boxes right before it that only
    delimiters, commas, semicolons, "and" or "or" separate from it (`\\boxed{(2,1)},
    \\boxed{(1,2)}`; "the roots are $\\boxed{1}$ and $\\boxed{-2}$"): at most
    `MAX_ANSWER_PARTS` boxes. A box after other words ("\\boxed{3}, but then \\boxed{5}") is
    the answer alone. When every part is given for a different variable (`$x = \\boxed{1}$,
    $y = \\boxed{2}$`) the part keeps its variable (`x = 1`); repeated parts count once.
    Empty when there is no box, or when the last one is unbalanced or empty.
    """
    matches = list(_BOX_RE.finditer(text))
    if not matches:
        return []
    last = _box_at(text, matches[-1].end(), len(text))
    if last is None or not last[0].strip():
        return []
    group = [(matches[-1].start(), last[0].strip())]
    for match in reversed(matches[:-1]):
        start = group[-1][0]
        if len(group) >= MAX_ANSWER_PARTS or start - match.end() > 2 * MAX_ANSWER_CHARS:
            break  # the bound keeps extraction linear on pathological text
        box = _box_at(text, match.end(), start)
        if box is None or not box[0].strip():
            break
        label = _label_before(text, start)
        gap_end = start if label is None else max(box[1], start - len(label.group(0)))
        if not _GAP_RE.fullmatch(text, box[1], gap_end):
            break
        group.append((match.start(), box[0].strip()))
    group.reverse()
    labels = [_label_before(text, start) for start, _ in group]
    names = [label["label"] if label else None for label in labels]
    keep_labels = len(group) > 1 and None not in names and len(set(names)) == len(names)
    parts: list[str] = []
    for name, (_, content) in zip(names, group, strict=True):
        part = f"{name} = {content}" if keep_labels and "=" not in content else content
        if part not in parts:
            parts.append(part)
    return parts


def extract_answer(response: str, *, lenient: bool = False) -> Extraction:
    """The final answer of a response: its boxed parts (`answer_parts`, joined with ", ");
    lenient mode adds "the answer is X" and then the last number."""
    parts = answer_parts(response)
    if parts:
        return Extraction(", ".join(parts), "boxed")
    if lenient:
        phrase = _phrase_answer(response)
        if phrase:
            return Extraction(phrase, "lenient_phrase")
        numbers = _NUMBER_RE.findall(response)
        if numbers:
            return Extraction(numbers[-1], "lenient_last_number")
    return Extraction(None, None)


def gold_from_solution(solution: str) -> str | None:
    """The gold answer of a NuminaMath solution: its final boxed parts (`answer_parts`) joined
    with ", " (the last `\\boxed{}` when it has one), None if it has none."""
    return ", ".join(answer_parts(solution)) or None


# --- screening and normalisation --------------------------------------------------------------

_CODE_RE = re.compile(
    r"__|\b(?:lambda|import|exec|eval|getattr|setattr|globals|locals|compile|subprocess"
    r"|builtins)\b|\bos\s*\.|\bopen\s*\(|`"
)


def _nesting_depth(text: str) -> int:
    depth = deepest = 0
    for ch in text:
        if ch in "([{":
            depth += 1
            deepest = max(deepest, depth)
        elif ch in ")]}":
            depth = max(depth - 1, 0)
    return deepest


def screen_answer(answer: str) -> str | None:
    """Why `answer` is refused before parsing (too long, too nested, code-like), else None."""
    if len(answer) > MAX_ANSWER_CHARS:
        return f"answer longer than {MAX_ANSWER_CHARS} characters"
    if _nesting_depth(answer) > MAX_NESTING_DEPTH:
        return f"answer nested deeper than {MAX_NESTING_DEPTH} brackets"
    if _CODE_RE.search(answer):
        return "answer looks like code"
    return None


_DELIMITERS = (("$$", "$$"), ("$", "$"), ("\\(", "\\)"), ("\\[", "\\]"))
_CHOICE_OPEN = r"\s*(?:\\text(?:bf)?\{|\\math(?:rm|bf)\{)?\s*\(?([A-E])"
_CHOICE_RE = re.compile(_CHOICE_OPEN + r"(?![A-Za-z0-9])")
_GOLD_CHOICE_RE = re.compile(_CHOICE_OPEN + r"\)?\s*\}?\s*")
_OTHER_LETTER_RE = re.compile(r"(?<![A-Za-z\\])[A-E](?![A-Za-z])")


# A number written with thousands separators other than commas (`1 000`, `14{,}916`, `1\,000`).
_THOUSANDS_RE = re.compile(
    r"(?<![\d.])\d{1,3}(?:(?:\\[,;! ]|\{,\}|~| |\u2009|\u202f)\d{3})+(?![\d])"
)
_THOUSANDS_SEP_RE = re.compile(r"\\[,;! ]|\{,\}|~| |\u2009|\u202f")
# `\text{28\%}`: a number (maybe a percentage) hidden from the parser in a text box.
_TEXT_NUMBER_RE = re.compile(r"\\(?:text|textrm|mathrm)\{\s*([-+]?\d+(?:\.\d+)?\s*\\?%?)\s*\}")
_PERCENT_SPACING_RE = re.compile(r"(?:\\[,;:! ]|~|\s)+(?=\\%)")  # `28\,\%`
_NEQ_SPELLINGS_RE = re.compile(r"!=|≠|\\not\s*=|\\ne(?![A-Za-z])")
_RELATION_RE = re.compile(r"\\(?:le|ge)(?:q(?:slant)?)?(?![A-Za-z])|<=|>=|≤|≥|<|>")
_VARIABLE_RE = re.compile(r"(?:[A-Za-z]|\\[A-Za-z]+)(?:_\{?[A-Za-z0-9]+\}?)?")


def _chain_to_interval(text: str) -> str:
    """An inequality in one variable as an interval: `-2 \\le x \\le 7` as `[-2, 7]`,
    `7 \\ge x > -2` as `(-2, 7]`, `x < 3` as `(-\\infty, 3)`. math-verify parses a chain as a
    conjunction that it never equates with the interval, and equates `x < 3` with
    `(-\\infty, 3)` only when the inequality is the gold. Anything else is returned unchanged."""
    pieces = [piece.strip() for piece in _RELATION_RE.split(text)]
    relations = _RELATION_RE.findall(text)
    if not relations or len(relations) > 2 or any(m in text for m in ",=;") or not all(pieces):
        return text
    less = [rel[0] in "<≤" or rel.startswith("\\le") for rel in relations]
    strict = [rel in "<>" for rel in relations]
    if len(relations) == 1:  # one side is the variable, the other the bound
        left_is_var, right_is_var = (bool(_VARIABLE_RE.fullmatch(p)) for p in pieces)
        if left_is_var == right_is_var:
            return text
        if left_is_var:  # `x < 3` reads as `-\infty < x < 3`
            pieces, less, strict = ["", *pieces], less * 2, [True, *strict]
        else:
            pieces, less, strict = [*pieces, ""], less * 2, [*strict, True]
        infinity = ("-\\infty", "\\infty") if less[0] else ("\\infty", "-\\infty")
        pieces = [pieces[0] or infinity[0], pieces[1], pieces[2] or infinity[1]]
    low, var, high = pieces
    if less[0] != less[1] or not _VARIABLE_RE.fullmatch(var):
        return text
    if not less[0]:
        low, high, strict = high, low, strict[::-1]
    return f"{'(' if strict[0] else '['}{low}, {high}{')' if strict[1] else ']'}"


@lru_cache(maxsize=8192)  # a check tidies the same few strings several times
def _tidy(answer: str) -> str:
    """Normalise what math-verify's LaTeX normaliser misses: thousands separators other than
    commas, √, ∅, a number in `\\text{}`, spellings of ≠, chained inequalities."""
    text = answer.strip()
    for opener, closer in _DELIMITERS:
        if text.startswith(opener) and text.endswith(closer) and len(text) > 2 * len(opener):
            text = text[len(opener) : -len(closer)].strip()
            break
    text = _THOUSANDS_RE.sub(lambda m: _THOUSANDS_SEP_RE.sub("", m.group(0)), text)
    text = re.sub(r"√\s*(\d+(?:\.\d+)?|[A-Za-z])", r"\\sqrt{\1}", text)
    text = text.replace("\\varnothing", "\\emptyset")
    text = _TEXT_NUMBER_RE.sub(r"\1", text)
    text = _PERCENT_SPACING_RE.sub("", text)
    text = _NEQ_SPELLINGS_RE.sub(r"\\neq ", text)
    return _chain_to_interval(text.rstrip(".,;").strip())


def _choice_letter(text: str) -> str | None:
    """The letter of a multiple-choice answer such as `C`, `(C)`, `\\textbf{(C)}\\ 12`."""
    match = _CHOICE_RE.match(text)
    if not match or _OTHER_LETTER_RE.search(text, match.end()):
        return None  # no letter first, or several letters ("A, B") and so not one choice
    return match.group(1)


def gold_text(answer: str | Sequence[str]) -> str:
    """One answer string from a gold answer given as a string or a list of strings.

    A list (OlympiadBench's `final_answer`) with several items means all of them are required:
    they are joined with commas and compared as a set.
    """
    items = [answer] if isinstance(answer, str) else [str(item) for item in answer]
    parts = []
    for item in items:
        boxed = answer_parts(item) if "\\boxed" in item or "\\fbox" in item else []
        parts.append(_tidy(", ".join(boxed) if boxed else item))
    return ", ".join(part for part in parts if part)


# --- the eval guard ---------------------------------------------------------------------------

# What sympify may evaluate while a check runs: number and symbol constructors called on
# literals, and sympy's constants. `sympy.Number(token)` yields `Integer (12 )` or
# `Float ('1.5' )`; library code sympifies constant names such as "E" or "x". Anything else
# (other names, attribute access, lambdas) is refused. simplify() imports sympy.physics.units
# lazily and that import sympifies unit prefixes, so it is imported above, outside any check.
_SAFE_EVAL_NAMES = frozenset(
    {"Integer", "Float", "Rational", "Symbol", "E", "I", "pi", "oo", "zoo", "nan"}
)
_original_eval_expr = sympy_parser.eval_expr
_guard_lock = threading.Lock()
_guard_depth = 0
_refusals = threading.local()  # per thread: did the guard refuse anything during this check?


class UnsafeEvalError(ValueError):
    """Raised instead of evaluating code that is not a plain sympy literal."""


def is_safe_code(code: str | types.CodeType) -> bool:
    """True when `code` only uses Integer/Float/Rational/Symbol on literals and sympy's
    constants (E, I, pi, oo, zoo, nan): no other names, no attributes, no nested functions."""
    if isinstance(code, str):
        try:
            code = compile(code, "<sympy>", "eval")
        except (SyntaxError, ValueError, RecursionError, MemoryError):
            return False
    if not isinstance(code, types.CodeType):
        return False
    if any(isinstance(const, types.CodeType) for const in code.co_consts):
        return False
    return set(code.co_names) <= _SAFE_EVAL_NAMES


def _guarded_eval_expr(code: Any, local_dict: Any, global_dict: Any) -> Any:
    if not is_safe_code(code):
        _refusals.count = getattr(_refusals, "count", 0) + 1
        logger.warning("refused to evaluate non-literal code in sympy's parser: %.80r", code)
        raise UnsafeEvalError("refused to evaluate non-literal code in sympy's parser")
    return _original_eval_expr(code, local_dict, global_dict)


def install_eval_guard() -> None:
    """Guard sympy's `eval_expr` for the rest of this process (used by grading workers)."""
    global _guard_depth
    with _guard_lock:
        _guard_depth += 1
        sympy_parser.eval_expr = _guarded_eval_expr


@contextlib.contextmanager
def eval_guard() -> Iterator[None]:
    """Guard sympy's `eval_expr` while the block runs (nests; thread-safe, and while any
    thread is inside, sympy's parser refuses non-literal code in every thread)."""
    global _guard_depth
    install_eval_guard()
    try:
        yield
    finally:
        with _guard_lock:
            _guard_depth -= 1
            if _guard_depth == 0:
                sympy_parser.eval_expr = _original_eval_expr


# --- verification -----------------------------------------------------------------------------


def _guarded(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> tuple[Any, bool]:
    """fn(...) under the eval guard, and whether the guard refused anything meanwhile.

    Libraries may swallow the guard's exception and carry on (sympy's simplify does), so a
    refusal anywhere makes the verdict untrustworthy: callers report "parse_error".
    """
    before = getattr(_refusals, "count", 0)
    with eval_guard():
        result = fn(*args, **kwargs)
    return result, getattr(_refusals, "count", 0) != before


@lru_cache(maxsize=4096)  # common answers ("2", "\\frac{1}{2}") recur across problems
def _parse_latex(answer: str) -> tuple[tuple[Any, ...], bool]:
    """math-verify's parse of one answer through its LaTeX path only (never `parse_expr`),
    and whether the eval guard refused something while parsing."""
    parsed, refused = _guarded(
        parse, "\\boxed{" + answer + "}", extraction_config=_LATEX_ONLY, parsing_timeout=None
    )
    return tuple(parsed), refused


def _has_math(parsed: Sequence[Any]) -> bool:
    return any(not isinstance(item, str) for item in parsed)


@dataclass(frozen=True)
class Gold:
    """A gold answer parsed once, to compare many responses against.

    `text` is the normalised answer; `parsed` is math-verify's parse (sympy objects and/or the
    string fallback); `error` says why it cannot be used (then every comparison is parse_error).
    """

    text: str
    parsed: tuple[Any, ...]
    error: str | None = None

    @classmethod
    def parse(cls, answer: str | Sequence[str]) -> Gold:
        """Parse a gold answer given as LaTeX text or a list of LaTeX strings."""
        text = gold_text(answer)
        if not text:
            return cls(text, (), "empty gold answer")
        reason = screen_answer(text)
        if reason:
            return cls(text, (), reason)
        parsed, refused = _parse_latex(text)
        if refused or not parsed:
            return cls(text, (), "gold answer could not be parsed")
        return cls(text, parsed)

    @property
    def choice(self) -> str | None:
        """The letter when the gold answer is a multiple-choice letter, else None."""
        match = _GOLD_CHOICE_RE.fullmatch(self.text)
        return match.group(1) if match else None


_SIZING_RE = re.compile(r"\\(?:left|right)(?![A-Za-z])|\\[,;:! ]")
# Whitespace next to a non-alphanumeric character never changes meaning (between two letters it
# may: `\pi r` is not `\pir`).
_LOOSE_SPACE_RE = re.compile(r"\s+(?=[^A-Za-z0-9\s])|(?<=[^A-Za-z0-9\s])\s+")
_ALNUM_RE = re.compile(r"[A-Za-z0-9]")


@lru_cache(maxsize=8192)
def _canonical(text: str) -> str:
    return _LOOSE_SPACE_RE.sub("", _SIZING_RE.sub("", _tidy(text)))


_SIMPLE_NUMBER_RE = re.compile(
    r"(?P<sign>[-+]?)\s*(?:(?P<int>\d+)|(?P<dec>\d*\.\d+)"
    r"|\\[dt]?frac\s*(?:\{(?P<num>\d+)\}|(?P<num1>\d))\s*(?:\{(?P<den>\d+)\}|(?P<den1>\d))"
    r"|(?P<snum>\d+)/(?P<sden>\d+))"
)


def _simple_number(text: str) -> tuple[Fraction, bool] | None:
    """(exact value, whether it is exact i.e. not a decimal) of an integer, decimal or
    integer fraction such as `-12`, `0.75`, `\\frac{3}{4}`, `\\frac34`, `3/4`; None for
    anything else."""
    match = _SIMPLE_NUMBER_RE.fullmatch(text.strip())
    if match is None:
        return None
    sign = -1 if match["sign"] == "-" else 1
    if match["int"] is not None:
        return sign * Fraction(int(match["int"])), True
    if match["dec"] is not None:
        return sign * Fraction(match["dec"]), False
    if match["snum"] is not None:
        num, den = match["snum"], match["sden"]
    else:
        num, den = match["num"] or match["num1"], match["den"] or match["den1"]
    if int(den) == 0:
        return None
    return sign * Fraction(int(num), int(den)), True


_BRACKETED_RE = re.compile(r"(\(|\[|\\\{)(.*)(\)|\]|\\\})", re.DOTALL)


def _number_list(text: str) -> tuple[str, list[tuple[Fraction, bool]]] | None:
    """(bracket pair, elements) of a bracketed list of plain numbers such as `(1, 2)`,
    `[0, \\frac{1}{2})` or `\\{-1, 1\\}`; None for anything else."""
    match = _BRACKETED_RE.fullmatch(_canonical(text))
    if match is None:
        return None
    items = match[2].split(",")
    # "(1,000, 2)": a group of three digits after a comma may be a thousands separator.
    if any(re.fullmatch(r"\d{3}", item) for item in items[1:]):
        return None
    numbers = []
    for item in items:
        number = _simple_number(item)
        if number is None:
            return None
        numbers.append(number)
    return match[1] + match[3], numbers


def _same_numbers(
    gold: list[tuple[Fraction, bool]], answer: list[tuple[Fraction, bool]]
) -> bool | None:
    """Elementwise verdict: equal values are correct; differing exact values are wrong; a
    differing decimal is left to the parser."""
    if [value for value, _ in gold] == [value for value, _ in answer]:
        return True
    exact = all(is_exact for _, is_exact in gold + answer)
    return False if exact else None


def compare_numbers(gold: str, answer: str) -> bool | None:
    """The verdict for plain numbers on both sides, computed exactly without the parser, or
    None when the parser must decide. Numbers are integers, decimals and integer fractions,
    alone or in a tuple, interval or set with the same brackets on both sides.

    Most final answers are such numbers. math-verify parses both to sympy numbers and compares
    them numerically (sets as sets, tuples and intervals elementwise): exact equality is
    "correct" there too, and exact rationals that differ are "wrong"; a decimal that differs is
    left to it (it rounds to 6 places).
    """
    gold_number, answer_number = _simple_number(gold), _simple_number(_tidy(answer))
    if gold_number is not None and answer_number is not None:
        return _same_numbers([gold_number], [answer_number])
    gold_list, answer_list = _number_list(gold), _number_list(answer)
    if gold_list is None or answer_list is None or gold_list[0] != answer_list[0]:
        return None
    gold_items, answer_items = gold_list[1], answer_list[1]
    if len(gold_items) != len(answer_items):
        return None
    if gold_list[0] == "\\{\\}":  # sets: order does not matter, repeats collapse
        if any(len({v for v, _ in items}) < len(items) for items in (gold_items, answer_items)):
            return None
        gold_items, answer_items = sorted(gold_items), sorted(answer_items)
    return _same_numbers(gold_items, answer_items)


def quick_verdict(gold: str, answer: str) -> bool | None:
    """The verdict when it is certain without the parser, else None: plain numbers on both
    sides (`compare_numbers`), or the same text up to spacing and `\\left`/`\\right` (which
    math-verify would parse identically)."""
    if not _ALNUM_RE.search(gold) or screen_answer(gold):
        return None  # math-verify may find nothing to parse in such a gold answer
    same = compare_numbers(gold, answer)
    if same is None and _canonical(gold) == _canonical(answer):
        return True
    return same


# --- answers with structure: systems, "≠", rounded decimals ------------------------------------
# Explicit rules that decide before math-verify where it is silent or too lenient:
# - a system (`k = 45, n = 2`: values for different variables) is right when each variable's
#   value is right. Against an unlabelled tuple or list the values pair in the order written:
#   math-verify compares such lists as sets, so `(2, 45)` passed for `k = 45, n = 2`. Indexed
#   labels of one variable (`x_1 = 2, x_2 = 3`, the roots of an equation) are left to it;
# - `x \neq a` against `x \neq b` compares a and b (math-verify raises on `≠`);
# - a decimal with at least MIN_ROUNDED_DIGITS decimal places and significant digits counts as
#   an exact rational gold value when it is that value correctly rounded (|d - x| <= half a unit
#   of its last place), alone or element by element in a tuple, interval or matrix:
#   `(0.6, 2.6667]` for `(\frac35, \frac83]`. math-verify compares at 6 places instead.

MIN_ROUNDED_DIGITS = 4
_ASSIGNMENT_RE = re.compile(rf"(?P<label>{_VARIABLE_RE.pattern})\s*=\s*(?P<value>[^=<>]+)")
_NEQ_RE = re.compile(rf"(?P<label>{_VARIABLE_RE.pattern})\s*\\neq\s*(?P<value>[^=<>]+)")
_DECIMAL_RE = re.compile(r"[-+]?\s*(\d*)\.(\d+)")
_MATRIX_RE = re.compile(r"\\begin\{([pbB]?matrix)\}(.*)\\end\{\1\}", re.DOTALL)


def _split_top_level(text: str) -> list[str]:
    """`text` split at the commas and semicolons outside brackets, items stripped."""
    items, depth, start = [], 0, 0
    for at, char in enumerate(text):
        if char in "([{":
            depth += 1
        elif char in ")]}":
            depth -= 1
        elif char in ",;" and depth == 0:
            items.append(text[start:at].strip())
            start = at + 1
    items.append(text[start:].strip())
    return items


def _enclosed(text: str) -> bool:
    """Whether the bracket opening `text` closes at its last character."""
    depth = 0
    for at, char in enumerate(text):
        depth += (char in "([{") - (char in ")]}")
        if depth == 0:
            return at == len(text) - 1
    return False


def _assignments(text: str) -> list[tuple[str, str]] | None:
    """[(variable, value), ...] of a system such as `x = 1, y = 2` (different variables)."""
    matches = [_ASSIGNMENT_RE.fullmatch(item) for item in _split_top_level(text)]
    if len(matches) < 2 or None in matches:
        return None
    pairs = [(re.sub(r"[{}\s]", "", m["label"]), m["value"].strip()) for m in matches if m]
    return pairs if len({label for label, _ in pairs}) == len(pairs) else None


def _tuple_items(text: str, *, bare: bool) -> list[str] | None:
    """The items of a tuple `(1, 2)` (or, when `bare`, of a list `1, 2`), none with `=`."""
    text = _SIZING_RE.sub("", text).strip()
    if text.startswith("(") and text.endswith(")") and _enclosed(text):
        text = text[1:-1]
    elif not bare:
        return None
    items = _split_top_level(text)
    return items if len(items) > 1 and all(item and "=" not in item for item in items) else None


def _system_verdict(gold: str, answer: str) -> tuple[bool | None, str] | None:
    """The verdict of the system rule, or None where it does not apply."""
    gold_pairs, answer_pairs = _assignments(gold), _assignments(answer)
    if gold_pairs and answer_pairs:
        given = dict(answer_pairs)
        if set(given) != {label for label, _ in gold_pairs}:
            return None
        pairs = [(value, given[label]) for label, value in gold_pairs]
    elif gold_pairs or answer_pairs:
        labelled = gold_pairs or answer_pairs or []
        if len({label.split("_")[0] for label, _ in labelled}) < len(labelled):
            return None  # x_1, x_2: solutions of one equation, in no particular order
        # A labelled gold pairs with a bare list too; a labelled answer only with a tuple (a
        # bare gold list may be a set of solutions).
        values = _tuple_items(answer, bare=True) if gold_pairs else _tuple_items(gold, bare=False)
        if values is None or len(values) != len(labelled):
            return None
        if gold_pairs:
            pairs = [(value, item) for (_, value), item in zip(labelled, values, strict=True)]
        else:
            pairs = [(item, value) for item, (_, value) in zip(values, labelled, strict=True)]
    else:
        return None
    verdicts = [_same_value(gold_value, value) for gold_value, value in pairs]
    if False in verdicts:
        return False, "ok"
    return (True, "ok") if None not in verdicts else (None, "parse_error")


def _neq_verdict(gold: str, answer: str) -> tuple[bool | None, str] | None:
    """`x \\neq a` against `x \\neq b`: the verdict on a against b; None where it does not apply."""
    gold_match, answer_match = _NEQ_RE.fullmatch(gold), _NEQ_RE.fullmatch(answer)
    if gold_match is None or answer_match is None or gold_match["label"] != answer_match["label"]:
        return None
    same = _same_value(gold_match["value"], answer_match["value"])
    return (same, "ok") if same is not None else (None, "parse_error")


def _number_items(text: str) -> tuple[str, list[str]] | None:
    """(shape, items) of a number, a tuple or interval, or a matrix, for the rounding rule."""
    text = _tidy(text)
    matrix = _MATRIX_RE.fullmatch(text)
    if matrix:
        rows = [row.split("&") for row in re.split(r"\\\\", matrix[2]) if row.strip()]
        return f"matrix {[len(row) for row in rows]}", [item for row in rows for item in row]
    bracketed = _BRACKETED_RE.fullmatch(_canonical(text))
    if bracketed and bracketed[1] != "\\{":  # sets: no order to pair elements by
        return bracketed[1] + bracketed[3], bracketed[2].split(",")
    return "", [text]


def _rounds_to(gold_item: str, answer_item: str) -> bool:
    gold_number, answer_number = _simple_number(gold_item), _simple_number(answer_item)
    if gold_number is None or answer_number is None:
        return False
    if gold_number[0] == answer_number[0]:
        return True
    decimal = _DECIMAL_RE.fullmatch(answer_item.strip())
    if not gold_number[1] or decimal is None:
        return False  # only an exact gold value is rounded
    places, digits = len(decimal[2]), len((decimal[1] + decimal[2]).lstrip("0"))
    error = abs(answer_number[0] - gold_number[0])
    return min(places, digits) >= MIN_ROUNDED_DIGITS and 2 * error * 10**places <= 1


def rounded_match(gold: str, answer: str) -> bool:
    """True when `answer` writes the exact rational value(s) of `gold` as decimals rounded to
    at least MIN_ROUNDED_DIGITS places (see the rules above), in the same shape."""
    gold_items, answer_items = _number_items(gold), _number_items(answer)
    if gold_items is None or answer_items is None or gold_items[0] != answer_items[0]:
        return False
    if len(gold_items[1]) != len(answer_items[1]):
        return False
    return all(_rounds_to(g, a) for g, a in zip(gold_items[1], answer_items[1], strict=True))


def _same_value(gold: str, answer: str) -> bool | None:
    """Verdict on one value of a structured answer against the gold's (None: cannot verify)."""
    gold, answer = _tidy(gold), _tidy(answer)
    if not gold or not answer or screen_answer(gold) or screen_answer(answer):
        return None
    same = quick_verdict(gold, answer)
    if same is not None:
        return same
    if rounded_match(gold, answer):
        return True
    parsed, refused = _parse_latex(gold)
    return None if refused or not parsed else _verified(parsed, answer)[0]


def _verified(gold_parsed: Sequence[Any], answer: str) -> tuple[bool | None, str]:
    """math-verify's verdict on an answer against a parsed gold answer."""
    predicted, refused = _parse_latex(answer)
    if refused or not predicted:
        return None, "parse_error"
    try:
        same, refused = _guarded(
            verify, list(gold_parsed), list(predicted), timeout_seconds=None, raise_on_error=True
        )
    except Exception:  # sympy raising on a comparison means "cannot verify", not "wrong"
        logger.debug("comparison failed: %r vs %r", gold_parsed, answer, exc_info=True)
        return None, "parse_error"
    if refused:
        return None, "parse_error"
    if same:
        return True, "ok"
    if _has_math(gold_parsed) and _has_math(predicted):
        return False, "ok"
    return None, "parse_error"


def compare(gold: Gold, answer: str) -> tuple[bool | None, str]:
    """(correct, status) of an extracted answer against a parsed gold answer.

    Plain numbers and identical text are settled exactly (`quick_verdict`), then the explicit
    rules above (multiple choice, rounded decimals, systems, ≠), then math-verify. An answer
    that math-verify cannot turn into mathematics only counts when it is the gold string
    itself; otherwise it is ("parse_error"), never a silent wrong.
    """
    if gold.error:
        return None, "parse_error"
    if not answer.strip():
        return None, "no_answer"
    if screen_answer(answer):
        return None, "parse_error"
    same = quick_verdict(gold.text, answer)
    if same is not None:
        return same, "ok"
    answer = _tidy(answer)
    if gold.choice and (letter := _choice_letter(answer)):
        return letter == gold.choice, "ok"
    if rounded_match(gold.text, answer):
        return True, "ok"
    for rule in (_system_verdict, _neq_verdict):
        verdict = rule(gold.text, answer)
        if verdict is not None:
            return verdict
    return _verified(gold.parsed, answer)


def check(gold: Gold | str | Sequence[str], response: str, *, lenient: bool = False) -> GradeResult:
    """Grade one response in this process (no time bound: see `qup_ray.grading`)."""
    extraction = extract_answer(response, lenient=lenient)
    if extraction.text is None:
        return GradeResult(None, None, "no_answer", None)
    parsed_gold = gold if isinstance(gold, Gold) else Gold.parse(gold)
    correct, status = compare(parsed_gold, extraction.text)
    return GradeResult(extraction.text, correct, status, extraction.mode)
