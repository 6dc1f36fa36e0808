"""Benchmarks: one JSON object on stdout, a table on stderr. `mtjax bench train --help`."""

from __future__ import annotations

import argparse

HELP = "time the train step and other stages (JSON on stdout); `mtjax bench train --help`"
PARSER_KWARGS = {"add_help": False}  # mtjax.bench.main owns the flags, --help included


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("rest", nargs=argparse.REMAINDER)


def run(args: argparse.Namespace) -> int:
    from mtjax import bench

    return bench.main(args.rest)
