"""Run every benchmark, print every figure, write bench/RESULTS.md (`make bench`).

    .venv/bin/python bench/run_all.py                 # full run (~13 min on 2 idle CPU cores)
    .venv/bin/python bench/run_all.py --quick         # smoke run (~3-4 min)
    .venv/bin/python bench/run_all.py --device cuda --only throughput,overhead --results bench/out/RESULTS.md
"""

from __future__ import annotations

import json
import time

import common
import overhead
import pruning
import pruning_regret
import search_efficiency
import teacher_reuse
import throughput
import workers

BENCHMARKS = {"overhead": overhead, "teacher_reuse": teacher_reuse, "pruning": pruning, "workers": workers,
              "throughput": throughput, "pruning_regret": pruning_regret, "search_efficiency": search_efficiency}


def main() -> None:
    p = common.parser(__doc__.splitlines()[0])
    p.add_argument("--only", default=",".join(BENCHMARKS),
                   help=f"comma-separated subset of {', '.join(BENCHMARKS)} (default: all)")
    p.add_argument("--json", default=None, help="also write every figure as JSON to this file")
    args = p.parse_args()
    names = [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        p.error(f"unknown benchmark(s) {unknown}; choose from {', '.join(BENCHMARKS)}")
    started, load_start = time.time(), common.load()
    print(f"load average at start: {load_start} (timings are only meaningful on a quiet machine)", flush=True)
    sections = []
    for name in names:
        print(f"\n=== {name} ===", flush=True)
        section = common.timed(BENCHMARKS[name].run, args)
        sections.append(section)
        print(section.text(), flush=True)
        # Written after every benchmark, so an interrupted run still leaves what it measured.
        common.write_results(sections, args.device, started, load_start, args.results)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({s.title: s.figures for s in sections}, f, indent=2, default=str)
    print(f"\ntotal {time.time() - started:.0f} s; written to {args.results}")


if __name__ == "__main__":
    main()
