"""Score targets given inputs (T5X's "score" mode): for each JSONL object with `inputs` and
`targets` text, write it back with `score` (float32 sum of the targets' token log-likelihoods,
EOS included) and `num_tokens`. Rank classification: score every candidate target, take the
highest."""

from __future__ import annotations

import argparse

from mtjax.cli import _inference

HELP = "log-likelihood of targets given inputs (JSONL in, JSONL out)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    _inference.add_checkpoint_arguments(parser)
    parser.add_argument("--input", required=True, metavar="FILE.jsonl",
                        help='JSONL, one {"inputs": ..., "targets": ...} per line; - for stdin')
    parser.add_argument("--output", default=None, metavar="FILE.jsonl",
                        help="where to write (default: stdout)")


@_inference.on_every_host
def run(args: argparse.Namespace) -> int:
    from mtjax.infer import records as records_lib

    records = records_lib.read_records(args.input, required=("inputs", "targets"))
    _inference.note_empty_input(args, records)
    model = _inference.load(args)  # checks --output first
    with _inference.progress_bar(args, len(records), "ex") as update:
        records_lib.write_jsonl(
            records_lib.score(model, records, batch_size=args.batch_size, progress=update),
            args.output)
    return 0
