"""``dlrm-store``: look after the table stores of cached tables.

``dlrm-store verify DIR`` checks every block of every array of the store at DIR (a
store, or a ``--store-dir`` holding ``device-<d>`` stores) against the CRC-32C
recorded at its last checkpoint, read-only, with a progress bar on stderr when it is a
terminal; one line per damaged block (store, array, block, rows), exit 2 when any.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from tqdm import tqdm

from cli.errors import EXIT_CODES_HELP, ExitCode, one_line_parse_errors, run_guarded

PROG = "dlrm-store"
EXAMPLES = """examples:
  dlrm-store verify runs/store            every device-<d> store of a --store-dir
  dlrm-store verify runs/store/device-0   one store
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG, description="Check the table stores that cached tables train from.",
        epilog=EXAMPLES + "\n" + EXIT_CODES_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--verbose", action="store_true", help="tracebacks for errors")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND",
                                     help="verify: check every block against its checksum")
    verify = commands.add_parser(
        "verify", help="check every block of every array against its checksum",
        description="Check every block of every array against the CRC-32C recorded at its "
                    "last checkpoint (read-only). Exit 2 when a block is damaged.")
    verify.add_argument("dir", metavar="DIR",
                        help="a table store, or a --store-dir holding device-<d> stores")
    verify.add_argument("--no-progress", action="store_true", help="no progress bar")
    one_line_parse_errors(verify)
    return one_line_parse_errors(parser)


def _verify(args: argparse.Namespace) -> int:
    from dlrm_runtime import verify_stores

    bars: dict[str, tqdm] = {}

    def progress(store: str, done: int, total: int) -> None:
        bar = bars.get(store)
        if bar is None:
            bar = bars[store] = tqdm(total=total, unit="block", desc=store, file=sys.stderr,
                                     disable=True if args.no_progress else None, leave=False)
        bar.n = done
        bar.refresh()

    try:
        damages = verify_stores(args.dir, progress)
    finally:
        for bar in bars.values():
            bar.close()
    for damage in damages:
        print(f"{PROG}: damaged: {damage}", file=sys.stderr)
    if damages:
        return ExitCode.BAD_INPUT
    print(f"{args.dir}: every block matches its checksum")
    return ExitCode.OK


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_guarded(PROG, args.verbose, lambda: _verify(args))


if __name__ == "__main__":
    sys.exit(main())
