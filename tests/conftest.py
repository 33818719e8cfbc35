"""Shared fixtures: small specs written to files, as users write them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest


def small_tables_doc(num_tables: int = 4, rows: int = 500, dim: int = 8) -> dict:
    return {
        "description": "test tables",
        "tables": [
            {
                "name": f"t{i}",
                "num_embeddings": rows * (i + 1),
                "embedding_dim": dim,
                "pooling_factor": float(1 + i % 3),
                "dtype": "fp32",
                "access": {"zipf": 1.1},
            }
            for i in range(num_tables)
        ],
    }


def small_topology_doc(devices: int = 2, hbm_gb: float = 0.001, hosts: int = 1) -> dict:
    return {
        "hosts": hosts,
        "devices_per_host": devices,
        "device": {"hbm_gb": hbm_gb, "hbm_gbps": 100.0},
        "host": {"dram_gb": 1.0, "dram_gbps": 20.0, "h2d_gbps": 10.0},
        "store": {"read_gbps": 1.0, "write_gbps": 0.5},
        "network": {"intra_host_gbps": 50.0, "inter_host_gbps": 10.0},
        "batch_size_per_device": 32,
        "reserved_hbm_gb": 0.0,
    }


def write_json(path: Path, doc: object) -> Path:
    path.write_text(json.dumps(doc))
    return path


@pytest.fixture
def tables_file(tmp_path: Path) -> Path:
    return write_json(tmp_path / "tables.json", small_tables_doc())


@pytest.fixture
def topology_file(tmp_path: Path) -> Path:
    return write_json(tmp_path / "topology.json", small_topology_doc())
