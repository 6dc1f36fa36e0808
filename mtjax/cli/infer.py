"""Decode predictions for inputs: text lines, or JSONL objects with `inputs`; writes JSONL with
`inputs` and `prediction` (and `score` with --scores). Greedy by default; --beam-size N for beam
search with T5's length penalty; --temperature T (with --top-k/--top-p) to sample. --task NAME
runs that seqio task's preprocessors on each record and its postprocessor on each prediction."""

from __future__ import annotations

import argparse

from mtjax.cli import _inference

HELP = "decode predictions for inputs (text or JSONL in, JSONL out)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    _inference.add_checkpoint_arguments(parser)
    parser.add_argument("--input", required=True, metavar="FILE",
                        help="text lines or JSONL objects with 'inputs'; - for stdin")
    parser.add_argument("--output", default=None, metavar="FILE.jsonl",
                        help="where to write (default: stdout)")
    parser.add_argument("--beam-size", type=int, default=1, help="1: greedy (default)")
    parser.add_argument("--alpha", type=float, default=None,
                        help="beam search length penalty ((5+len)/6)**alpha (default 0.6; "
                        "needs --beam-size)")
    parser.add_argument("--temperature", type=float, default=0.0,
                        help="sample at this temperature (default 0: greedy)")
    parser.add_argument("--top-k", type=int, default=0,
                        help="sample among the k most likely tokens (default 0: all)")
    parser.add_argument("--top-p", type=float, default=1.0,
                        help="sample from the smallest set of tokens with probability >= p")
    parser.add_argument("--seed", type=int, default=None,
                        help="sampling seed (default 0; needs --temperature)")
    parser.add_argument("--max-decode-length", type=int, default=None,
                        help="generated tokens at most, EOS included (default: the run's "
                        "data.targets_length)")
    parser.add_argument("--task", default=None, metavar="NAME",
                        help="apply this task's preprocessing and postprocessing")
    parser.add_argument("--scores", action="store_true",
                        help="add 'score': the log-probability sum (beam search: divided by "
                        "the length penalty)")


@_inference.on_every_host
def run(args: argparse.Namespace) -> int:
    from mtjax.infer import records as records_lib
    from mtjax.infer.decode import DecodeOptions, DecodeOptionsError

    # Options first: a bad flag fails before anything loads.
    if args.seed is not None and args.temperature == 0:
        raise DecodeOptionsError("--seed sets the sampling seed, and decoding is greedy without "
                                 "--temperature: add --temperature T, or drop --seed")
    length = args.max_decode_length
    options = DecodeOptions(
        max_decode_length=1 if length is None else length, beam_size=args.beam_size,
        alpha=DecodeOptions.alpha if args.alpha is None else args.alpha,
        temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed or 0)
    if args.alpha is not None and args.beam_size == 1:
        raise DecodeOptionsError(_inference.ALPHA_WITHOUT_BEAMS)
    records = records_lib.read_records(args.input, required=() if args.task else ("inputs",),
                                       allow_text=True)
    _inference.note_empty_input(args, records)
    model = _inference.load(args)  # checks --output first
    if length is None:  # the run's target length
        import dataclasses

        options = dataclasses.replace(options,
                                      max_decode_length=model.config.data.targets_length)
    with _inference.progress_bar(args, len(records), "ex") as update:
        records_lib.write_jsonl(
            records_lib.predict(model, records, options, batch_size=args.batch_size,
                                task=args.task, scores=args.scores, progress=update),
            args.output)
    return 0
