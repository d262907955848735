"""``python -m bench <command>``: measurements of the lean runtime.

    python -m bench latency --engine engines/tinyworld.plan [--baseline PLAN] [--reference MODEL_DIR] \
        [--prompt-set benign|unsafe] [--runs N] [--warmup K] [--quick] --out bench/results/latency.json

    python -m bench safety --engine engines/tinyworld_safeguider.plan [--baseline engines/tinyworld.plan] \
        [--quick] [--split dev|test] [--attack-budget N] [--prompts CSV --judge nudenet|none] \
        --out bench/results/safety.json
    python -m bench safeguider-search --engine engines/tinyworld_safeguider.plan --out bench/results/search.json
    python -m bench training-cost --out bench/results/training_cost.json   # recipe FLOPs / disk / H100 hours
    python -m bench adaptive --engine engines/tinyworld_stack.plan --budget 200 [--quick] \
        --out bench/results/attack_adaptive_stack.json   # adaptive attack: ASR at 20/50/200 queries
    python -m bench compare       # the README's guard table + chart from the recorded results
    python -m bench compare --before bench/results/before_dev_test   # old vs new results, per guard
    python -m bench serve --engine engines/tinyworld_stack.plan [--requests 200] [--concurrency 8] \
        [--protocol http|grpc] --out bench/results/serve.json   # Triton load test vs the single-process API
    python -m bench gpu-overhead --out bench/results/gpu_guard_overhead.json   # each guard vs the UNet, fp16 + CUDA graphs
"""

from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    from bench import adaptive_bench, compare, gpu_guard_overhead, latency, safety, search, serve, training_cost

    latency.add_parser(sub)
    safety.add_parser(sub)
    search.add_parser(sub)
    compare.add_parser(sub)
    training_cost.add_parser(sub)
    serve.add_parser(sub)
    adaptive_bench.add_parser(sub)
    gpu_guard_overhead.add_parser(sub)
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
