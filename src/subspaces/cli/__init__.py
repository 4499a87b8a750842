"""The ``subspaces`` command. One file per subcommand; bad input exits 2 with a one-line message."""
from __future__ import annotations

import logging
import os
import sys
import warnings
from typing import Annotated

import typer

from .._errors import SubspacesError, SubspacesWarning

try:  # typer >= 0.22 vendors click; older releases raise click's own exceptions
    from typer import TyperException as _UsageError
except ImportError:  # pragma: no cover
    from click import ClickException as _UsageError

app = typer.Typer(
    add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
    help="Low-rank and subspace methods of deep learning: adapt, train, compress, merge, measure.",
)


@app.callback()
def _options(
    verbose: Annotated[bool, typer.Option("--verbose", help="show the logging and warnings of third-party "
                                                            "packages (transformers, peft, bitsandbytes, ...)")] = False,
) -> None:
    if not verbose:
        quiet_third_party()


def quiet_third_party() -> None:
    """Keep optional packages' chatter off the terminal: bitsandbytes (imported by peft, which transformers'
    Trainer imports when it is installed) logs two warnings at import, and others warn at load time. Our own
    warnings (SubspacesWarning) and errors still show. Settings a user made in the environment are kept."""
    for var in ("TRANSFORMERS_VERBOSITY", "DATASETS_VERBOSITY", "HF_HUB_VERBOSITY"):
        os.environ.setdefault(var, "error")
    logging.getLogger().setLevel(logging.ERROR)  # every logger without a level of its own
    warnings.filterwarnings("ignore")
    warnings.filterwarnings("default", category=SubspacesWarning)


from . import compare, methods, tune  # noqa: E402,F401  (each registers its subcommand)
from . import compress, merge, pretrain  # noqa: E402,F401
from . import extract_lora  # noqa: E402,F401


def main(args: list[str] | None = None) -> None:
    # The command line reads local folders only: never reach a model hub (bitsandbytes would fetch a kernel).
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        code = app(args=args, standalone_mode=False)
    except SubspacesError as e:
        _fail(str(e))
    except _UsageError as e:  # a mistyped option, a missing argument, a bad value
        if type(e).__name__ == "NoArgsIsHelpError":  # bare `subspaces`: the help is already printed
            sys.exit(0)
        ctx = getattr(e, "ctx", None)
        where = f" (see '{ctx.command_path} --help')" if ctx is not None else ""
        _fail(e.format_message().rstrip(".") + where)
    except (typer.Abort, KeyboardInterrupt):
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    sys.exit(code if isinstance(code, int) else 0)


def _fail(message: str) -> None:
    print("error: " + " ".join(message.split()), file=sys.stderr)  # one line, whatever a message carries
    sys.exit(2)
