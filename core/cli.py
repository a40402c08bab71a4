"""The command line of every `python -m <package>` entry point: `--config PATH` plus `section.key=value`
overrides, a `config` subcommand that prints the resolved config, one-line errors (exit 2) for a bad config or a
missing input, and the ETA of progress lines."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any, TypeVar

from core.config import ConfigError, InputFileError, dump_config, load_config

T = TypeVar("T")


def add_config_arguments(parser: argparse.ArgumentParser, default_config: str | os.PathLike | None = None) -> None:
    parser.add_argument("--config", type=Path, default=default_config, metavar="PATH",
                        help="YAML config file" + (f" (default: {default_config})" if default_config else ""))
    parser.add_argument("overrides", nargs="*", metavar="section.key=value",
                        help="override config values, e.g. optim.lr=3e-4 (the `config` command prints every key; "
                             "values parsed as YAML, lists as [2,2,6], null for none; applied after --config)")


def config_from_args(cls: type[T], args: argparse.Namespace) -> T:
    return load_config(cls, args.config, args.overrides)


def add_show_config_command(subparsers, cls: type, default_config: str | os.PathLike | None = None) -> None:
    """A `config` subcommand: validate a YAML + overrides against `cls` and print it fully resolved."""
    p = subparsers.add_parser("config", help="validate a config file (+ overrides) and print it fully resolved",
                              description=f"Load a YAML config into {cls.__name__}, apply section.key=value "
                                          "overrides, and print the resolved config (what a run would save).")
    add_config_arguments(p, default_config)

    def run(args: argparse.Namespace) -> int:
        print(dump_config(config_from_args(cls, args)), end="")
        return 0

    p.set_defaults(func=run)


def eta(elapsed_s: float, done: int, total: int) -> str:
    """"eta 1h02m" for a progress line: the mean time per unit so far times the units left ("" before the first)."""
    if done <= 0 or total <= done:
        return ""
    left = int(round(elapsed_s / done * (total - done)))
    h, m, s = left // 3600, left % 3600 // 60, left % 60
    return f"eta {h}h{m:02d}m" if h else f"eta {m}m{s:02d}s" if m else f"eta {s}s"


def cli_parser(prog: str, description: str, epilog: str) -> tuple[argparse.ArgumentParser, Any]:
    """The top-level parser of a `python -m <package>` CLI and its subcommand group."""
    p = argparse.ArgumentParser(prog=prog, description=description, epilog=epilog,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    return p, p.add_subparsers(dest="command", required=True, metavar="COMMAND")


def run_cli(parser: argparse.ArgumentParser, argv: list[str] | None = None) -> int:
    """Parse and dispatch to the subcommand's `func`; a bad config or a missing input is a one-line message and
    exit code 2 (anything else is a bug and keeps its traceback)."""
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    except (FileNotFoundError, InputFileError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
