"""Per-device load and memory bars of a plan, drawn with matplotlib (optional extra)."""

from __future__ import annotations

from pathlib import Path

from planner import Plan, PlannerError


def draw_chart(plan: Plan, path: str | Path) -> None:
    """Two bar charts sharing the device axis: predicted load (ms/step, with the lower
    bound as a line) and HBM use (with the capacity as a line)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise PlannerError("--chart needs matplotlib: pip install 'dlrm-toolkit[chart]'") from None
    devices = [d.device for d in plan.devices]
    fig, (load_ax, mem_ax) = plt.subplots(2, 1, sharex=True,
                                          figsize=(max(6.0, 0.25 * len(devices)), 6.0))
    load_ax.bar(devices, [d.load_ms for d in plan.devices], color="tab:blue")
    if plan.solve.lower_bound_ms is not None:
        load_ax.axhline(plan.solve.lower_bound_ms, color="tab:red", linestyle="--",
                        label=f"lower bound {plan.solve.lower_bound_ms:.4g} ms")
        load_ax.legend(loc="lower right")
    load_ax.set_ylabel("predicted ms / step")
    gap = "no bound" if plan.solve.gap is None else f"gap {plan.solve.gap:.2%}"
    load_ax.set_title(f"{plan.solve.method}: slowest device {plan.solve.objective_ms:.4g} ms, "
                      f"{gap}")
    mem_ax.bar(devices, [d.hbm_bytes / 1e9 for d in plan.devices], color="tab:green")
    mem_ax.axhline(plan.topology.usable_hbm_bytes / 1e9, color="black", linestyle="--",
                   label="usable HBM")
    mem_ax.set_ylabel("HBM GB")
    mem_ax.set_xlabel("device")
    mem_ax.legend(loc="lower right")
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
