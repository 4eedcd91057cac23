"""The verdict: the paper's three claims checked on this run's numbers, in plain words.

Nothing here is written in advance: each sentence is built from the correlations and stream
values of one student and objective (training seeds pooled), and starts with its `outcome`:
- `holds`: the bootstrap interval (over training seeds and problems) lies entirely on the side
  the paper claims (e.g. Spearman rho of reward vs Total Avg below zero);
- `does not hold`: the interval lies entirely on the other side: the run contradicts the
  paper, and the report says so;
- `inconclusive`: the interval contains zero, so the run cannot tell either way;
- `no verdict`: too few streams have the numbers, or one measure does not vary.
Without intervals (per-stream numbers of a `--from-table` report) the outcome follows the
point value's sign, and `evidence` says `no intervals`. `evidence` is `strong` (the interval
excludes zero), `weak` (it crosses zero), `no intervals`, `too few streams`, `no spread` or
`no data`; `holds` is True / False for holds / does not hold, else None.
"""

from __future__ import annotations

from itertools import combinations

import numpy as np
import pandas as pd

from qup_ray.report.analysis import Y_MEASURE, BootstrapSettings, difference_intervals
from qup_ray.report.collect import QUARTERS, REFINED_STREAM, STYLE_PREFIX, ReportData

MIN_STREAMS = 3
MAX_PAIRS_SHOWN = 3
VERDICT_COLUMNS = ("student", "objective", "claim", "outcome", "holds", "evidence", "text")
HOLDS, FAILS, INCONCLUSIVE, NO_VERDICT = "holds", "does not hold", "inconclusive", "no verdict"


def _corr(
    corr: pd.DataFrame, student: str, objective: str, x: str, method: str
) -> pd.Series | None:
    rows = corr[
        (corr.student == student)
        & (corr.objective == objective)
        & (corr.x == x)
        & (corr.method == method)
    ]
    return None if rows.empty else rows.iloc[0]


def _evidence(low: float, high: float) -> str:
    """strong when the interval excludes zero, weak when it crosses it."""
    if np.isnan(low) or np.isnan(high):
        return "no intervals"
    return "strong" if low > 0 or high < 0 else "weak"


EVIDENCE_WORDS = {
    "strong": "its bootstrap interval excludes zero",
    "weak": "its bootstrap interval crosses zero, so the evidence is weak",
    "no intervals": "no intervals: per-stream numbers only, no per-problem rows to resample",
}


def _outcome(point_holds: bool, low: float, high: float) -> str:
    """holds / does not hold / inconclusive for a claim of a negative relation: by where its
    interval lies (wholly below zero, wholly above, across), by the point value's sign alone
    when there is no interval."""
    if np.isnan(low) or np.isnan(high):
        return HOLDS if point_holds else FAILS
    if high < 0:
        return HOLDS
    return FAILS if low > 0 else INCONCLUSIVE


def _finish(out: dict, outcome: str, evidence: str, text: str) -> dict:
    """A verdict row whose sentence leads with its outcome."""
    holds = {HOLDS: True, FAILS: False}.get(outcome)
    lead = {HOLDS: "Holds", FAILS: "Does not hold", INCONCLUSIVE: "Inconclusive"}[outcome]
    if outcome == FAILS and evidence != "no intervals":
        text += " The paper's direction does not hold in this run: that is the result."
    return {
        **out,
        "outcome": outcome,
        "holds": holds,
        "evidence": evidence,
        "text": f"{lead}. {text}",
    }


def _interval(ci: tuple[float, float]) -> str:
    return "" if np.isnan(ci[0]) else f" [{ci[0]:+.3g}, {ci[1]:+.3g}]"


def _ranking(table: pd.DataFrame, col: str) -> str:
    ordered = table[col].dropna().sort_values(ascending=False)
    return " > ".join(f"{s} ({v:.3g})" for s, v in ordered.items())


def _rank_evidence(
    corr: pd.DataFrame, student: str, objective: str, x: str
) -> tuple[pd.Series | None, str]:
    """The Spearman row of `x` vs Total Avg and its numbers in words ("" when unusable)."""
    rho = _corr(corr, student, objective, x, "spearman")
    tau = _corr(corr, student, objective, x, "kendall")
    if rho is None or rho.n_streams < MIN_STREAMS or np.isnan(rho.value):
        return rho, ""
    interval = "" if np.isnan(rho.ci_low) else f" [{rho.ci_low:+.2f}, {rho.ci_high:+.2f}]"
    return rho, (
        f"Spearman rho = {rho.value:+.2f}{interval}, Kendall tau = {tau.value:+.2f} "
        f"over {int(rho.n_streams)} streams"
    )


def _too_few(out: dict, rho: pd.Series | None, name: str) -> dict:
    n = 0 if rho is None else int(rho.n_streams)
    if n >= MIN_STREAMS:  # enough streams, but one measure is the same for all: no ranking
        text = (
            f"{name} vs Total Avg: over {n} streams one of the two is the same for every "
            "stream, so there is no ranking to compare, no verdict."
        )
        return {**out, "outcome": NO_VERDICT, "holds": None, "evidence": "no spread", "text": text}
    text = (
        f"{name} vs Total Avg: only {n} stream(s) have both values (at least {MIN_STREAMS} "
        "needed), no verdict."
    )
    return {**out, "outcome": NO_VERDICT, "holds": None, "evidence": "too few streams",
            "text": text}  # fmt: skip


def _reward_claim(data: ReportData, corr: pd.DataFrame, student: str, objective: str) -> dict:
    """Does the reward ranking invert the utility ranking (the paradox)?"""
    out = {"student": student, "objective": objective, "claim": "reward_inverts_utility"}
    rho, stats = _rank_evidence(corr, student, objective, "reward")
    if not stats:
        return _too_few(out, rho, "Reward")
    evidence = _evidence(rho.ci_low, rho.ci_high)
    holds = bool(rho.value < 0)
    if holds:
        text = (
            "The reward ranking inverts the utility ranking: streams the reward model scores "
            f"higher train a less accurate student ({stats}) - the quality-utility paradox"
        )
    else:
        relation = "equal" if rho.value == 0 else "higher"
        text = (
            "The reward ranking does not invert the utility ranking: higher reward goes with "
            f"{relation} accuracy ({stats})"
        )
    table = data.measures(student, objective)[["reward", Y_MEASURE]].dropna()
    text += (
        f"; {EVIDENCE_WORDS[evidence]}. By reward: {_ranking(table, 'reward')}; "
        f"by Total Avg: {_ranking(table, Y_MEASURE)}."
    )
    return _finish(out, _outcome(holds, rho.ci_low, rho.ci_high), evidence, text)


def _ppl_claim(data: ReportData, corr: pd.DataFrame, student: str, objective: str) -> dict:
    """Does lower PPL go with higher accuracy, monotonically, and in every quarter?"""
    out = {"student": student, "objective": objective, "claim": "ppl_vs_accuracy"}
    rho, stats = _rank_evidence(corr, student, objective, "ppl")
    if not stats:
        return _too_few(out, rho, "PPL")
    evidence = _evidence(rho.ci_low, rho.ci_high)
    holds = bool(rho.value < 0)
    if not holds:
        text = f"PPL is not negatively related to accuracy here ({stats}); "
        text += f"{EVIDENCE_WORDS[evidence]}."
    else:
        text = f"Lower PPL goes with higher accuracy ({stats}); {EVIDENCE_WORDS[evidence]}. "
        table = data.measures(student, objective)[["ppl", Y_MEASURE]].dropna()
        # Pairs where the lower-PPL stream is not the more accurate one break monotonicity.
        discordant = [
            f"{a} (PPL {table.at[a, 'ppl']:.3g}, {table.at[a, Y_MEASURE]:.3g}) vs "
            f"{b} (PPL {table.at[b, 'ppl']:.3g}, {table.at[b, Y_MEASURE]:.3g})"
            for a, b in combinations(table.index, 2)
            if (table.at[a, "ppl"] - table.at[b, "ppl"])
            * (table.at[a, Y_MEASURE] - table.at[b, Y_MEASURE])
            >= 0
        ]
        shown = "; ".join(discordant[:MAX_PAIRS_SHOWN])
        more = len(discordant) - MAX_PAIRS_SHOWN
        text += (
            f"Not strictly monotone: {shown}{f' and {more} more pair(s)' if more > 0 else ''}."
            if discordant
            else "PPL is strictly monotone against accuracy."
        )
    quarters = [(q, _corr(corr, student, objective, q, "spearman")) for q in QUARTERS]
    known = [(q, r.value) for q, r in quarters if r is not None and not np.isnan(r.value)]
    if known:
        values = ", ".join(f"{q.removesuffix('_ppl').upper()} {v:+.2f}" for q, v in known)
        negative = sum(v < 0 for _, v in known)
        text += f" Per quarter: negative in {negative} of {len(known)} ({values})."
    return _finish(out, _outcome(holds, rho.ci_low, rho.ci_high), evidence, text)


def _style_claim(
    data: ReportData, student: str, objective: str, settings: BootstrapSettings
) -> dict:
    """Does each style-aligned stream have lower PPL and higher Total Avg than oracle_refined?"""
    out = {"student": student, "objective": objective, "claim": "style_alignment"}
    table = data.measures(student, objective)
    styles = [s for s in table.index if s.startswith(STYLE_PREFIX)]
    need = {"ppl", Y_MEASURE}
    usable = [
        s for s in styles if need <= set(table.columns) and table.loc[s, list(need)].notna().all()
    ]
    if (
        REFINED_STREAM not in table.index
        or table.loc[REFINED_STREAM, list(need)].isna().any()
        or not usable
    ):
        return {
            **out,
            "outcome": NO_VERDICT,
            "holds": None,
            "evidence": "no data",
            "text": f"Style alignment: needs PPL and Total Avg of {REFINED_STREAM} and of a "
            f"{STYLE_PREFIX}_* stream; not available, no verdict.",
        }
    ref = table.loc[REFINED_STREAM]
    parts, all_hold, evidences, wrong_side = [], True, [], False
    for s in usable:
        row = table.loc[s]
        all_hold &= bool(row.ppl < ref.ppl and row[Y_MEASURE] > ref[Y_MEASURE])
        ppl_ci, acc_ci = difference_intervals(data, student, objective, s, REFINED_STREAM, settings)
        evidences += [_evidence(*ppl_ci), _evidence(*acc_ci)]
        # An interval wholly on the wrong side (PPL higher, or accuracy lower, than refined).
        wrong_side |= bool(ppl_ci[0] > 0 or acc_ci[1] < 0)
        parts.append(
            f"{s}: PPL {row.ppl:.3g} vs {ref.ppl:.3g} ({row.ppl - ref.ppl:+.3g}{_interval(ppl_ci)}), "
            f"Total Avg {row[Y_MEASURE]:.3g} vs {ref[Y_MEASURE]:.3g} "
            f"({row[Y_MEASURE] - ref[Y_MEASURE]:+.3g}{_interval(acc_ci)})"
        )
    evidence = next((e for e in ("no intervals", "weak") if e in evidences), "strong")
    if evidence == "no intervals":
        outcome = HOLDS if all_hold else FAILS
    elif wrong_side:
        outcome = FAILS
    else:
        outcome = HOLDS if evidence == "strong" and all_hold else INCONCLUSIVE
    lead = (
        "Style alignment lowers PPL and raises accuracy over oracle refinement"
        if all_hold
        else "Style alignment does not both lower PPL and raise accuracy over oracle refinement"
    )
    tail = {
        "strong": "every difference's bootstrap interval excludes zero",
        "weak": "a difference's bootstrap interval crosses zero, so the evidence is weak",
        "no intervals": EVIDENCE_WORDS["no intervals"],
    }[evidence]
    return _finish(out, outcome, evidence, f"{lead}: {'; '.join(parts)}; {tail}.")


def verdicts(data: ReportData, corr: pd.DataFrame, settings: BootstrapSettings) -> pd.DataFrame:
    """One row per student, objective and claim (reward_inverts_utility, ppl_vs_accuracy,
    style_alignment): holds, evidence and the sentence shown in the report."""
    rows = []
    for student in data.students:
        for objective in data.objectives:
            rows.append(_reward_claim(data, corr, student, objective))
            rows.append(_ppl_claim(data, corr, student, objective))
            rows.append(_style_claim(data, student, objective, settings))
    return pd.DataFrame(rows, columns=list(VERDICT_COLUMNS))
