"""Benchmarks run by `qup bench NAME`: a stage's throughput against its bare baseline.

Each module in `BENCHES` has `run(*, quick: bool = False) -> dict` returning at least `bench`,
`pipeline_per_s`, `baseline_per_s` and `ratio`.
"""

BENCHES: dict[str, str] = {
    "grade": "qup_ray.bench.grade",
    "oracle": "qup_ray.bench.oracle",
    "ppl": "qup_ray.bench.ppl",
    "rollouts": "qup_ray.bench.rollouts",
    "scale": "qup_ray.bench.scale",
    "train": "qup_ray.bench.train",
}
