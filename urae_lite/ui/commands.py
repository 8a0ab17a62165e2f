"""The page runs the CLI's own commands: its fields become the argument list `urae-lite` would get, parsed by the
CLI's parser, so every check, default and one-line message is the command's."""

from __future__ import annotations

import argparse
import functools
import shlex
from collections.abc import Sequence

from ..errors import UraeError
from .capture import captured


@functools.cache
def _parser() -> argparse.ArgumentParser:
    from ..cli import build_parser

    return build_parser()


def parse(argv: Sequence[str]) -> argparse.Namespace:
    """`urae-lite ARGV`'s parsed arguments; a value the parser refuses is its one-line message as a UraeError."""
    with captured("stderr") as err, captured("stdout"):  # `--help` and the like print nothing on the console
        try:
            return _parser().parse_args(list(argv))
        except SystemExit:
            lines = [line for line in err.getvalue().splitlines() if line.strip()]
            message = lines[-1].split("error: ", 1)[-1] if lines else "invalid settings"
            raise UraeError(message) from None


def run_command(argv: Sequence[str]) -> str:
    """Run `urae-lite ARGV` in this process and return what it printed (its UraeError propagates)."""
    args = parse(argv)
    with captured() as out:
        args.func(args)
    return out.getvalue()


def command_line(argv: Sequence[str]) -> str:
    """The shell command a user would type for `argv`."""
    return shlex.join(["urae-lite", *argv])
