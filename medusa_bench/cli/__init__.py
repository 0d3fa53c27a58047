"""The `medusa-bench` command line: typer wiring only, one thin function per command.

Every command parses its options, calls the package's Python API, and prints. Errors a user
can fix are `UserError`s and print as one line (MEDUSA_BENCH_DEBUG=1 shows the traceback).
"""

from __future__ import annotations

import os
import sys

from medusa_bench.cli import commands, training  # noqa: F401 (importing them registers their commands)
from medusa_bench.cli.app import DecoderCommand, app, console, fill_decoder_names  # noqa: F401 (app: tests build it)
from medusa_bench.errors import UserError


# ---------------------------------------------------------------------------------------- main
def quiet_libraries() -> None:
    """Deprecation notices from inside torch/transformers say nothing the user can act on;
    MEDUSA_BENCH_DEBUG=1 shows them (and tracebacks)."""
    if os.environ.get("MEDUSA_BENCH_DEBUG"):
        return
    import warnings

    for category in (FutureWarning, DeprecationWarning):
        warnings.filterwarnings("ignore", category=category)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def main() -> None:
    """Entry point: UserError → one line on stderr, exit 2 (traceback with MEDUSA_BENCH_DEBUG=1)."""
    quiet_libraries()
    from medusa_bench.decoders.options import COMMANDS

    DecoderCommand.wanted = any(arg in COMMANDS for arg in sys.argv[1:2])
    try:
        if DecoderCommand.wanted:
            fill_decoder_names()
        app()
    except UserError as error:
        if os.environ.get("MEDUSA_BENCH_DEBUG"):
            raise
        from rich.markup import escape

        console.print(f"[bold red]error:[/] {escape(str(error))}", highlight=False, soft_wrap=True)  # "medusa-bench[ray]" is no markup
        sys.exit(2)
    except KeyboardInterrupt:
        console.print("interrupted: finished answers are saved; re-run the same command to resume")
        sys.exit(130)

