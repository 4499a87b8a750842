"""The ``subspaces`` command. One file per subcommand; bad input exits 2 with a one-line message."""
from __future__ import annotations

import sys

import typer

from .._errors import SubspacesError

app = typer.Typer(
    add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
    help="Low-rank and subspace methods of deep learning: adapt, train, compress, merge, measure.",
)

from . import compare, methods, tune  # noqa: E402,F401  (each registers its subcommand)
from . import compress, merge, pretrain  # noqa: E402,F401
from . import extract_lora  # noqa: E402,F401


def main() -> None:
    try:
        app()
    except SubspacesError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
