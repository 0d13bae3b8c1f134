"""The ``bayesfuse`` command.

Each subcommand lives in ``bayesfuse/commands/<name>.py`` and exposes
``add_parser(subparsers)`` and ``run(args) -> int``; this module only wires
them together and turns the library's input errors into one-line messages
with a non-zero exit code (2), so that a script can rely on both.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import shlex
import sys

from . import __version__
from .errors import ConfigError, InputError, OutputExistsError

#: Subcommands, in the order ``--help`` lists them. A module that has not
#: landed yet is skipped.
COMMANDS = ("fuse", "models", "demo", "check", "report", "batch", "compare", "datasets")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bayesfuse",
        description="Fuse several raters' segmentations or probability maps into a consensus, "
        "with each rater's performance and per-voxel uncertainty.",
    )
    parser.add_argument("--version", action="version", version=f"bayesfuse {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in COMMANDS:
        try:
            mod = importlib.import_module(f".commands.{name}", __package__)
        except ModuleNotFoundError as exc:
            if exc.name == f"{__package__}.commands.{name}":
                continue
            raise
        p = mod.add_parser(sub)
        p.set_defaults(_run=mod.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    # The command as the user typed it, for the provenance of results and reports.
    args.command_line = "bayesfuse " + shlex.join(sys.argv[1:] if argv is None else argv)
    quiet = getattr(args, "quiet", False)
    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO, format="%(message)s", stream=sys.stderr)
    from . import progress

    progress.set_quiet(quiet)
    try:
        return int(args._run(args) or 0)
    except (InputError, ConfigError, OutputExistsError) as exc:
        print(f"bayesfuse: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("bayesfuse: interrupted; no output was left half-written", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
