"""The verdict: the paper's three claims checked on this run's numbers, in plain words.

Nothing here is written in advance: each sentence is built from the correlations and stream
values of one student and objective, and says how strong the evidence is:
- `strong`: the bootstrap interval lies entirely on the side of the claimed sign;
- `weak`: the interval crosses zero;
- `no intervals`: per-stream numbers only (a `--from-table` report);
- `too few streams`: fewer than `MIN_STREAMS` streams have both values, a rank says little.
`holds` is True/False for the claim, None where it cannot be judged at all.
"""

from __future__ import annotations

from itertools import combinations

import numpy as np
import pandas as pd

from qup_ray.report.analysis import Y_MEASURE, BootstrapSettings
from qup_ray.report.collect import QUARTERS, REFINED_STREAM, STYLE_PREFIX, ReportData
from qup_ray.report.correlation import bootstrap_mean

MIN_STREAMS = 3
VERDICT_COLUMNS = ("student", "objective", "claim", "holds", "evidence", "text")


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
    "strong": "its 95% bootstrap interval excludes zero",
    "weak": "its 95% bootstrap interval crosses zero, so the evidence is weak",
    "no intervals": "no intervals: per-stream numbers only, no per-problem rows to resample",
}


def _ranking(table: pd.DataFrame, col: str) -> str:
    ordered = table[col].dropna().sort_values(ascending=False)
    return " > ".join(f"{s} ({v:.3g})" for s, v in ordered.items())


def _correlation_claim(
    data: ReportData, corr: pd.DataFrame, student: str, objective: str, x: str, claim: str
) -> dict:
    """reward vs accuracy (claim: inverse) or PPL vs accuracy (claim: negative, monotone)."""
    rho = _corr(corr, student, objective, x, "spearman")
    tau = _corr(corr, student, objective, x, "kendall")
    out = {"student": student, "objective": objective, "claim": claim}
    name = "reward" if x == "reward" else "PPL"
    if rho is None or rho.n_streams < MIN_STREAMS or np.isnan(rho.value):
        n = 0 if rho is None else int(rho.n_streams)
        return {
            **out,
            "holds": None,
            "evidence": "too few streams",
            "text": f"{name} vs Total Avg: only {n} stream(s) have both values (at least "
            f"{MIN_STREAMS} needed), no verdict.",
        }
    table = data.measures(student, objective)[[x, Y_MEASURE]].dropna()
    interval = "" if np.isnan(rho.ci_low) else f" [{rho.ci_low:+.2f}, {rho.ci_high:+.2f}]"
    stats = (
        f"Spearman rho = {rho.value:+.2f}{interval}, Kendall tau = {tau.value:+.2f} "
        f"over {int(rho.n_streams)} streams"
    )
    evidence = _evidence(rho.ci_low, rho.ci_high)
    holds = bool(rho.value < 0)
    if x == "reward":
        if holds:
            text = (
                f"The reward ranking inverts the utility ranking: streams the reward model scores "
                f"higher train a less accurate student ({stats}) - the quality-utility paradox"
            )
        else:
            text = (
                f"The reward ranking does not invert the utility ranking: higher reward goes "
                f"with {'equal' if rho.value == 0 else 'higher'} accuracy ({stats})"
            )
        text += f"; {EVIDENCE_WORDS[evidence]}"
        text += f". By reward: {_ranking(table, x)}; by Total Avg: {_ranking(table, Y_MEASURE)}."
    else:
        discordant = [
            (a, b)
            for a, b in combinations(table.index, 2)
            if (table.at[a, x] - table.at[b, x]) * (table.at[a, Y_MEASURE] - table.at[b, Y_MEASURE])
            >= 0
        ]
        if holds:
            text = f"Lower PPL goes with higher accuracy ({stats}); {EVIDENCE_WORDS[evidence]}. "
            text += (
                "PPL is strictly monotone against accuracy."
                if not discordant
                else "Not strictly monotone: "
                + "; ".join(
                    f"{a} (PPL {table.at[a, x]:.3g}, {table.at[a, Y_MEASURE]:.3g}) vs {b} "
                    f"(PPL {table.at[b, x]:.3g}, {table.at[b, Y_MEASURE]:.3g})"
                    for a, b in discordant
                )
                + "."
            )
        else:
            text = f"PPL is not negatively related to accuracy here ({stats}); {EVIDENCE_WORDS[evidence]}."
        quarters = [_corr(corr, student, objective, q, "spearman") for q in QUARTERS]
        known = [
            (q, r.value)
            for q, r in zip(QUARTERS, quarters, strict=True)
            if r is not None and not np.isnan(r.value)
        ]
        if known:
            negative = sum(v < 0 for _, v in known)
            text += (
                f" Per quarter: negative in {negative} of {len(known)} ("
                + ", ".join(f"{q.removesuffix('_ppl').upper()} {v:+.2f}" for q, v in known)
                + ")."
            )
    return {**out, "holds": holds, "evidence": evidence, "text": text}


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
            "holds": None,
            "evidence": "no data",
            "text": f"Style alignment: needs PPL and Total Avg of {REFINED_STREAM} and of a "
            f"{STYLE_PREFIX}_* stream; not available, no verdict.",
        }
    ref = table.loc[REFINED_STREAM]
    parts, all_hold, evidences = [], True, []
    for s in usable:
        row = table.loc[s]
        all_hold &= bool(row.ppl < ref.ppl and row[Y_MEASURE] > ref[Y_MEASURE])
        ppl_ci, acc_ci = _difference_intervals(data, student, objective, s, settings)
        evidences += [_evidence(*ppl_ci), _evidence(*acc_ci)]
        ci = lambda c: "" if np.isnan(c[0]) else f" [{c[0]:+.3g}, {c[1]:+.3g}]"  # noqa: E731
        parts.append(
            f"{s}: PPL {row.ppl:.3g} vs {ref.ppl:.3g} ({row.ppl - ref.ppl:+.3g}{ci(ppl_ci)}), "
            f"Total Avg {row[Y_MEASURE]:.3g} vs {ref[Y_MEASURE]:.3g} "
            f"({row[Y_MEASURE] - ref[Y_MEASURE]:+.3g}{ci(acc_ci)})"
        )
    evidence = next((e for e in ("no intervals", "weak") if e in evidences), "strong")
    lead = (
        "Style alignment lowers PPL and raises accuracy over oracle refinement"
        if all_hold
        else "Style alignment does not both lower PPL and raise accuracy over oracle refinement"
    )
    tail = {
        "strong": "every difference's 95% bootstrap interval excludes zero",
        "weak": "a difference's 95% bootstrap interval crosses zero, so the evidence is weak",
        "no intervals": EVIDENCE_WORDS["no intervals"],
    }[evidence]
    return {
        **out,
        "holds": all_hold,
        "evidence": evidence,
        "text": f"{lead}: {'; '.join(parts)}; {tail}.",
    }


def _difference_intervals(
    data: ReportData, student: str, objective: str, stream: str, settings: BootstrapSettings
) -> tuple[tuple[float, float], tuple[float, float]]:
    """95% intervals of (stream - oracle_refined) PPL (paired over problems) and Total Avg
    (paired over each benchmark's problems); NaN without per-problem rows."""
    nan = (np.nan, np.nan)
    a, b = data.problems.get((student, stream)), data.problems.get((student, REFINED_STREAM))
    ppl_ci = nan
    if a is not None and b is not None and "ppl" in a.columns and "ppl" in b.columns:
        shared = a.index.intersection(b.index)
        ppl_ci = bootstrap_mean(
            [a.loc[shared, "ppl"] - b.loc[shared, "ppl"]],
            settings.num_resamples,
            settings.seed,
            settings.level,
        )
    groups = []
    for bench in data.benchmarks:
        sa = data.bench_problems.get((student, stream, objective, bench))
        sb = data.bench_problems.get((student, REFINED_STREAM, objective, bench))
        if sa is None or sb is None:
            return ppl_ci, nan
        shared = sa.index.intersection(sb.index)
        groups.append((sa.loc[shared] - sb.loc[shared]).to_numpy() * 100)
    acc_ci = (
        bootstrap_mean(groups, settings.num_resamples, settings.seed, settings.level)
        if groups
        else nan
    )
    return ppl_ci, acc_ci


def verdicts(data: ReportData, corr: pd.DataFrame, settings: BootstrapSettings) -> pd.DataFrame:
    """One row per student, objective and claim (reward_inverts_utility, ppl_vs_accuracy,
    style_alignment): holds, evidence and the sentence shown in the report."""
    rows = []
    for student in data.students:
        for objective in data.objectives:
            rows.append(
                _correlation_claim(
                    data, corr, student, objective, "reward", "reward_inverts_utility"
                )
            )
            rows.append(
                _correlation_claim(data, corr, student, objective, "ppl", "ppl_vs_accuracy")
            )
            rows.append(_style_claim(data, student, objective, settings))
    return pd.DataFrame(rows, columns=list(VERDICT_COLUMNS))
