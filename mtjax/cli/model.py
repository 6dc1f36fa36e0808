"""Named model sizes: `mtjax model list`, and `mtjax model info NAME` (parameters, training
FLOPs per token, bytes of parameters and optimizer state; computed without allocating)."""

from __future__ import annotations

import argparse

from mtjax import outputs

HELP = "model sizes and their cost"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="model_command", required=True, metavar="{info,list}")
    info = sub.add_parser("info", allow_abbrev=False,
                          help="parameters, FLOPs and memory of a named model")
    info.add_argument("name", help="a named model, e.g. t5_1_1_base")
    info.add_argument("--inputs-length", type=int, default=512,
                      help="encoder tokens per example, for FLOPs per token (default 512)")
    info.add_argument("--targets-length", type=int, default=114,
                      help="decoder tokens per example (default 114, T5's packed 512/114)")
    info.add_argument("--vocab-size", type=int, default=None,
                      help="rows of the embedding (default: the size's own, e.g. 32128 for "
                      "T5's SentencePiece model). `mtjax train` takes it from the mixture's "
                      "vocabulary instead, rounded up to 128: 384 for the built-in byte tasks")
    sub.add_parser("list", allow_abbrev=False, help="all named models")


def run(args: argparse.Namespace) -> int:
    from mtjax.model import sizes

    if args.model_command == "list":
        for name in sizes.MODEL_SIZES:
            print(name)
        return 0
    from mtjax.config import ConfigError
    from mtjax.train.footprint import model_info

    for flag, value in (("--inputs-length", args.inputs_length),
                        ("--targets-length", args.targets_length),
                        ("--vocab-size", args.vocab_size)):
        if value is not None and value < 1:
            raise ConfigError(f"{flag} must be positive, got {value}")
    info = model_info(args.name, inputs_length=args.inputs_length,
                      targets_length=args.targets_length, vocab_size=args.vocab_size)
    print(outputs.dumps(info, indent=2))
    return 0
