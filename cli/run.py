"""``dlrm-run``: train DLRM as a plan places its tables."""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path

import torch
from tqdm import tqdm

from cli.errors import EXIT_CODES_HELP, ExitCode, UsageError, one_line_parse_errors, run_guarded
from cli.paths import (
    check_input_file,
    check_not_inputs,
    check_output_dir,
    check_output_file,
    make_parents,
)
from cli.progress import bytes_progress
from cli.report import measured_vs_predicted
from dlrm_runtime import (
    ConfigError,
    CriteoClicks,
    Interaction,
    LaunchSpec,
    ModelConfig,
    PeerRefusedError,
    Progress,
    RunSetup,
    TrainConfig,
    TrainingInterrupted,
    TrainResult,
    as_flag,
    check_plan_matches,
    check_store_dir,
    init_from_env,
    launch,
    open_metrics_log,
    open_clicks,
    prepare_run,
    record_failure,
    shutdown,
    train,
    train_distributed,
)
from planner import Plan, load_tables, read_plan

PROG = "dlrm-run"

EXAMPLES = """\
examples:
  dlrm-run --plan plan.json --tables examples/demo/tables.json --steps 1000
  dlrm-run --nproc-per-node 2 --plan plan2.json --store-dir stores --checkpoint-dir ckpt
  dlrm-run --plan plan.json --bottom-mlp 128,64,16 --top-mlp 256,64,1 --metrics-log run.jsonl
  dlrm-run --plan kaggle.plan.json --data train.txt --train-lines 0:40000000 \\
      --validation-lines 40000000:45840617 --bottom-mlp 512,256,64,16 --top-mlp 512,256,1

Without --data, trains on synthetic clicks: Zipf-distributed ids per table (the
table's access.zipf, else 1.05) and labels drawn from a hidden teacher model; the
final report compares the model's validation AUC with the teacher's own AUC, the best
any model can reach. With --data, reads Criteo click logs (TSV: label, 13 integer and
26 hex categorical features); the line ranges are parsed once into binary caches
beside the data (DATA.cache for the whole file, as `dlrm-plan profile` writes, else
DATA.START-STOP.cache) that later runs reuse.

With --nproc-per-node N, dlrm-run starts the N worker processes itself (torch's
elastic launcher; several hosts: the same command on each with --nnodes and
--rdzv-endpoint): Ctrl-C or SIGTERM stops every worker, a killed dlrm-run leaves no
worker behind, and an error is one line from the first failing rank with the exit
code below. `torchrun --nproc_per_node N .venv/bin/dlrm-run ...` works too.

After training, the time per step is split into lookup, communication, dense and
update (embedding backward + optimizer) and printed beside the plan's prediction.
"""


def _widths(text: str) -> tuple[int, ...]:
    try:
        widths = tuple(int(w) for w in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not widths or min(widths) < 1:
        raise argparse.ArgumentTypeError(f"widths must be positive, got {text!r}")
    return widths


def _line_range(text: str) -> tuple[int, int | None]:
    start, sep, stop = text.partition(":")
    try:
        lo = int(start) if start else 0
        hi = int(stop) if stop else None
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected START:STOP line numbers, got {text!r}") from None
    if not sep or lo < 0 or (hi is not None and hi <= lo):
        raise argparse.ArgumentTypeError(f"expected START:STOP with 0 <= START < STOP, got {text!r}")
    return lo, hi


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Train DLRM (Naumov et al. 2019) with its embedding tables placed as a "
                    "plan from dlrm-plan says; report loss, AUC, accuracy and samples/s.",
        epilog=EXAMPLES + "\n" + EXIT_CODES_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--plan", required=True, metavar="PLAN", help="plan file from dlrm-plan")
    parser.add_argument("--tables", metavar="TABLES",
                        help="tables spec to check the plan against (default: the spec "
                             "embedded in the plan)")
    parser.add_argument("--steps", type=int, default=1000, help="training steps (default: %(default)s)")
    parser.add_argument("--batch-size", type=int,
                        help="samples per step (default: the plan's batch_size_per_device x devices)")
    parser.add_argument("--lr", type=float, default=0.05, help="MLP learning rate (default: %(default)s)")
    parser.add_argument("--embedding-lr", type=float, default=0.05,
                        help="embedding learning rate; each table uses the optimizer its spec "
                             "names (default: %(default)s)")
    parser.add_argument("--dense-optimizer", choices=("sgd", "adagrad", "adam"), default="adagrad",
                        help="optimizer of the MLPs (default: %(default)s)")
    parser.add_argument("--dense-features", type=int, default=13,
                        help="number of dense features (default: %(default)s)")
    parser.add_argument("--bottom-mlp", type=_widths, metavar="W1,W2,..",
                        help="bottom MLP widths; the last must equal the tables' dim for the "
                             "dot interaction (default: 64,DIM)")
    parser.add_argument("--top-mlp", type=_widths, default=(64, 1), metavar="W1,..,1",
                        help="top MLP widths, ending in 1 (default: 64,1)")
    parser.add_argument("--interaction", choices=[i.value for i in Interaction], default="dot",
                        help="dot: pairwise dot products (the paper's); cat: concatenation")
    parser.add_argument("--data", metavar="DATA",
                        help="Criteo TSV click log to train on (default: synthetic clicks)")
    parser.add_argument("--train-lines", type=_line_range, default=(0, None), metavar="START:STOP",
                        help="lines of DATA to train on, 0-based, STOP exclusive or empty for "
                             "the end (default: all)")
    parser.add_argument("--validation-lines", type=_line_range, metavar="START:STOP",
                        help="lines of DATA to validate on (default: no validation)")
    parser.add_argument("--strict", action="store_true",
                        help="stop at the first malformed line of DATA instead of skipping "
                             "and counting it")
    parser.add_argument("--eval-batches", type=int, default=20,
                        help="validation batches (default: %(default)s)")
    parser.add_argument("--log-every", type=int, default=50,
                        help="steps between progress and metrics-log updates (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="seed of data and weights (default: 0)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--metrics-log", metavar="FILE",
                        help="append JSON lines of metrics here (missing directories are "
                             "created)")
    parser.add_argument("--checkpoint-dir", metavar="DIR",
                        help="write checkpoints here (atomically; only the newest is kept), "
                             "at the end and every --checkpoint-every steps")
    parser.add_argument("--checkpoint-every", type=int, metavar="STEPS",
                        help="steps between checkpoints, >= 1 (default: only at the end)")
    parser.add_argument("--store-dir", metavar="DIR",
                        help="table stores for the tables the plan puts in a cached tier "
                             "(dram_cache, store_cache), one per plan device in "
                             "DIR/device-D (under torchrun rank D opens its own): created "
                             "with their initial values when missing, else continued with "
                             "--resume; checkpoints commit them together with "
                             "--checkpoint-dir")
    parser.add_argument("--resume", action="store_true",
                        help="continue from the newest step that every part of the run "
                             "committed (runtime checkpoint in --checkpoint-dir and every "
                             "table store), or start from step 0 when nothing was committed "
                             "(rerun the same command after a crash); the run ends with the "
                             "same weights as an uninterrupted one")
    parser.add_argument("--deterministic", action="store_true",
                        help="torch.use_deterministic_algorithms(True); on the CPU fix --threads "
                             "too for identical results across machines")
    parser.add_argument("--nproc-per-node", type=int, metavar="N",
                        help="start N worker processes on this host (plan device d runs on "
                             "rank d), as torchrun --nproc_per_node N does; hosts x N must be "
                             "the plan's device count (default: one process, or torchrun's)")
    parser.add_argument("--nnodes", type=int, default=1, metavar="HOSTS",
                        help="with --nproc-per-node: hosts of the run, each running this "
                             "same command (default: %(default)s)")
    parser.add_argument("--rdzv-endpoint", metavar="HOST:PORT",
                        help="with --nnodes > 1: where the hosts meet (a free port on one "
                             "of them, the same on every host)")
    parser.add_argument("--rdzv-id", default="dlrm-run", metavar="ID",
                        help="with --nnodes > 1: the run's id, the same on every host "
                             "(default: %(default)s)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--verbose", action="store_true", help="show tracebacks of errors")
    return parser


class _TqdmProgress(Progress):
    def __init__(self, total: int) -> None:
        self.bar = tqdm(total=total, desc="train", unit="step", file=sys.stderr,
                        dynamic_ncols=True, mininterval=0.5)

    def update(self, steps: int, postfix: dict[str, str]) -> None:
        self.bar.n = steps
        self.bar.set_postfix(postfix, refresh=True)

    def close(self) -> None:
        self.bar.close()


def model_config(args: argparse.Namespace, plan: Plan) -> ModelConfig:
    dims = sorted({t.embedding_dim for t in plan.tables_spec.tables})
    bottom = args.bottom_mlp
    if bottom is None:
        if len(dims) > 1 and args.interaction == "dot":
            raise ConfigError(f"tables have several dims {dims}: pass --bottom-mlp ending in one "
                              f"of them only if all tables share it, or use --interaction cat")
        bottom = (64, dims[0])
    return ModelConfig(args.dense_features, bottom, args.top_mlp, Interaction(args.interaction))


LAUNCH_FLAGS = {"--nproc-per-node": True, "--nnodes": True, "--rdzv-endpoint": True,
                "--rdzv-id": True}
"""The launcher's flags (each takes a value): not passed on to the workers."""


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = one_line_parse_errors(build_parser())
    args = parser.parse_args(argv)
    if args.nproc_per_node is not None:
        return run_guarded(PROG, args.verbose, lambda: _launch(args, argv),
                           on_interrupt=lambda exc: _resume_hint(exc, args, argv))
    return run_guarded(PROG, args.verbose, lambda: _run_rank(args),
                       on_interrupt=lambda exc: _resume_hint(exc, args, argv))


def _run_rank(args: argparse.Namespace) -> int:
    """:func:`_run` on one rank; a rank that stops because rank 0 refused the run says
    nothing (rank 0 prints why) and exits with the bad-input code."""
    try:
        return _run(args)
    except PeerRefusedError:
        raise SystemExit(ExitCode.BAD_INPUT) from None


def worker_argv(argv: Sequence[str]) -> list[str]:
    """``argv`` without the launcher's flags (``--flag VALUE`` and ``--flag=VALUE``)."""
    kept: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
            continue
        name = arg.split("=", 1)[0]
        if name in LAUNCH_FLAGS:
            skip = "=" not in arg
            continue
        kept.append(arg)
    return kept


def _launch(args: argparse.Namespace, argv: list[str]) -> int:
    """Check the run for the launched world size, then start the workers; their first
    error is reported once by :func:`~cli.errors.run_guarded`."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise UsageError("--nproc-per-node under torchrun: use one launcher, drop "
                         "--nproc-per-node or torchrun")
    spec = LaunchSpec(args.nproc_per_node, args.nnodes, args.rdzv_endpoint, args.rdzv_id)
    spec.check()
    _checked(args, spec.world_size, 0)
    launch(spec, worker, (worker_argv(argv), argv))
    return ExitCode.OK


def worker(argv: list[str], user_argv: list[str]) -> int:
    """One process of ``dlrm-run --nproc-per-node``: the run of ``argv``; an error is
    recorded for the launcher (not printed: the launcher prints the first rank's
    once) and the worker exits with its code, which stops the other workers.
    ``user_argv`` is the command as typed (for the resume hint)."""
    args = one_line_parse_errors(build_parser()).parse_args(argv)
    code = run_guarded(PROG, args.verbose, lambda: _run_rank(args),
                       on_interrupt=lambda exc: _resume_hint(exc, args, user_argv),
                       report=record_failure)
    if code != ExitCode.OK:
        raise SystemExit(code)
    return code


def _resume_hint(exc: KeyboardInterrupt, args: argparse.Namespace, argv: list[str]) -> str:
    """Where an interrupted run stands and the command that continues it."""
    if not isinstance(exc, TrainingInterrupted):
        return "before the first training step"
    where = f"during step {exc.step + 1}"
    if exc.checkpoint_step is None:
        how = ("no checkpoint was written; pass --checkpoint-dir DIR --checkpoint-every N to "
               "be able to resume")
        return f"{where}; {how}"
    again = argv if "--resume" in argv else [*argv, "--resume"]
    return (f"{where}; the last checkpoint is step {exc.checkpoint_step} in "
            f"{args.checkpoint_dir}; resume with: {PROG} {shlex.join(again)}")


def _check_args(args: argparse.Namespace) -> None:
    """The flags that need no file read, and every path, before any work."""
    for flag, value in (("--batch-size", args.batch_size), ("--threads", args.threads),
                        ("--checkpoint-every", args.checkpoint_every)):
        if value is not None and value < 1:
            raise UsageError(f"{flag} must be >= 1, got {value}")
    if args.nproc_per_node is None:
        for flag, given in (("--nnodes", args.nnodes != 1), ("--rdzv-endpoint",
                            args.rdzv_endpoint is not None),
                            ("--rdzv-id", args.rdzv_id != "dlrm-run")):
            if given:
                raise UsageError(f"{flag} needs --nproc-per-node N (the workers per host)")
    if args.checkpoint_every is not None and args.checkpoint_dir is None:
        raise UsageError("--checkpoint-every needs --checkpoint-dir")
    check_not_inputs({"--metrics-log": args.metrics_log},
                     {"--plan": args.plan, "--tables": args.tables, "--data": args.data})
    if args.data is not None:
        check_input_file(args.data, "--data")
    elif args.train_lines != (0, None) or args.validation_lines is not None:
        raise UsageError("--train-lines and --validation-lines need --data")
    if args.metrics_log is not None:
        check_output_file(args.metrics_log, "--metrics-log")
    for flag, path in (("--checkpoint-dir", args.checkpoint_dir), ("--store-dir", args.store_dir)):
        if path is not None:
            check_output_dir(path, flag)
    if args.checkpoint_dir is not None:
        ckpt = Path(args.checkpoint_dir)
        if (ckpt / "zarr.json").is_file():
            raise UsageError(f"--checkpoint-dir {ckpt}: is a table store (pass it as "
                             f"--store-dir); give a directory of checkpoints")
        if args.store_dir is not None and Path(args.store_dir).absolute() == ckpt.absolute():
            raise UsageError(f"--checkpoint-dir and --store-dir are both {ckpt}: give each its "
                             f"own directory")
    if args.store_dir is not None:
        check_store_dir(args.store_dir)


def _criteo(args: argparse.Namespace, plan: Plan, verbose: bool) -> CriteoClicks:
    """Open (parsing once) the caches of the train and validation line ranges."""
    data = open_clicks(args.data, plan.tables_spec, args.train_lines, args.validation_lines,
                       strict=args.strict,
                       progress=lambda what: bytes_progress(f"parse {what} lines"))
    for what, cache in (("train", data.train), ("validation", data.validation)):
        if cache is None or not verbose:
            continue
        header = cache.header
        note = (f", {header.malformed} malformed lines skipped (--strict stops at the first)"
                if header.malformed else "")
        print(f"{what}: {len(cache):,} samples from lines {header.start}:{header.stop or ''} of "
              f"{args.data}{note}", file=sys.stderr)
    return data


def _run(args: argparse.Namespace) -> int:
    world = init_from_env()  # 1 unless launched by torchrun with several processes
    finished = False
    try:
        code = _train(args, world, torch.distributed.get_rank() if world > 1 else 0)
        finished = True
        return code
    finally:
        shutdown(synchronize=finished)  # after an error a peer may never arrive


def _checked(args: argparse.Namespace, world: int, rank: int
             ) -> tuple[Plan, RunSetup, ModelConfig, int]:
    """Every flag, path and input of the run, before any work: the plan, the run's
    setup on ``world`` processes, the model and the global batch size."""
    _check_args(args)
    plan = read_plan(args.plan)
    if args.tables:
        check_plan_matches(plan, load_tables(args.tables), args.plan, args.tables)
    batch_size = plan.topology.global_batch_size if args.batch_size is None else args.batch_size
    config = _train_config(args, batch_size, args.eval_batches)
    config.check(as_flag)
    model = model_config(args, plan)
    model.check(tuple(t.embedding_dim for t in plan.tables_spec.tables), as_flag)
    setup = prepare_run(plan, config, world_size=world, rank=rank, model=model)
    return plan, setup, model, batch_size


def _train(args: argparse.Namespace, world: int, rank: int) -> int:
    plan, setup, model, batch_size = _checked(args, world, rank)
    data = None
    eval_batches = args.eval_batches
    if args.data:
        if rank > 0:  # rank 0 parses the data into the caches first
            torch.distributed.barrier()
        data = _criteo(args, plan, verbose=rank == 0)
        if rank == 0 and world > 1:
            torch.distributed.barrier()
        if data.validation is not None:
            available = data.num_batches(batch_size, validation=True)
            if available < 1:
                raise ConfigError(f"--validation-lines hold {len(data.validation)} samples, "
                                  f"fewer than one batch of {batch_size}")
            if available < eval_batches and rank == 0:
                print(f"note: validating on {available * batch_size:,} samples ({available} "
                      f"batches of {batch_size}), fewer than the --eval-batches {eval_batches} "
                      f"asked for: the --validation-lines hold {len(data.validation):,} "
                      f"samples", file=sys.stderr)
            eval_batches = min(eval_batches, available)
    config = _train_config(args, batch_size, eval_batches)
    lead = rank == 0
    if lead:
        where = f" on {world} processes" if world > 1 else ""
        print(f"training {len(plan.tables)} tables from {args.plan}{where}: {config.steps} "
              f"steps of {config.batch_size} samples", file=sys.stderr)
        if data is not None:
            epochs = config.steps * config.batch_size / len(data.train)
            if epochs > 1:
                print(f"note: {config.steps} steps of {config.batch_size} samples cycle the "
                      f"{len(data.train):,} training samples {epochs:.2f} times ({epochs:.2f} "
                      f"epochs, in file order)", file=sys.stderr)
    log = None
    if lead and args.metrics_log is not None:
        make_parents(args.metrics_log)
        log = open_metrics_log(args.metrics_log)
    run = train_distributed if world > 1 else train
    try:
        result = run(plan, model, config, data=data,
                     progress=None if args.no_progress or not lead else _TqdmProgress,
                     metrics_log=log, setup=setup)
    finally:
        if log is not None:
            log.close()
    if lead:
        print(format_result(result))
    return ExitCode.OK


def _train_config(args: argparse.Namespace, batch_size: int, eval_batches: int) -> TrainConfig:
    return TrainConfig(
        steps=args.steps,
        batch_size=batch_size,
        lr=args.lr,
        embedding_lr=args.embedding_lr,
        dense_optimizer=args.dense_optimizer,
        eval_batches=eval_batches,
        log_every=args.log_every,
        seed=args.seed,
        threads=args.threads,
        checkpoint_dir=args.checkpoint_dir,
        checkpoint_every=args.checkpoint_every or 0,
        resume=args.resume,
        store_dir=args.store_dir,
        deterministic=args.deterministic,
    )


def format_result(result: TrainResult) -> str:
    v = result.validation
    first = result.resumed_from or 0
    span = f" (steps {first + 1}-{result.steps})" if first else ""
    lines = [
        f"trained {result.steps - first} steps{span} x {result.batch_size} samples in "
        f"{result.seconds:.1f} s: {result.samples_per_s:,.0f} samples/s, final train loss "
        f"{result.train_loss:.4f}",
    ]
    if v is None:
        lines.append("no validation data (pass --validation-lines)")
    else:
        line = (f"validation ({v.samples} samples): loss {v.loss:.4f}, AUC {v.auc:.4f}, "
                f"accuracy {v.accuracy:.4f}")
        if v.teacher_auc is not None:
            line += (f"; the hidden teacher's AUC {v.teacher_auc:.4f} "
                     f"(model reaches {v.auc / v.teacher_auc:.1%} of it)")
        lines.append(line)
    if result.rank_timings:
        for rank, record in enumerate(result.rank_timings):
            lines.append(f"rank {rank}:")
            lines.append(measured_vs_predicted(record["measured"], record["predicted"]))
    elif result.times is not None and result.prediction is not None:
        lines.append(measured_vs_predicted(result.times.to_json() | {
            "embedding_bytes": result.embedding_bytes}, result.prediction.to_json()))
    if result.resumed_from is not None:
        lines.insert(0, f"resumed from step {result.resumed_from}")
    elif result.notice is not None:
        lines.insert(0, result.notice)
    if result.checkpoint is not None:
        lines.append(f"checkpoint: {result.checkpoint}")
    return "\n".join(lines)


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
