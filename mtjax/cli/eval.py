"""Evaluate a checkpoint with seqio.Evaluator: every task of the run's eval.mixture (else its
data.mixture; or --mixture) that has metric_fns, on its validation split, and (eval.loss, the
default) every task's teacher-forced loss; prints (and with --output writes) JSON mapping
task -> metric -> value."""

from __future__ import annotations

import argparse
import math

from mtjax import outputs
from mtjax.cli import _inference

HELP = "per-task metrics of a checkpoint (JSON: task -> metric -> value)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    _inference.add_checkpoint_arguments(parser)
    parser.add_argument("--output", default=None, metavar="FILE.json",
                        help="also write the JSON here")
    parser.add_argument("--mixture", default=None,
                        help="task or mixture to evaluate (default: the run's eval.mixture, "
                             "else its data.mixture)")
    parser.add_argument("--split", default="validation", help="eval split (default validation)")
    parser.add_argument("--max-examples", type=int, default=0,
                        help="first N examples of each task (default 0: all)")
    parser.add_argument("--beam-size", type=int, default=1, help="1: greedy (default)")
    parser.add_argument("--alpha", type=float, default=None,
                        help="beam search length penalty ((5+len)/6)**alpha (default 0.6; "
                        "needs --beam-size)")
    parser.add_argument("--max-decode-length", type=int, default=0,
                        help="default 0: each task's longest target")
    parser.add_argument("--loss", action=argparse.BooleanOptionalAction, default=None,
                        help="each task's teacher-forced loss per target token and token "
                        "accuracy (default: the run's eval.loss, on unless the run turned it "
                        "off)")


@_inference.on_every_host
def run(args: argparse.Namespace) -> int:
    import dataclasses

    from mtjax import config as config_lib
    from mtjax.infer import evaluate
    from mtjax.infer.decode import DecodeOptions

    # The flags first, by their own names: a mistake fails before the checkpoint loads.
    alpha = DecodeOptions.alpha if args.alpha is None else args.alpha
    for flag, value, least in (("--beam-size", args.beam_size, 1), ("--alpha", alpha, 0),
                               ("--max-examples", args.max_examples, 0),
                               ("--max-decode-length", args.max_decode_length, 0)):
        if not (math.isfinite(value) and value >= least):  # NaN passes `value < least`
            raise config_lib.ConfigError(f"{flag} must be at least {least}, got {value}")
    if args.alpha is not None and args.beam_size == 1:
        raise config_lib.ConfigError(_inference.ALPHA_WITHOUT_BEAMS)
    # The decoder's own limits, by the flags' names (--max-decode-length past 65536).
    DecodeOptions(max_decode_length=args.max_decode_length or 1, beam_size=args.beam_size,
                  alpha=alpha)
    model = _inference.load(args)
    config = model.config
    eval_config = dataclasses.replace(
        config.eval, mixture=args.mixture or config.eval.mixture, split=args.split,
        max_examples=args.max_examples,
        batch_size=args.batch_size, beam_size=args.beam_size, alpha=alpha,
        max_decode_length=args.max_decode_length,
        loss=config.eval.loss if args.loss is None else args.loss)
    config = config_lib.validate(dataclasses.replace(config, eval=eval_config))
    _check_vocabulary(config, model)
    evaluator = evaluate.make_evaluator(config, model.mesh, model.rules, model.model_def,
                                        progress=not args.no_progress)
    if not evaluator.task_names:
        import seqio

        from mtjax.data import pipeline

        mixture = pipeline.eval_mixture(config)
        splits = sorted({s for name in pipeline.resolve_task_names(mixture)
                         for s in seqio.TaskRegistry.get(name).splits})
        which = "" if config.eval.loss else "metric_fns and "
        raise config_lib.ConfigError(
            f"nothing to evaluate: no task of {mixture!r} has {which}a split "
            f"{args.split!r} (its tasks' splits: {', '.join(splits)})")
    results = evaluator(model.params, model.step)
    text = outputs.dumps(results, indent=2, sort_keys=True)
    print(text)
    if args.output:
        outputs.write_text(args.output, text + "\n")
    return 0


def _check_vocabulary(config, model) -> None:
    """The tasks evaluated must use the checkpoint's vocabulary: the model would read their ids
    as other pieces, and every metric would be noise."""
    from mtjax.data import pipeline
    from mtjax.data import vocab as vocab_lib

    pipeline.prepare(config)
    mixture = pipeline.eval_mixture(config)
    evaluated, read = pipeline.mixture_vocabulary(mixture), model.vocabulary
    if evaluated != read:
        raise pipeline.VocabularyMismatchError(
            f"{mixture!r} uses {vocab_lib.describe(evaluated)}, and the model of "
            f"{model.step_dir} reads {vocab_lib.describe(read)}: evaluate tasks defined with "
            f"the model's vocabulary")
