"""Run the fuzzer for many examples and log every case that fails, instead of stopping at the first.

    uv run python -m tests.fuzz.run --examples 2000 --seed 7 --log fuzz-7.jsonl

Each line of the log is one failing or refused case: its model, the outcome and the error. A summary
(graphs, compiled, refused, rolled-back stages, failures by kind) is printed at the end.
"""

from __future__ import annotations

import argparse
import json
import time
import traceback
from collections import Counter

from hypothesis import HealthCheck, Phase, given, seed, settings

from tests.fuzz.check import check_case
from tests.fuzz.models import fuzz_cases


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--examples", type=int, default=500)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-blocks", type=int, default=5)
    parser.add_argument("--log", default="fuzz.jsonl")
    args = parser.parse_args()
    tally: Counter = Counter()
    start = time.perf_counter()

    @seed(args.seed)
    @settings(max_examples=args.examples, deadline=None, database=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(fuzz_cases(max_blocks=args.max_blocks))
    def one(case):
        tally["graphs"] += 1
        t0 = time.perf_counter()
        record = {"case": repr(case)}
        try:
            outcome = check_case(case)
            tally[outcome.status] += 1
            record.update(status=outcome.status, error=outcome.error, rolled_back=outcome.rolled_back)
            tally["rolled_back"] += bool(outcome.rolled_back)
            keep = outcome.status == "refused" or outcome.rolled_back
        except Exception as exc:  # noqa: BLE001 - every failure is logged, the run goes on
            tally["failed"] += 1
            tally[f"failed {type(exc).__name__}"] += 1
            record.update(status="failed", error=f"{type(exc).__name__}: {exc}"[:3000],
                          trace=traceback.format_exc()[-4000:])
            keep = True
        record["seconds"] = round(time.perf_counter() - t0, 2)
        if keep:
            with open(args.log, "a") as log:
                log.write(json.dumps(record) + "\n")
        if tally["graphs"] % 25 == 0:
            print(f"{tally['graphs']} graphs, {time.perf_counter() - start:.0f} s: {dict(tally)}", flush=True)

    one()
    elapsed = time.perf_counter() - start
    print(f"done: {dict(tally)} in {elapsed:.0f} s ({elapsed / max(1, tally['graphs']):.2f} s per graph)")


if __name__ == "__main__":
    main()
