"""What both command lines (`edge-agent`, `edge-fleet`) do alike: `--version`, durations,
and argument errors told in one line."""

from __future__ import annotations

import argparse
import re
from typing import NoReturn

from edgeinfer import __version__

_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}  # a bare number: seconds


def _not_a_duration(text: str) -> str:
    return f"{text!r} is not a duration: say e.g. 60 (seconds), 60s, 2m, 500ms or 1h"


def parse_duration(text: str, what: str = "duration") -> float:
    """Seconds from `60`, `1.5`, `60s`, `2m`, `500ms` or `1h`; ValueError naming `what`."""
    m = _DURATION_RE.match(text)
    if not m:
        raise ValueError(f"{what}: {_not_a_duration(text)}")
    return float(m.group(1)) * _UNITS[m.group(2)]


def duration(text: str) -> float:
    """`type=` for an option that takes a duration; argparse names the option in the error."""
    try:
        return parse_duration(text)
    except ValueError:
        raise argparse.ArgumentTypeError(_not_a_duration(text)) from None


class UsageError(Exception):
    """The command cannot run as given (exit 2); the message says what to change.

    Here and not in a CLI module, so that it is one class even when that module runs as
    `python -m ...` (as `__main__`, beside the copy its helpers' modules import)."""


def version_line(prog: str) -> str:
    """What `--version` (and `edge-agent version`) prints."""
    return f"{prog} {__version__}"


class Parser(argparse.ArgumentParser):
    """An argument error is one line, `prog ACTION: what is wrong`, and exit 2: the reason
    stays readable in a terminal or a journal; `--help` has the usage. Subcommands made
    with add_subparsers are of this class too."""

    def add_version(self) -> None:
        self.add_argument("--version", action="version", version=version_line(self.prog),
                          help="print the installed version and exit")

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: {message} (see {self.prog} --help)\n")
