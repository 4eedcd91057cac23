"""The CPU world's calibration targets (docs/cpu-paradox.md), measured on its inputs.

What the paper measured before any training, here on the tiny students and the rule oracle:
each stream's kind of trace scored by the student it is meant for (own correct samples, their
style-aligned and refined repairs, fresh synthesized solutions) must have the paper's
perplexity ordering, own ~ style-aligned < refined < synthesized, with ratios of a modest
factor, not orders of magnitude; refinement must be a minimal repair (a different text from
synthesis that keeps about 4 of 5 of the student's trace); the reward model must prefer the
compact style. These are properties of the world's inputs, not outcomes of fine-tuning.
"""

from __future__ import annotations

import statistics

import pytest
import torch
from transformers import AutoModelForCausalLM

from qup_ray.config import ScoringConfig
from qup_ray.cpu_world.boxed import is_correct
from qup_ray.cpu_world.oracle_rules import judge_score, oracle_reply
from qup_ray.cpu_world.reward_models import chat_text, reference_scores
from qup_ray.cpu_world.students import MAX_NEW_TOKENS, pad_batch
from qup_ray.cpu_world.synthetic import sample_problems
from qup_ray.encoding import ChatFormat
from qup_ray.oracle.prompts import (
    refine_messages,
    retention_judge_messages,
    style_align_messages,
    synthesize_messages,
)
from qup_ray.ppl import response_nll
from qup_ray.scoring import style_rows

pytestmark = pytest.mark.slow

PROMPT = "tiny"
NUM_PROBLEMS = 40
SAMPLES_PER_PROBLEM = 8  # N = 8 as in the paper's rejection sampling
# The windows of docs/cpu-paradox.md ("Targets"): each stream's mean PPL over the own one's.
STYLE_ALIGNED_OVER_OWN = (0.85, 1.15)
REFINED_OVER_OWN = (1.05, 2.0)
SYNTHESIZED_OVER_OWN = (1.1, 2.5)
MIN_MEAN_RETENTION = 3.5
STYLE_MEASURES = ("symbol_freq", "scaffolding_freq")


@torch.no_grad()
def _own_correct_traces(model, fmt: ChatFormat, problems, seed: int) -> dict[int, str]:
    """The first correct one of a few T=1.0 samples per problem (rejection sampling), by index."""
    torch.manual_seed(seed)
    turn_end = fmt.turn_end_ids[0]
    ids, attention = pad_batch([fmt.prompt_ids(p.problem) for p in problems], turn_end, "left")
    out = model.generate(
        input_ids=ids, attention_mask=attention, do_sample=True, temperature=1.0, top_k=0,
        top_p=1.0, max_new_tokens=MAX_NEW_TOKENS, num_return_sequences=SAMPLES_PER_PROBLEM,
        eos_token_id=list(fmt.stop_token_ids), pad_token_id=turn_end,
    )  # fmt: skip
    generated = out[:, ids.shape[1] :].tolist()
    traces = {}
    for i, p in enumerate(problems):
        for sample in generated[i * SAMPLES_PER_PROBLEM : (i + 1) * SAMPLES_PER_PROBLEM]:
            stop = next((j for j, t in enumerate(sample) if t in fmt.stop_token_ids), None)
            if stop is None:
                continue  # truncated: the RFT filter drops it
            text = fmt.tokenizer.decode(sample[:stop]).strip()
            if is_correct(text, p.answer):
                traces[i] = text
                break
    return traces


@torch.no_grad()
def _ppl(model, fmt: ChatFormat, problem: str, trace: str) -> float:
    """PPL of ``trace`` as the score stage computes it (float32 forward, same token sequence)."""
    ids, start = fmt.example(problem, trace)
    logits = model(input_ids=torch.tensor([ids])).logits[0].float()
    logprobs = torch.log_softmax(logits[:-1], dim=-1).gather(1, torch.tensor(ids[1:])[:, None])
    return float(response_nll([0.0, *logprobs[:, 0].tolist()], start)["ppl"])


def _streams(problems, own: dict[int, str]) -> dict[str, dict[int, str]]:
    """Each oracle stream's trace of every problem the student solved, from the rule oracle."""
    exemplars = list(own.values())[:2]
    streams: dict[str, dict[int, str]] = {"own": own}
    for name, build in {
        "style_aligned": lambda p, t: style_align_messages(p.problem, t, exemplars),
        "refined": lambda p, t: refine_messages(p.problem, t),
        "synthesized": lambda p, t: synthesize_messages(p.problem),
    }.items():
        streams[name] = {i: oracle_reply(build(problems[i], t))[1] for i, t in own.items()}
    streams["reference"] = {i: problems[i].reference for i in own}
    return streams


@pytest.fixture(scope="module")
def measured(cpu_world) -> dict[str, dict]:
    """Per student: the problems, the streams' traces and their PPL under that student."""
    problems = sample_problems(NUM_PROBLEMS, seed=2006)
    out = {}
    for seed, name in enumerate(("tiny-qwen2", "tiny-llama")):
        model = AutoModelForCausalLM.from_pretrained(str(cpu_world[name]), dtype=torch.float32)
        model.eval()
        fmt = ChatFormat.for_model(cpu_world[name], PROMPT)
        own = _own_correct_traces(model, fmt, problems, seed)
        streams = _streams(problems, own)
        ppl = {
            s: {i: _ppl(model, fmt, problems[i].problem, t) for i, t in traces.items()}
            for s, traces in streams.items()
        }
        out[name] = {"problems": problems, "streams": streams, "ppl": ppl}
        means = {s: round(statistics.mean(v.values()), 3) for s, v in ppl.items() if v}
        print(f"{name}: {len(own)} problems solved; mean PPL {means}")
    return out


@pytest.mark.parametrize("student", ["tiny-qwen2", "tiny-llama"])
def test_perplexity_has_the_papers_ordering_and_ratios(measured, student):
    ppl = measured[student]["ppl"]
    assert len(ppl["own"]) >= 8, "too few solved problems to measure the student's own traces"
    mean = {s: statistics.mean(v.values()) for s, v in ppl.items()}
    ratio = {s: mean[s] / mean["own"] for s in mean}
    assert mean["own"] < mean["refined"] < mean["synthesized"], mean
    assert STYLE_ALIGNED_OVER_OWN[0] <= ratio["style_aligned"] <= STYLE_ALIGNED_OVER_OWN[1], ratio
    assert REFINED_OVER_OWN[0] <= ratio["refined"] <= REFINED_OVER_OWN[1], ratio
    assert SYNTHESIZED_OVER_OWN[0] <= ratio["synthesized"] <= SYNTHESIZED_OVER_OWN[1], ratio


def test_refinement_is_a_minimal_repair_distinct_from_synthesis(measured):
    streams = measured["tiny-qwen2"]["streams"]
    problems = measured["tiny-qwen2"]["problems"]
    retention = []
    for i, own in streams["own"].items():
        refined, synthesized = streams["refined"][i], streams["synthesized"][i]
        # A student now and then answers in the compact style (a minority of its training chats);
        # such a trace is repaired against the compact solution, which it may already be.
        right = problems[i].compact if own.startswith("\\(") else problems[i].native
        assert refined != synthesized or own == synthesized
        assert is_correct(refined, problems[i].answer) and is_correct(
            synthesized, problems[i].answer
        )
        # The student's steps stay: as many lines, the scaffolding words kept.
        assert len(refined.splitlines()) == len(right.splitlines())
        assert refined.splitlines()[0].split()[0] == own.splitlines()[0].split()[0]
        text = "\n".join(m["content"] for m in retention_judge_messages(own, refined))
        retention.append(judge_score(text))
    assert statistics.mean(retention) >= MIN_MEAN_RETENTION, retention


@pytest.mark.parametrize("student", ["tiny-qwen2", "tiny-llama"])
def test_refinement_is_compacted_and_style_alignment_is_not(measured, cpu_world, student):
    """The dry run's style check (refined: more symbols, less scaffolding than style-aligned),
    with the score stage's style statistics under the student's tokenizer. The refine rule
    keeps the student's scaffolding words (dropping them is far outside the PPL window,
    docs/cpu-paradox.md), so its scaffolding frequency is lower only by the symbol tokens of
    its LaTeX results: a small margin, checked here on both students."""
    streams = measured[student]["streams"]
    scoring = ScoringConfig()
    scaffolding = frozenset(scoring.scaffolding_words)
    mean = {}
    for s in ("own", "style_aligned", "refined"):
        texts = list(streams[s].values())
        rows = style_rows(str(cpu_world[student]), texts, scoring.symbol_chars, scaffolding)
        mean[s] = {k: statistics.mean(r[k] for r in rows) for k in STYLE_MEASURES}
    print(f"{student} mean style {mean}")
    assert mean["refined"]["symbol_freq"] > mean["style_aligned"]["symbol_freq"], mean
    assert mean["style_aligned"]["scaffolding_freq"] > mean["refined"]["scaffolding_freq"], mean
    assert mean["style_aligned"]["scaffolding_freq"] >= 0.9 * mean["own"]["scaffolding_freq"], mean


def test_reward_model_prefers_the_compact_style(measured, cpu_world):
    from transformers import AutoTokenizer

    streams = measured["tiny-qwen2"]["streams"]
    problems = measured["tiny-qwen2"]["problems"]
    tokenizer = AutoTokenizer.from_pretrained(str(cpu_world["tiny-qwen-rm"]))
    mean = {}
    for s in ("own", "refined", "synthesized"):
        texts = [chat_text(tokenizer, problems[i].problem, t) for i, t in streams[s].items()]
        mean[s] = statistics.mean(reference_scores(cpu_world["tiny-qwen-rm"], texts, tokenizer))
    print(f"tiny-qwen-rm mean reward {mean}")
    assert mean["synthesized"] > mean["refined"] > mean["own"], mean
