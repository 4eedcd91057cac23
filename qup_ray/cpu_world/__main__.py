"""``python -m qup_ray.cpu_world build [--cache-dir DIR] [--force]``: build or find the CPU world.

Prints one JSON object: the model directories by name, the build report's timings and the
students' held-out pass@8.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m qup_ray.cpu_world", description=__doc__.splitlines()[0]
    )
    sub = parser.add_subparsers(dest="command", required=True)
    build = sub.add_parser("build", help="build the tiny models (or find them in the cache)")
    build.add_argument(
        "--cache-dir", default=None, help="default: $QUP_CACHE_DIR or ~/.cache/qup_ray"
    )
    build.add_argument("--force", action="store_true", help="rebuild even if cached")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")

    from qup_ray.cpu_world.build import build_cpu_world, read_build_report
    from qup_ray.cpu_world.settings import CpuWorldSettings
    from qup_ray.cpu_world.vllm_cpu import offline_env

    settings = CpuWorldSettings(cache_dir=args.cache_dir)
    offline_env(settings)
    started = time.perf_counter()
    paths = build_cpu_world(settings, force=args.force)
    report = read_build_report(settings)
    out = {
        "models": {name: str(path) for name, path in paths.items()},
        "elapsed_s": round(time.perf_counter() - started, 2),
        "build_timings_s": report["timings_s"],
        "heldout_pass_at_8": {
            n: s["heldout_hf"]["pass_at_k"] for n, s in report["students"].items()
        },
    }
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
