"""``dlrm-plan``: write a sharding plan for a tables spec on a topology, or show one."""

from __future__ import annotations

import argparse
import json
import os
import sys
import textwrap
from collections.abc import Sequence
from pathlib import Path

from cli import plan_tools
from cli.chart import draw_chart
from cli.errors import EXIT_CODES_HELP, ExitCode, UsageError, one_line_parse_errors, run_guarded
from cli.paths import (
    check_input_file,
    check_not_inputs,
    check_output_dir,
    check_output_file,
    write_output,
)
from cli.progress import bytes_progress
from cli.report import device_table, measured_vs_predicted, solve_summary, table_choices
from planner import (
    BASELINES,
    DEFAULT_GAP,
    DEFAULT_STALL_S,
    NO_CONSTRAINTS,
    AnalyticCostModel,
    OptionSettings,
    PlanFileError,
    PlanOptions,
    Sharding,
    Tier,
    check_plan_fits,
    check_plan_inputs,
    cost_model_name,
    evaluate_plan,
    from_torchrec,
    load_constraints,
    load_cost_model,
    load_tables,
    load_topology,
    parse_topology,
    plan,
    plan_sha256,
    read_plan,
    to_torchrec,
    write_json_atomic,
    write_plan,
)
from planner.tools import DEVICES, check_module_path, recut_tables

PROG = "dlrm-plan"

EXAMPLES = """\
examples:
  dlrm-plan --tables examples/demo/tables.json --topology examples/demo/topology.json -o plan.json
  dlrm-plan --tables examples/criteo_kaggle.tables.json \\
            --topology examples/criteo_kaggle.topology.json -o criteo.plan.json --time-limit 30
  dlrm-plan show plan.json

The tables spec lists, per table, name, num_embeddings, embedding_dim, pooling_factor
(mean ids per sample), dtype (fp32|fp16|bf16) and optionally access ({"zipf": s} or
{"hot_rows": [...], "share": [...]}) and optimizer (sgd|rowwise_adagrad|adam). The
topology gives hosts, devices_per_host, device {hbm_gb, hbm_gbps}, host {dram_gb,
dram_gbps, h2d_gbps}, store {read_gbps, write_gbps}, network {intra_host_gbps,
inter_host_gbps, optional collective_latency_us}, batch_size_per_device and
reserved_hbm_gb. GB = 1e9 bytes.

  dlrm-plan ... --baseline greedy          # a greedy baseline instead of the ILP
  dlrm-plan ... --sharding table_wise,row_wise --tiers hbm   # restrict the options
  dlrm-plan evaluate plan.json --cost-model my_models:Calibrated --topology other.json

subcommands:
  profile DATA --tables T -o OUT   measure access profiles from Criteo TSV data
  calibrate -o TOPOLOGY   measure this machine's bandwidths into a topology file
  show PLAN       per-device load and memory, each table's placement and why
  evaluate PLAN   re-cost a plan (any plan file, hand-written too, or a TorchRec
                  plan with --format torchrec) under a cost model and topology, to
                  compare plans from different tools; checks HBM and DRAM capacity
  export PLAN --format torchrec -o FILE.json
                  the plan as TorchRec ParameterSharding fields per table
  capacity        fewest hosts whose plan meets a step time (--global-batch, --target-ms)
  diff A B        tables moved, bytes to migrate per device, change of each device's load
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Assign embedding tables to devices with an ILP that minimises the slowest "
                    "device's predicted step time under each device's HBM, and write the plan "
                    "with its proven lower bound and gap.",
        epilog=EXAMPLES + "\n" + EXIT_CODES_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--tables", required=True, metavar="TABLES",
                        help="tables spec (.json, or .toml on Python >= 3.11)")
    parser.add_argument("--topology", required=True, metavar="TOPOLOGY",
                        help="topology spec (.json or .toml)")
    parser.add_argument("-o", "--output", required=True, metavar="PLAN",
                        help="where to write the plan (JSON); written only on success, "
                             "creating missing directories (and saying so)")
    parser.add_argument("--time-limit", type=float, default=60.0, metavar="SECONDS",
                        help="MIP solver wall-clock limit; the best plan found by then is "
                             "written with its gap (default: %(default)s)")
    parser.add_argument("--gap", type=float, default=DEFAULT_GAP, metavar="FRACTION",
                        help="stop once the plan is proven within this relative gap of the "
                             "lower bound, (plan - bound) / bound; 0 searches until optimal, "
                             "a stall or the time limit (default: %(default)s, i.e. 1 %%)")
    parser.add_argument("--stall", type=float, default=DEFAULT_STALL_S, metavar="SECONDS",
                        help="stop when neither the plan nor the lower bound improved over "
                             "this much search work, in CPU seconds of the planner and its "
                             "solver (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=1, help="solver threads (default: 1)")
    parser.add_argument("--solver", choices=("cbc", "highs"), default="cbc",
                        help="MIP solver: cbc (bundled with PuLP) or highs (needs highspy)")
    parser.add_argument("--cost-model", metavar="MODULE:CLASS",
                        help="your own cost model class (see planner.CostModel), importable "
                             "from the current directory or PYTHONPATH; default: the analytic "
                             "model")
    parser.add_argument("--baseline", choices=BASELINES,
                        help="plan with a greedy baseline instead of the ILP: random, size "
                             "(bytes), lookup (dim x pooling), size-lookup (x log10 rows), "
                             "greedy (by modelled cost, like TorchRec's)")
    parser.add_argument("--sharding", type=_enum_list(Sharding), metavar="TYPE,..",
                        default=frozenset(Sharding),
                        help="allowed sharding types (default: all): "
                             + ", ".join(x.value for x in Sharding))
    parser.add_argument("--tiers", type=_enum_list(Tier), metavar="TIER,..", default=frozenset(Tier),
                        help="allowed tiers (default: all): hbm, dram_cache (device cache over "
                             "host DRAM), store_cache (device cache over the zarr store), host "
                             "(rows in host DRAM read over the host link, no device cache; "
                             "TorchRec's fused_uvm)")
    parser.add_argument("--cache-fractions", type=_fractions, metavar="F,..",
                        default=OptionSettings().cache_fractions,
                        help="device cache sizes to consider, as shares of a shard's rows "
                             "(default: 0.01,0.05,0.2,0.5)")
    parser.add_argument("--constraints", metavar="FILE",
                        help="user constraints (JSON/TOML): per table allowed shardings, tiers, "
                             "max_shards, a device or host pin; groups to co-locate; pairs to "
                             "keep apart (see planner/constraints.py)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random baseline")
    plan_tools.add_replan_flags(parser)
    parser.add_argument("-q", "--quiet", action="store_true", help="print only errors")
    parser.add_argument("--verbose", action="store_true", help="show tracebacks of errors")
    return parser


def _enum_list(kind):
    def parse(text: str) -> frozenset:
        try:
            values = frozenset(kind(v.strip()) for v in text.split(",") if v.strip())
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{text!r}: choose from {', '.join(x.value for x in kind)}") from None
        if not values:
            raise argparse.ArgumentTypeError("give at least one value")
        return values
    return parse


def _fractions(text: str) -> tuple[float, ...]:
    try:
        values = tuple(sorted(float(v) for v in text.split(",")))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected numbers like 0.05,0.2, got {text!r}") from None
    if not values or not all(0 < v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"cache fractions must lie in (0, 1), got {text!r}")
    return values


def build_show_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=f"{PROG} show",
                                     description="Show a plan: per-device load and memory, "
                                                 "each table's placement and why.",
                                     epilog=EXIT_CODES_HELP)
    parser.add_argument("plan", metavar="PLAN", help="plan file written by dlrm-plan")
    parser.add_argument("--chart", metavar="FILE.png",
                        help="also draw per-device load and HBM bars (needs matplotlib; "
                             "missing directories are created)")
    parser.add_argument("--measured", metavar="LOG",
                        help="a dlrm-run --metrics-log of this plan: put the measured time per "
                             "step (lookup, communication, dense, update) and embedding memory "
                             "beside the plan's prediction")
    parser.add_argument("--verbose", action="store_true", help="show tracebacks of errors")
    return parser


def build_evaluate_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=f"{PROG} evaluate",
        description=textwrap.fill("Re-cost a plan's shards, where they are, under a cost model and topology, "
                    "so plans from different tools compare under one model. Fails with its own "
                    "exit code, naming the device or host, when the shards overflow a device's "
                    "HBM or a host's DRAM.", 88),
        epilog="example:\n  dlrm-plan evaluate torchrec_plan.json --format torchrec "
               "--tables examples/criteo_kaggle.tables.json \\\n"
               "      --topology examples/criteo_kaggle.topology.json\n\n" + EXIT_CODES_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("plan", metavar="PLAN",
                        help="plan file (from dlrm-plan, by hand, or from TorchRec with "
                             "--format torchrec)")
    parser.add_argument("--format", choices=("plan", "torchrec"), default="plan",
                        help="plan: a dlrm-plan file (inputs_sha256 optional: a present one "
                             "must match); torchrec: TorchRec ParameterSharding fields per "
                             "table, as `dlrm-plan export` writes (needs --tables and "
                             "--topology) (default: %(default)s)")
    parser.add_argument("--tables", metavar="TABLES",
                        help="tables spec (required with --format torchrec; for a dlrm-plan "
                             "file it replaces the embedded one, same tables and sizes)")
    parser.add_argument("--module-path", metavar="PATH",
                        help="with --format torchrec: the module whose tables to read "
                             "(default: every module's)")
    parser.add_argument("--cost-model", metavar="MODULE:CLASS",
                        help="cost model (default: the analytic model)")
    parser.add_argument("--topology", metavar="TOPOLOGY",
                        help="topology to cost on (default: the plan's; required with "
                             "--format torchrec)")
    parser.add_argument("-o", "--output", metavar="PLAN",
                        help="also write the re-costed plan, only when it fits (creating "
                             "missing directories)")
    parser.add_argument("--verbose", action="store_true", help="show tracebacks of errors")
    return parser


def build_export_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=f"{PROG} export",
        description=textwrap.fill("Write a plan as TorchRec 1.8 ShardingPlan fields (JSON): per table "
                    "sharding_type, compute_kernel (hbm: fused, dram_cache/store_cache: "
                    "fused_uvm_caching with cache_params.load_factor, host: fused_uvm, "
                    "data-parallel: dense), ranks and sharding_spec shards (offsets, sizes, "
                    "placement). Row-wise shards are cut into TorchRec's ceil(rows/N) blocks. "
                    "From Python, planner.to_torchrec_sharding_plan builds the "
                    "ShardingPlan object for DistributedModelParallel.", 88),
        epilog="example:\n  dlrm-plan export plan.json --format torchrec -o torchrec_plan.json"
               "\n\n" + EXIT_CODES_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("plan", metavar="PLAN", help="plan file written by dlrm-plan")
    parser.add_argument("--format", choices=("torchrec",), default="torchrec",
                        help="output format (default: %(default)s)")
    parser.add_argument("-o", "--output", required=True, metavar="FILE.json",
                        help="where to write the exported plan (creating missing directories)")
    parser.add_argument("--module-path", default="", metavar="PATH",
                        help="path of the sharded EmbeddingBagCollection in the model, e.g. "
                             "sparse_arch.embedding_bag_collection (default: '', the model is "
                             "the collection)")
    parser.add_argument("--device", choices=DEVICES, default="cuda",
                        help="compute device in the shard placements: cuda (rank:R/cuda:L) or "
                             "cpu (rank:R/cpu, for CPU processes) (default: %(default)s)")
    parser.add_argument("--verbose", action="store_true", help="show tracebacks of errors")
    return parser


def build_profile_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=f"{PROG} profile",
        description="Count row accesses per table over Criteo click logs (TSV: label, 13 "
                    "integer and 26 hex categorical features) and write a tables spec whose "
                    "access profiles (share of lookups served by the hottest k rows) and "
                    "pooling factors are measured. The data is parsed once into a binary "
                    "cache that later runs (and dlrm-run) reuse.",
        epilog="example:\n  dlrm-plan profile day_0.tsv --tables examples/criteo_kaggle.tables.json"
               " -o profiled.tables.json --sample 5000000\n\n" + EXIT_CODES_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("data", metavar="DATA", help="Criteo TSV file")
    parser.add_argument("--tables", required=True, metavar="TABLES",
                        help="tables spec giving the 26 tables' row counts (ids are hashed "
                             "into them)")
    parser.add_argument("-o", "--output", required=True, metavar="TABLES_OUT",
                        help="where to write the tables spec with measured access profiles "
                             "(creating missing directories)")
    parser.add_argument("--cache", metavar="FILE",
                        help="binary cache of the parsed data (default: DATA.cache)")
    parser.add_argument("--sample", type=int, metavar="N", help="count only the first N samples")
    parser.add_argument("--strict", action="store_true",
                        help="stop at the first malformed line instead of counting it")
    parser.add_argument("--verbose", action="store_true", help="show tracebacks of errors")
    return parser


def build_calibrate_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=f"{PROG} calibrate",
        description="Measure this machine (device and host gather, host-to-device copy, store "
                    "reads and writes of random rows, all-to-all between two local processes) "
                    "and write a topology file with the measured rates and the date. Run it on "
                    "a quiet machine: other load lowers every figure.",
        epilog=EXIT_CODES_HELP)
    parser.add_argument("-o", "--output", required=True, metavar="TOPOLOGY",
                        help="where to write the topology file (checked before measuring; "
                             "missing directories are created)")
    parser.add_argument("--hbm-gb", type=float, help="device memory (default: the GPU's; "
                                                     "CPU: half the host memory)")
    parser.add_argument("--dram-gb", type=float, help="host memory (default: /proc/meminfo)")
    parser.add_argument("--devices", type=int, help="devices per host (default: GPUs, else 1)")
    parser.add_argument("--batch-size-per-device", type=int, default=2048, metavar="N",
                        help="batch_size_per_device of the topology written "
                             "(default: %(default)s)")
    parser.add_argument("--reserved-hbm-gb", type=float, default=0.0, metavar="GB",
                        help="reserved_hbm_gb of the topology written: device memory kept "
                             "from the tables (default: %(default)s)")
    parser.add_argument("--inter-host-gbps", type=float,
                        help="network between hosts (not measurable on one host; default: the "
                             "measured all-to-all rate)")
    parser.add_argument("--store-dir", metavar="DIR",
                        help="directory on the disk the store will use (default: the temp dir)")
    parser.add_argument("--threads", type=int, metavar="N",
                        help="torch CPU threads during the probes; use the --threads of the "
                             "dlrm-run whose step times are predicted (default: torch's choice)")
    parser.add_argument("--quick", action="store_true", help="small probes (seconds, noisier)")
    parser.add_argument("--rounds", type=int, default=1, metavar="N",
                        help="measure N times over and write the median of each figure: on a "
                             "shared VM one calibration can catch a fast or a slow minute "
                             "(default: 1); with several rounds each figure's spread is "
                             "shown, with a warning where rounds differ by more than 20 %%")
    parser.add_argument("--no-network", action="store_true",
                        help="skip the all-to-all probe (then the network rate is the copy rate)")
    parser.add_argument("--verbose", action="store_true", help="show tracebacks of errors")
    return parser


def _check_options(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if not args.time_limit > 0:
        parser.error(f"--time-limit must be > 0, got {args.time_limit}")
    if args.threads < 1:
        parser.error(f"--threads must be >= 1, got {args.threads}")
    if not 0 <= args.gap < float("inf"):
        parser.error(f"--gap must be a number >= 0, got {args.gap}")
    if not 0 < args.stall < float("inf"):
        parser.error(f"--stall must be > 0, got {args.stall}")
    plan_tools.check_replan_flags(parser, args)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    subcommands = {
        "show": (build_show_parser, _show),
        "evaluate": (build_evaluate_parser, _evaluate),
        "profile": (build_profile_parser, _profile),
        "calibrate": (build_calibrate_parser, _calibrate),
        "capacity": (plan_tools.build_capacity_parser, plan_tools.run_capacity),
        "diff": (plan_tools.build_diff_parser, plan_tools.run_diff),
        "export": (build_export_parser, _export),
    }
    if argv and argv[0] in subcommands:
        build, run = subcommands[argv[0]]
        args = one_line_parse_errors(build()).parse_args(argv[1:])
        return run_guarded(PROG, args.verbose, lambda: run(args))
    parser = one_line_parse_errors(build_parser())
    args = parser.parse_args(argv)
    _check_options(parser, args)
    return run_guarded(PROG, args.verbose, lambda: _plan(args))


def _load_cost_model(spec: str):
    """``module:Class``, importable from the current directory too (as ``python -m``
    finds modules there)."""
    here = os.getcwd()
    added = here not in sys.path and "" not in sys.path
    if added:
        sys.path.insert(0, here)
    try:
        return load_cost_model(spec)
    finally:
        if added:
            sys.path.remove(here)


def _plan(args: argparse.Namespace) -> int:
    check_not_inputs({"-o/--output": args.output},
                     {"--tables": args.tables, "--topology": args.topology,
                      "--constraints": args.constraints, "--from": args.from_plan})
    check_output_file(args.output, "-o/--output")
    tables = load_tables(args.tables)
    topology = load_topology(args.topology)
    model = _load_cost_model(args.cost_model) if args.cost_model else None
    settings = OptionSettings(shardings=args.sharding, tiers=args.tiers,
                              cache_fractions=args.cache_fractions)
    constraints = (load_constraints(args.constraints, tables, topology) if args.constraints
                   else NO_CONSTRAINTS)
    options = PlanOptions(args.time_limit, args.threads, args.solver, args.baseline,
                          args.seed, settings, constraints, gap=args.gap, stall_s=args.stall)
    old = plan_tools.checked_replan(args, tables, topology, options) if args.from_plan else None
    if old is None:
        check_plan_inputs(tables, topology, options)
    if not args.quiet:
        print(f"planning {len(tables.tables)} tables on {topology.world_size} devices "
              f"({topology.hosts} host(s)); solver {args.solver}, limit {args.time_limit:g} s",
              file=sys.stderr)
    if old is not None:
        return plan_tools.run_replan(args, old, tables, topology, model, options)
    result = plan(tables, topology, cost_model=model, options=options)
    write_output(args.output, "-o/--output", lambda path: write_plan(result, path),
                 say=(lambda _: None) if args.quiet else lambda line: print(line, file=sys.stderr))
    if not args.quiet:
        print(device_table(result))
        print(solve_summary(result))
        print(f"plan written to {args.output}")
    return ExitCode.OK


def _show(args: argparse.Namespace) -> int:
    check_not_inputs({"--chart": args.chart}, {"PLAN": args.plan, "--measured": args.measured})
    if args.chart:
        check_output_file(args.chart, "--chart")
    if args.measured:
        check_input_file(args.measured, "--measured")
    result = read_plan(args.plan)
    records = timing_records(args.measured, plan_sha256(result)) if args.measured else []
    print(device_table(result))
    print(solve_summary(result))
    print()
    print(table_choices(result))
    if args.chart:
        write_output(args.chart, "--chart", lambda path: draw_chart(result, path))
        print(f"chart written to {args.chart}")
    if records:
        for record in records:
            where = f" (rank {record['rank']})" if "rank" in record else ""
            batch = record["batch_size"]
            print(f"\nmeasured by dlrm-run at step {record['step']}, batch {batch}{where}:")
            if batch != result.topology.global_batch_size:
                print(f"  (predicted at the run's batch of {batch}; the plan's "
                      f"{result.solve.objective_ms:.4f} ms/step above is at the topology's "
                      f"global batch of {result.topology.global_batch_size})")
            print(measured_vs_predicted(record["measured"], record["predicted"]))
    return ExitCode.OK


def timing_records(log: str, plan_sha: str) -> list[dict]:
    """The newest ``timing`` record per rank of a metrics log, which must come from
    runs of the plan with content hash ``plan_sha``."""
    newest: dict[int, dict] = {}
    try:
        with open(log, encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    raise PlanFileError(log, f"line {number} is not JSON") from None
                if isinstance(record, dict) and record.get("event") == "timing":
                    newest[int(record.get("rank", 0))] = record
    except OSError as exc:
        raise PlanFileError(log, f"cannot read the metrics log: {exc.strerror}") from None
    if not newest:
        raise PlanFileError(log, "no timing record: write one with dlrm-run --metrics-log")
    records = [newest[rank] for rank in sorted(newest)]
    for record in records:
        if record.get("plan_sha256") != plan_sha:
            raise PlanFileError(log, "measured on another plan (its plan_sha256 differs); pass "
                                     "the plan file that run executed")
    return records


def _profile(args: argparse.Namespace) -> int:
    from dlrm_runtime import open_or_build_cache, profile_tables

    check_input_file(args.data, "DATA")
    check_not_inputs({"-o/--output": args.output, "--cache": args.cache},
                     {"DATA": args.data, "--tables": args.tables})
    check_output_file(args.output, "-o/--output")
    if args.sample is not None and args.sample < 1:
        raise UsageError(f"--sample must be >= 1, got {args.sample}")
    tables = load_tables(args.tables)
    cache_path = args.cache or f"{args.data}.cache"
    with bytes_progress("parse") as progress:
        cache = open_or_build_cache(args.data, cache_path, tables, strict=args.strict,
                                    progress=progress)
    header = cache.header
    try:
        if len(cache) == 0:
            first = header.errors[0] if header.errors else None
            raise UsageError(f"{args.data}: no samples to profile ({header.lines:,} lines"
                             + (f", all malformed; line {first['line']}: {first['reason']}"
                                if first else "") + ")")
        profiled = profile_tables(cache, tables, sample=args.sample)
        write_output(args.output, "-o/--output",
                     lambda path: write_json_atomic(profiled.to_json(), path))
    except BaseException:
        if cache.built:  # a failed run leaves no cache behind
            cache.path.unlink(missing_ok=True)
        raise
    print(f"{len(cache):,} samples in {cache_path}", file=sys.stderr)
    if header.malformed:
        print(f"warning: {header.malformed} malformed lines skipped (--strict stops at the "
              f"first)", file=sys.stderr)
    print(f"tables spec with measured access profiles written to {args.output}")
    return ExitCode.OK


def _check_calibrate(args: argparse.Namespace) -> None:
    """Every flag and path of ``calibrate``, before minutes of measuring."""
    check_output_file(args.output, "-o/--output")
    if args.store_dir is not None:
        check_output_dir(args.store_dir, "--store-dir")
    for flag, value in (("--threads", args.threads), ("--rounds", args.rounds),
                        ("--devices", args.devices),
                        ("--batch-size-per-device", args.batch_size_per_device)):
        if value is not None and value < 1:
            raise UsageError(f"{flag} must be >= 1, got {value}")
    for flag, value in (("--hbm-gb", args.hbm_gb), ("--dram-gb", args.dram_gb),
                        ("--inter-host-gbps", args.inter_host_gbps)):
        if value is not None and not 0 < value < float("inf"):
            raise UsageError(f"{flag} must be a number > 0, got {value}")
    if not 0 <= args.reserved_hbm_gb < float("inf"):
        raise UsageError(f"--reserved-hbm-gb must be >= 0, got {args.reserved_hbm_gb}")
    if args.hbm_gb is not None and args.reserved_hbm_gb >= args.hbm_gb:
        raise UsageError(f"--reserved-hbm-gb {args.reserved_hbm_gb:g} must be below --hbm-gb "
                         f"{args.hbm_gb:g}")


def _calibrate(args: argparse.Namespace) -> int:
    _check_calibrate(args)
    import torch

    from dlrm_runtime import calibrate

    sizes = (calibrate.CalibrationSizes(rows=200_000, batch_rows=16_384, store_rows=65_536,
                                        repeats=3, all_to_all_bytes=8 * 1024 * 1024,
                                        overhead_rows=50_000, mlp_batch=512, run_steps=10)
             if args.quick else calibrate.CalibrationSizes())
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    results = []
    for done in range(args.rounds):
        if args.rounds > 1:
            print(f"round {done + 1} of {args.rounds}", file=sys.stderr)
        results.append(calibrate.measure(sizes, store_dir=args.store_dir,
                                         network=not args.no_network,
                                         log=lambda line: print(line, file=sys.stderr)))
    result = calibrate.combine(results)
    if args.rounds > 1:
        print(f"medians of {args.rounds} rounds: embedding step {result.device_gbps:.2f} GB/s, "
              f"dense {result.dense_gflops:.1f} GFLOP/s", file=sys.stderr)
        spread = calibrate.spreads(results)
        print("spread over the rounds (low / median / high):", file=sys.stderr)
        for s in spread:
            print(f"  {s.figure}: {s.low:.4g} / {s.median:.4g} / {s.high:.4g} "
                  f"({s.relative:.0%})", file=sys.stderr)
        disagree = [f"{s.figure} ({s.relative:.0%})" for s in spread if s.disagrees]
        if disagree:
            print(f"warning: the rounds disagree by more than 20 % on {', '.join(disagree)}: "
                  f"the machine's speed changed while measuring; the medians are written, "
                  f"but re-run on a quiet machine (or with more --rounds) for steadier "
                  f"figures", file=sys.stderr)
    topology = calibrate.to_topology(result, hbm_gb=args.hbm_gb, dram_gb=args.dram_gb,
                                     devices=args.devices,
                                     batch_size_per_device=args.batch_size_per_device,
                                     reserved_hbm_gb=args.reserved_hbm_gb,
                                     inter_host_gbps=args.inter_host_gbps)
    # Validate what we write with the same reader users will use.
    parse_topology(topology.to_json(), args.output)
    write_output(args.output, "-o/--output",
                 lambda path: write_json_atomic(topology.to_json(), path))
    print(f"topology written to {args.output}")
    return ExitCode.OK


def _evaluate(args: argparse.Namespace) -> int:
    check_not_inputs({"-o/--output": args.output},
                     {"PLAN": args.plan, "--tables": args.tables, "--topology": args.topology})
    if args.output:
        check_output_file(args.output, "-o/--output")
    model = _load_cost_model(args.cost_model) if args.cost_model else AnalyticCostModel()
    topology = load_topology(args.topology) if args.topology else None
    tables = load_tables(args.tables) if args.tables else None
    if args.format == "torchrec":
        if tables is None or topology is None:
            raise UsageError(f"--format torchrec: {args.plan} holds no table sizes or topology; "
                             f"pass --tables and --topology")
        check_input_file(args.plan, "PLAN")
        result = from_torchrec(_read_json(args.plan), tables, topology, cost_model=model,
                               module_path=args.module_path, file=args.plan)
        said = ""
    else:
        original = read_plan(args.plan, require_inputs_sha256=False)
        if topology is not None and topology.world_size < original.topology.world_size:
            raise UsageError(f"{args.plan} places shards on {original.topology.world_size} "
                             f"devices but --topology {args.topology} has {topology.world_size}")
        try:
            result = evaluate_plan(original, model, cost_model_name(model), topology, tables)
        except PlanFileError as exc:
            raise PlanFileError(args.plan, exc.problem) from None
        said = (f" (the plan said {original.solve.objective_ms:.4f} ms under "
                f"{original.cost_model})")
    print(device_table(result))
    print(f"re-costed under {result.cost_model}: slowest device {result.solve.objective_ms:.4f} "
          f"ms/step{said}")
    check_plan_fits(result, model)
    if args.output:
        write_output(args.output, "-o/--output", lambda path: write_plan(result, path))
        print(f"re-costed plan written to {args.output}")
    return ExitCode.OK


def _read_json(path: str) -> object:
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise PlanFileError(path, f"not a readable JSON file: {exc}") from None


def _export(args: argparse.Namespace) -> int:
    check_not_inputs({"-o/--output": args.output}, {"PLAN": args.plan})
    check_output_file(args.output, "-o/--output")
    check_module_path(args.module_path)
    source = read_plan(args.plan)
    doc = to_torchrec(source, args.module_path, args.device)
    write_output(args.output, "-o/--output", lambda path: write_json_atomic(doc, path))
    recut = recut_tables(source)
    if recut:
        print(f"note: {len(recut)} row-wise table(s) cut into TorchRec's ceil(rows/N) blocks, "
              f"a row more or fewer per shard than planned: {', '.join(recut[:5])}"
              f"{' ...' if len(recut) > 5 else ''}", file=sys.stderr)
    print(f"TorchRec plan of {len(source.tables)} tables written to {args.output}")
    return ExitCode.OK


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
