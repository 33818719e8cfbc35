"""Criteo Terabyte on many devices: hosts of 4 devices, a global batch of 65,536 samples
(``ceil(65536 / devices)`` per device), planned with default options under the default
cost model. Reports per host count the plan, the proven lower bound, their gap, why the
search stopped and the wall time, and the capacity answer for a 0.75 ms target.

    .venv/bin/python bench/many_devices.py
    .venv/bin/python bench/many_devices.py --hosts 17 34

Writes bench/results/many_devices.json.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.workloads import topology
from planner import capacity, load_tables, plan

GLOBAL_BATCH = 65536
DEVICES_PER_HOST = 4
TARGET_MS = 0.75
DEFAULT_HOSTS = (8, 12, 17, 20, 24, 28, 34)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hosts", type=int, nargs="*", default=list(DEFAULT_HOSTS))
    parser.add_argument("-o", "--output", default=str(ROOT / "bench" / "results" /
                                                      "many_devices.json"))
    args = parser.parse_args(argv)
    tables = load_tables(ROOT / "examples" / "criteo_terabyte.tables.json")
    base = replace(topology(8), hosts=1, devices_per_host=DEVICES_PER_HOST)
    rows = []
    print(f"{'hosts':>5} {'devices':>7} {'plan ms':>9} {'bound ms':>9} {'gap':>6} "
          f"{'stop':>12} {'wall s':>6}")
    for hosts in args.hosts:
        devices = hosts * DEVICES_PER_HOST
        topo = replace(base, hosts=hosts, batch_size_per_device=math.ceil(GLOBAL_BATCH / devices))
        start = time.perf_counter()
        solve = plan(tables, topo).solve
        wall = time.perf_counter() - start
        gap = (solve.objective_ms - solve.lower_bound_ms) / solve.lower_bound_ms
        rows.append({"hosts": hosts, "devices": devices,
                     "batch_size_per_device": topo.batch_size_per_device,
                     "objective_ms": solve.objective_ms, "lower_bound_ms": solve.lower_bound_ms,
                     "gap": gap, "stop_reason": solve.stop_reason.value, "wall_seconds": wall,
                     "load_average_1min": os.getloadavg()[0]})
        print(f"{hosts:>5} {devices:>7} {solve.objective_ms:>9.4f} {solve.lower_bound_ms:>9.4f} "
              f"{gap:>6.1%} {solve.stop_reason.value:>12} {wall:>6.1f}", flush=True)
    start = time.perf_counter()
    answer = capacity(tables, base, GLOBAL_BATCH, TARGET_MS)
    wall = time.perf_counter() - start
    found = {"target_ms": TARGET_MS, "hosts": answer.hosts,
             "objective_ms": answer.objective_ms, "proven": answer.proven,
             "wall_seconds": wall, "load_average_1min": os.getloadavg()[0]}
    print(f"capacity at {TARGET_MS} ms: {answer.hosts} hosts "
          f"({answer.objective_ms:.4f} ms, proven {answer.proven}) in {wall:.1f} s")
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "machine": platform.platform(), "cpus": os.cpu_count(),
        "workload": f"criteo_terabyte, hosts of {DEVICES_PER_HOST} x 80 GB, global batch "
                    f"{GLOBAL_BATCH}, default cost model and options",
        "command": "python bench/many_devices.py " + " ".join(sys.argv[1:] if argv is None
                                                              else argv),
        "note": "shared machine: other processes ran meanwhile (load averages per row)",
        "rows": rows, "capacity": found}, indent=1) + "\n")
    print(f"written {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
