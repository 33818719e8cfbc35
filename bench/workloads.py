"""Workloads of the planner benchmark: the shared examples and generated table sets."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np

from planner import (
    AccessProfile,
    DeviceSpec,
    TableSpec,
    TablesSpec,
    Topology,
    load_tables,
    load_topology,
)

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "workloads"


def generated_tables(num_tables: int, seed: int = 0, dim: int = 64) -> TablesSpec:
    """Log-normal rows clipped to 1e3..1e8, pooling 1..100 (log-uniform), Zipf access
    with exponents 0.8..1.3."""
    rng = np.random.default_rng(seed)
    rows = np.clip(np.exp(rng.normal(np.log(3e5), 2.0, num_tables)), 1e3, 1e8).astype(int)
    pooling = np.exp(rng.uniform(0.0, np.log(100.0), num_tables))
    zipf = rng.uniform(0.8, 1.3, num_tables)
    tables = tuple(
        TableSpec(f"table_{i}", int(rows[i]), dim, round(float(pooling[i]), 2),
                  access=AccessProfile(zipf=round(float(zipf[i]), 3)))
        for i in range(num_tables)
    )
    return TablesSpec(tables, f"{num_tables} generated tables, seed {seed}")


def topology(devices: int, hbm_gb: float = 80.0, devices_per_host: int = 8,
             batch_size_per_device: int = 2048) -> Topology:
    """Hosts of 8 devices (fewer when ``devices`` < 8) with the shared example's bandwidths."""
    base = load_topology(ROOT / "examples" / "criteo_kaggle.topology.json")
    per_host = min(devices, devices_per_host)
    return replace(base, hosts=devices // per_host, devices_per_host=per_host,
                   device=DeviceSpec(hbm_gb, base.device.hbm_gbps),
                   batch_size_per_device=batch_size_per_device,
                   reserved_hbm_gb=min(base.reserved_hbm_gb, hbm_gb / 4))


def workloads() -> dict[str, tuple[TablesSpec, Topology]]:
    kaggle = load_tables(ROOT / "examples" / "criteo_kaggle.tables.json")
    terabyte = load_tables(ROOT / "examples" / "criteo_terabyte.tables.json")
    return {
        "criteo_kaggle_8x80": (kaggle, topology(8)),
        "criteo_terabyte_8x80": (terabyte, topology(8, batch_size_per_device=8192)),
        "criteo_terabyte_4x4": (terabyte, topology(4, hbm_gb=4.0, batch_size_per_device=8192)),
        # Memory-constrained with feasible baselines: 4 x 22 GB of usable HBM for
        # 104.5 GB of tables, so some rows must be cached, yet the baselines' 20 %
        # caches of the 20.5 GB tables (4.2 GB each) fit.
        "criteo_terabyte_4x24": (terabyte, topology(4, hbm_gb=24.0, batch_size_per_device=8192)),
        "gen800_8x80": (generated_tables(800), topology(8)),
        "gen800_16x80": (generated_tables(800), topology(16)),
        "gen800_128x80": (generated_tables(800), topology(128)),
        "gen4096_1024x80": (generated_tables(4096), topology(1024)),
    }


if __name__ == "__main__":  # pragma: no cover
    for name, (tables, topo) in workloads().items():
        total = sum(t.weight_bytes for t in tables.tables)
        print(name, len(tables.tables), topo.world_size, f"{total / 1e9:.1f} GB",
              f"{topo.usable_hbm_bytes * topo.world_size / 1e9:.0f} GB HBM")
