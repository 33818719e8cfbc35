"""``dlrm-plan capacity``, ``dlrm-plan diff`` and re-planning (``dlrm-plan --from``):
parsers and handlers, thin shells over planner.capacity, planner.diff_plans and planner.replan."""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from cli.errors import EXIT_CODES_HELP, ExitCode
from cli.paths import check_not_inputs, check_output_file
from cli.progress import status_line
from planner import (
    GB,
    CapacityResult,
    ChangeKind,
    HostTrial,
    PlanDiff,
    Plan,
    PlanOptions,
    PlannerError,
    ReplanResult,
    TablesSpec,
    TargetUnreachableError,
    Tier,
    Topology,
    capacity,
    check_replan,
    diff_plans,
    load_cost_model,
    load_tables,
    load_topology,
    read_plan,
    replan,
    write_json_atomic,
    write_plan,
)
from planner.tools import sweep

PROG = "dlrm-plan"
MB = 1_000_000


# ---------------------------------------------------------------- capacity


def build_capacity_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=f"{PROG} capacity",
        description="Find the fewest hosts of the topology's kind whose plan runs a step of\n"
                    "the global batch (per device: the batch over the devices, rounded up)\n"
                    "within the target, write that plan and a report proving that one host\n"
                    "fewer cannot (its lower bound is above the target, or the tables do not\n"
                    "fit). The topology's hosts and batch_size_per_device are ignored.",
        epilog="example:\n  dlrm-plan capacity --tables T.json --topology P.json --global-batch "
               "65536 \\\n      --target-ms 20 -o capacity.json --sweep --chart capacity.png\n\n"
               "Times are the planner's objective: the slowest device's embedding step\n"
               "(lookup, communication, backward, optimizer); samples/s = global batch / that "
               "time.\n" + EXIT_CODES_HELP + "\n(3 also when no host count up to --max-hosts "
               "meets the target)",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tables", required=True, metavar="TABLES", help="tables spec")
    parser.add_argument("--topology", required=True, metavar="TOPOLOGY",
                        help="topology spec: one host's kind (devices per host, HBM, "
                             "bandwidths)")
    parser.add_argument("--global-batch", required=True, type=int, metavar="N",
                        help="samples per training step over all devices")
    parser.add_argument("--target-ms", required=True, type=float, metavar="MS",
                        help="the slowest device's embedding step time to reach (ms)")
    parser.add_argument("-o", "--output", required=True, metavar="OUT.json",
                        help="capacity report (JSON: devices, objective_ms, "
                             "lower_bound_ms_with_fewer, hosts, status, ...); written only on "
                             "success")
    parser.add_argument("--plan", metavar="PLAN",
                        help="where to write the plan for the answer (default: OUT with "
                             "'.plan.json' in place of '.json')")
    parser.add_argument("--max-hosts", type=int, default=64, metavar="H",
                        help="give up beyond this many hosts (default: %(default)s)")
    parser.add_argument("--sweep", action="store_true",
                        help="also plan every host count from 1 to twice the answer (at most "
                             "--max-hosts) and print ms/step and samples/s against hosts")
    parser.add_argument("--chart", metavar="FILE.png",
                        help="with --sweep: draw ms/step and samples/s against hosts (needs "
                             "matplotlib)")
    parser.add_argument("--time-limit", type=float, default=60.0, metavar="SECONDS",
                        help="planner time limit per host count planned; a bound takes at "
                             "most a quarter of it (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=1, help="solver threads (default: 1)")
    parser.add_argument("--solver", choices=("cbc", "highs"), default="cbc",
                        help="MIP solver: cbc (bundled with PuLP) or highs (needs highspy)")
    parser.add_argument("--cost-model", metavar="MODULE:CLASS",
                        help="your own cost model class (default: the analytic model)")
    parser.add_argument("-q", "--quiet", action="store_true", help="print only errors")
    parser.add_argument("--verbose", action="store_true", help="show tracebacks of errors")
    return parser


def run_capacity(args: argparse.Namespace) -> int:
    _check_capacity_flags(args)
    plan_path = args.plan or _default_plan_path(args.output)
    outputs = {"-o/--output": args.output, "--plan": plan_path, "--chart": args.chart}
    check_not_inputs(outputs, {"--tables": args.tables, "--topology": args.topology})
    for flag, path in outputs.items():
        if path is not None:
            check_output_file(path, flag)
    tables = load_tables(args.tables)
    topology = load_topology(args.topology)
    model = load_cost_model(args.cost_model) if args.cost_model else None
    options = PlanOptions(time_limit_s=args.time_limit, threads=args.threads, solver=args.solver)
    with status_line(args.quiet) as say:
        say(f"capacity: {len(tables.tables)} tables, hosts of {topology.devices_per_host} "
            f"device(s), global batch {args.global_batch}, target {args.target_ms:g} ms")
        unreachable: TargetUnreachableError | None = None
        try:
            result: CapacityResult | None = capacity(
                tables, topology, args.global_batch, args.target_ms, max_hosts=args.max_hosts,
                cost_model=model, options=options, progress=say)
        except TargetUnreachableError as exc:
            if not args.sweep:
                raise
            result, unreachable = None, exc
        trials: tuple[HostTrial, ...] = ()
        if args.sweep:
            last = args.max_hosts if result is None else min(args.max_hosts, 2 * result.hosts)
            trials = sweep(tables, topology, args.global_batch, range(1, last + 1),
                           cost_model=model, options=options, progress=say)
    if trials and not args.quiet:
        print(sweep_table(trials, args.global_batch, args.target_ms))
    if args.chart and trials and result is not None:  # no chart of a failed search
        draw_sweep(trials, args.global_batch, args.target_ms, args.chart, result.hosts)
        if not args.quiet:
            print(f"chart written to {args.chart}")
    if unreachable is not None or result is None:  # the sweep is shown; now the error
        raise unreachable or PlannerError("no capacity result")
    report = result.to_json(plan_path)
    if trials:
        report["sweep"] = [t.to_json() for t in trials]
    write_plan(result.plan, plan_path)
    write_json_atomic(report, args.output)
    if not args.quiet:
        print(capacity_summary(result))
        print(f"plan written to {plan_path}, report to {args.output}")
    return ExitCode.OK


def _check_capacity_flags(args: argparse.Namespace) -> None:
    if args.global_batch < 1:
        raise PlannerError(f"--global-batch must be >= 1, got {args.global_batch}")
    if not (math.isfinite(args.target_ms) and args.target_ms > 0):
        raise PlannerError(f"--target-ms must be a finite number > 0, got {args.target_ms}")
    if args.max_hosts < 1:
        raise PlannerError(f"--max-hosts must be >= 1, got {args.max_hosts}")
    if not (math.isfinite(args.time_limit) and args.time_limit > 0):
        raise PlannerError(f"--time-limit must be > 0, got {args.time_limit}")
    if args.threads < 1:
        raise PlannerError(f"--threads must be >= 1, got {args.threads}")
    if args.chart and not args.sweep:
        raise PlannerError("--chart draws the sweep: add --sweep")


def _default_plan_path(output: str) -> str:
    path = Path(output)
    stem = path.name[:-5] if path.name.endswith(".json") else path.name
    return str(path.with_name(f"{stem}.plan.json"))


def capacity_summary(result: CapacityResult) -> str:
    lines = [f"{result.hosts} host(s) = {result.devices} devices, {result.batch_size_per_device} "
             f"samples each: slowest device {result.objective_ms:.4f} ms/step <= target "
             f"{result.target_ms:g} ms ({result.global_batch / (result.objective_ms / 1e3):,.0f} "
             f"samples/s)" if result.objective_ms > 0 else
             f"{result.hosts} host(s) = {result.devices} devices"]
    proof = result.to_json()["proof"]
    lines.append(("proven: " if result.proven else "warning: ") + proof)
    if result.proven and result.hosts > 1:
        lines.append("every smaller host count is excluded too" if result.all_fewer_excluded
                     else "(some smaller host counts were not excluded by their bounds)")
    lines.append(f"searched in {result.seconds:.1f} s")
    return "\n".join(lines)


def sweep_table(trials: tuple[HostTrial, ...], global_batch: int, target_ms: float) -> str:
    lines = [f"{'hosts':>5} {'devices':>7} {'batch/dev':>9} {'ms/step':>10} {'samples/s':>12} "
             f"{'meets':>5}"]
    for t in trials:
        if t.objective_ms is None:
            lines.append(f"{t.hosts:>5} {t.devices:>7} {t.batch_size_per_device:>9} "
                         f"{'no plan':>10}")
            continue
        lines.append(f"{t.hosts:>5} {t.devices:>7} {t.batch_size_per_device:>9} "
                     f"{t.objective_ms:>10.4f} {t.samples_per_s or 0.0:>12,.0f} "
                     f"{'yes' if t.objective_ms <= target_ms else 'no':>5}")
    return "\n".join(lines)


def draw_sweep(trials: tuple[HostTrial, ...], global_batch: int, target_ms: float,
               path: str, answer: int | None) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise PlannerError("--chart needs matplotlib: pip install 'dlrm-toolkit[chart]'") from None
    planned = [t for t in trials if t.objective_ms is not None]
    hosts = [t.hosts for t in planned]
    fig, (time_ax, rate_ax) = plt.subplots(2, 1, sharex=True, figsize=(7.0, 6.0))
    time_ax.plot(hosts, [t.objective_ms for t in planned], marker="o", label="plan")
    time_ax.plot(hosts, [t.plan_lower_bound_ms for t in planned], linestyle=":",
                 color="tab:gray", label="plan's lower bound")
    time_ax.axhline(target_ms, color="tab:red", linestyle="--", label=f"target {target_ms:g} ms")
    if answer is not None:
        time_ax.axvline(answer, color="tab:green", linestyle="--",
                        label=f"answer: {answer} host(s)")
    time_ax.set_ylabel("ms / step (slowest device)")
    time_ax.set_title(f"global batch {global_batch}")
    time_ax.legend(loc="best")
    rate_ax.plot(hosts, [t.samples_per_s for t in planned], marker="o", color="tab:purple")
    rate_ax.set_ylabel("samples / s")
    rate_ax.set_xlabel("hosts")
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ---------------------------------------------------------------- diff


def build_diff_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=f"{PROG} diff",
        description="Compare plan B against plan A: the tables that move, the bytes (weights "
                    "and optimizer state) that must arrive at and leave each device (a piece "
                    "migrates when it lands on another device or tier), and the predicted "
                    "change of each device's load and of the slowest. Each plan is costed as "
                    "its file says.",
        epilog=EXIT_CODES_HELP)
    parser.add_argument("old", metavar="A", help="the plan before")
    parser.add_argument("new", metavar="B", help="the plan after")
    parser.add_argument("-o", "--output", metavar="DIFF.json", help="also write the diff as JSON")
    parser.add_argument("--all", action="store_true",
                        help="list every device and table, not only those that change")
    parser.add_argument("--verbose", action="store_true", help="show tracebacks of errors")
    return parser


def run_diff(args: argparse.Namespace) -> int:
    check_not_inputs({"-o/--output": args.output}, {"A": args.old, "B": args.new})
    if args.output:
        check_output_file(args.output, "-o/--output")
    diff = diff_plans(read_plan(args.old), read_plan(args.new))
    print(diff_report(diff, show_all=args.all))
    if args.output:
        write_json_atomic(diff.to_json(), args.output)
        print(f"diff written to {args.output}")
    return ExitCode.OK


def diff_report(diff: PlanDiff, show_all: bool = False) -> str:
    counts = {kind: sum(t.kind is kind for t in diff.tables) for kind in ChangeKind}
    lines = [f"slowest device: {diff.old_objective_ms:.4f} -> {diff.new_objective_ms:.4f} ms/step "
             f"({diff.objective_change:+.1%})",
             f"tables: {counts[ChangeKind.MOVED]} moved, {counts[ChangeKind.RESHARDED]} resharded "
             f"without moving bytes, {counts[ChangeKind.UNCHANGED]} unchanged, "
             f"{counts[ChangeKind.ADDED]} added, {counts[ChangeKind.REMOVED]} removed, "
             f"{counts[ChangeKind.REPLACED]} replaced (new shape); "
             f"{diff.migrated_bytes / MB:,.1f} MB to migrate"]
    differs = [what for what, same in (("tables spec", diff.same_tables_spec),
                                       ("topology", diff.same_topology),
                                       ("cost model", diff.same_cost_model)) if not same]
    if differs:
        lines.append(f"note: the plans differ in {', '.join(differs)}; each is costed under "
                     f"its own")
    lines.append(f"{'device':>6} {'old ms':>10} {'new ms':>10} {'change':>10} {'in MB':>10} "
                 f"{'out MB':>10}")
    for d in diff.devices:
        if not (show_all or d.bytes_in or d.bytes_out or abs(d.delta_ms) > 1e-12):
            continue
        old = "-" if d.old_load_ms is None else f"{d.old_load_ms:.4f}"
        new = "-" if d.new_load_ms is None else f"{d.new_load_ms:.4f}"
        lines.append(f"{d.device:>6} {old:>10} {new:>10} {d.delta_ms:>+10.4f} "
                     f"{d.bytes_in / MB:>10.1f} {d.bytes_out / MB:>10.1f}")
    shown = [t for t in diff.tables if show_all or t.kind is not ChangeKind.UNCHANGED]
    if shown:
        lines.append(f"{'table':<24} {'change':<10} {'sharding':<32} {'tier':<26} "
                     f"{'devices':<24} {'moved MB':>9}")
        for t in shown:
            old = t.old_sharding.value if t.old_sharding else "-"
            new = t.new_sharding.value if t.new_sharding else "-"
            tiers = f"{_tier_names(t.old_tiers)} -> {_tier_names(t.new_tiers)}"
            lines.append(f"{t.name:<24} {t.kind.value:<10} {old + ' -> ' + new:<32} "
                         f"{tiers:<26} "
                         f"{_span(t.old_devices) + ' -> ' + _span(t.new_devices):<24} "
                         f"{t.moved_bytes / MB:>9.1f}")
    return "\n".join(lines)


def _tier_names(tiers: tuple[Tier, ...]) -> str:
    return "+".join(t.value for t in tiers) or "-"


def _span(devices: tuple[int, ...]) -> str:
    if not devices:
        return "-"
    if len(devices) > 3 and list(devices) == list(range(devices[0], devices[-1] + 1)):
        return f"{devices[0]}-{devices[-1]}"
    return ",".join(map(str, devices[:4])) + (",..." if len(devices) > 4 else "")


# ---------------------------------------------------------------- re-planning


def add_replan_flags(parser: argparse.ArgumentParser) -> None:
    """``--from`` and ``--max-migrate-gb`` of the main plan command."""
    parser.add_argument("--from", dest="from_plan", metavar="OLD_PLAN",
                        help="re-plan from this plan for the new --tables/--topology (e.g. a "
                             "drifted access profile; same tables and devices), and report the "
                             "gain against keeping the old placement")
    parser.add_argument("--max-migrate-gb", type=float, metavar="GB",
                        help="with --from: move at most this many GB (1e9 bytes) of table "
                             "shards, optimizer state included, to another device or tier "
                             "(default: no limit)")


def check_replan_flags(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Exit 2 (through ``parser.error``) on flags that do not go together."""
    if args.max_migrate_gb is not None and args.from_plan is None:
        parser.error("--max-migrate-gb needs --from OLD_PLAN")
    if args.max_migrate_gb is not None and not (math.isfinite(args.max_migrate_gb)
                                                and args.max_migrate_gb >= 0):
        parser.error(f"--max-migrate-gb must be a finite number >= 0, got {args.max_migrate_gb}")
    if args.from_plan is not None and args.baseline is not None:
        parser.error("--from re-plans with the ILP; drop --baseline")


def _budget(args: argparse.Namespace) -> int | None:
    return None if args.max_migrate_gb is None else int(args.max_migrate_gb * GB)


def checked_replan(args: argparse.Namespace, tables: TablesSpec, topology: Topology,
                   options: PlanOptions) -> Plan:
    """The ``--from`` plan, read and checked against the new inputs before any work."""
    old = read_plan(args.from_plan)
    check_replan(old, tables, topology, _budget(args), options)
    return old


def run_replan(args: argparse.Namespace, old: Plan, tables: TablesSpec, topology: Topology,
               model, options: PlanOptions) -> int:
    result = replan(old, tables, topology, max_migrate_bytes=_budget(args), cost_model=model,
                    options=options)
    write_plan(result.plan, args.output)
    if not args.quiet:
        print(replan_summary(result))
        print(f"plan written to {args.output}")
    return ExitCode.OK


def replan_summary(result: ReplanResult) -> str:
    stay, new = result.stay.solve.objective_ms, result.plan.solve.objective_ms
    budget = ("no limit" if result.budget_bytes is None
              else f"budget {result.budget_bytes / GB:g} GB")
    lines = [f"staying (old placement under the new specs): {stay:.4f} ms/step"
             + ("" if result.stay_fits else " (overflows the new topology's memory)")]
    if result.fresh is not None:
        lines.append(f"fresh plan (no budget): {result.fresh.solve.objective_ms:.4f} ms/step, "
                     f"moves {(result.fresh_migrated_bytes or 0) / GB:.3f} GB")
    if result.kept_old:
        lines.append(f"kept the old placement: nothing faster fits ({budget})")
    else:
        lines.append(f"re-planned: {new:.4f} ms/step, moves {result.migrated_bytes / GB:.3f} GB "
                     f"({budget})")
    lines.append(f"gain against staying: {result.gain_ms:.4f} ms/step ({result.gain:.1%}); "
                 f"lower bound {result.plan.solve.lower_bound_ms:.4f} ms")
    return "\n".join(lines)


__all__ = ["add_replan_flags", "build_capacity_parser", "build_diff_parser",
           "check_replan_flags", "checked_replan", "run_capacity", "run_diff", "run_replan"]
