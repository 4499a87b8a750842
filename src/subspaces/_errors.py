"""The one error type users see: a clear, one-line message naming the problem and what is allowed."""
from __future__ import annotations

import difflib
from collections.abc import Iterable


class SubspacesError(ValueError):
    """Bad input to subspaces (unknown name, bad hyperparameter, unreadable file, ...).

    A ValueError, so ordinary ``except ValueError`` code keeps working; the command line turns it into a
    one-line message and exit status 2.
    """


class SubspacesWarning(UserWarning):
    """A warning of ours (a useless setting, a fallback taken). The command line shows these and hides the
    third-party ones unless ``--verbose``."""


def did_you_mean(name: str, choices: Iterable[str]) -> str:
    choices = sorted(choices)
    close = difflib.get_close_matches(name, choices, n=3, cutoff=0.5)
    hint = f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
    return f"{hint} Valid: {', '.join(choices)}."
