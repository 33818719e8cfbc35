"""Text tables for plans and training results."""

from __future__ import annotations

from planner import Plan, explain

MB = 1_000_000


def device_table(plan: Plan) -> str:
    """Per-device load and HBM, one row each, plus imbalance figures."""
    tables_on: dict[int, list[str]] = {d.device: [] for d in plan.devices}
    for table in plan.tables:
        for shard in table.shards:
            tables_on[shard.device].append(table.name)
    peak = max((d.load_ms for d in plan.devices), default=0.0)
    lines = [f"{'device':>6} {'host':>4} {'load ms':>10} {'of max':>6} "
             f"{'HBM MB':>10} {'of cap':>6} {'tables':>6}"]
    for d in plan.devices:
        share = d.load_ms / peak if peak else 0.0
        used = d.hbm_bytes / d.hbm_capacity_bytes if d.hbm_capacity_bytes else 0.0
        lines.append(f"{d.device:>6} {d.host:>4} {d.load_ms:>10.4f} {share:>6.0%} "
                     f"{d.hbm_bytes / MB:>10.1f} {used:>6.0%} {len(tables_on[d.device]):>6}")
    loads = [d.load_ms for d in plan.devices]
    mean = sum(loads) / len(loads) if loads else 0.0
    lines.append(f"load imbalance (max / mean): {peak / mean if mean else 1.0:.3f}")
    return "\n".join(lines)


def solve_summary(plan: Plan) -> str:
    """The plan's certificate in one line. "Optimal" only with a proof (the objective
    meets a proven lower bound), whatever status an older plan file recorded; plans
    without a bound (baselines, re-costed plans) say so instead of a gap."""
    s = plan.solve
    head = s.method if s.solver == "none" else f"{s.method} via {s.solver}"
    gap = s.gap
    if gap is None:
        return (f"{head}: slowest device {s.objective_ms:.4f} ms/step; no lower bound, so no "
                f"gap (this plan proves nothing about the best possible one; the ILP planner "
                f"reports a bound); made in {s.solve_seconds:.2f} s")
    verdict = "Optimal (proven)" if s.proven_optimal else "Feasible"
    stop = ""
    if s.stop_reason is not None:
        target = "" if s.target_gap is None else f", target gap {s.target_gap:.2%}"
        stop = f"; stopped: {s.stop_reason.value}{target}"
    return (f"{head}: {verdict}; slowest device {s.objective_ms:.4f} ms/step, lower bound "
            f"{s.lower_bound_ms:.4f} ms, gap {gap:.2%}{stop}; solved in {s.solve_seconds:.2f} s")


def _devices(shards) -> str:
    devices = sorted({s.device for s in shards})
    if len(devices) > 3 and devices == list(range(devices[0], devices[-1] + 1)):
        return f"{devices[0]}-{devices[-1]}"
    return ",".join(map(str, devices))


def table_choices(plan: Plan) -> str:
    """One line per table: sharding, where its shards went, predicted cost, and why."""
    lines = [f"{'table':<20} {'sharding':<14} {'devices':<9} {'tier':<11} {'ms':>9} "
             f"{'HBM MB':>9}  why"]
    for t in plan.tables:
        tiers = ",".join(sorted({s.tier.value for s in t.shards}))
        lines.append(f"{t.name:<20} {t.sharding.value:<14} {_devices(t.shards):<9} {tiers:<11} "
                     f"{t.cost.total_ms:>9.4f} {t.cost.hbm_bytes / MB:>9.2f}  {explain(plan, t)}")
    return "\n".join(lines)


_PHASES = (("lookup", "lookup_ms"), ("communication", "communication_ms"),
           ("dense (MLPs, interaction)", "dense_ms"),
           ("update (emb. backward+optimizer)", "update_ms"), ("step", "step_ms"))


STEAL_WARNING = 0.05
"""Share of CPU time taken by other VMs during a run above which the report says so."""


def _ratio(measured: float | None, predicted: float | None) -> str:
    if measured is None or not predicted:
        return ""
    error = (measured - predicted) / predicted
    return f"{error:+.0%}" if abs(error) < 10 else f"x{measured / predicted:.0f}"


def measured_vs_predicted(measured: dict, predicted: dict) -> str:
    """The runtime's measured time per step (and embedding memory) beside the plan's
    prediction, from the ``timing`` record of a metrics log (``measured`` and
    ``predicted`` objects): the mean and the median step of each phase; the error is
    the median's (the prediction is of a steady step; the mean also counts the first,
    cold steps), or the mean's in logs written before medians were recorded."""
    steps = measured.get("steps", 0)
    medians = dict(measured.get("median_phase_ms") or {})
    if medians and measured.get("median_step_ms"):
        medians["step"] = measured["median_step_ms"]
    lines = [f"time per step over {steps} timed steps (ms)      mean    median  predicted  error"]
    for label, key in _PHASES:
        m, p = measured.get(key), predicted.get(key)
        median = medians.get(key.removesuffix("_ms"))
        shown_p = "unknown" if p is None else f"{p:.3f}"
        shown_median = "" if median is None else f"{median:.3f}"
        judged = m if median is None else median
        lines.append(f"  {label:<35}{m:>9.3f} {shown_median:>9}  {shown_p:>9}  "
                     f"{_ratio(judged, p):>5}")
    if not predicted.get("calibrated", True):
        lines.append("  (the plan's topology is not calibrated: its rates describe other hardware; "
                     "plan with a topology from dlrm-plan calibrate to predict this machine)")
    if predicted.get("dense_ms") is None:
        lines.append("  (no dense prediction: the plan's topology has no device.dense_gflops; "
                     "measure it with dlrm-plan calibrate)")
    held = measured.get("embedding_bytes")
    planned = predicted.get("hbm_bytes", 0) + predicted.get("dram_bytes", 0)
    if held is not None:
        lines.append(f"  embedding memory (MB)              {held / MB:>9.2f} {'':>9}  "
                     f"{planned / MB:>9.2f}  {_ratio(held, planned):>5}")
    lines.append(f"  data loading, not in the step      {measured.get('data_ms', 0.0):>9.3f}")
    stolen = measured.get("steal_share")
    if stolen is not None and stolen > STEAL_WARNING:
        lines.append(f"  (other VMs took {stolen:.0%} of this machine's CPU time during the run "
                     f"(steal): the measured times include that; measure again when it is quiet)")
    lines.append(f"  predicted for plan devices {predicted.get('devices')} by "
                 f"{predicted.get('cost_model')}")
    return "\n".join(lines)
