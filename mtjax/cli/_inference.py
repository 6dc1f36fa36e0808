"""Flags and start-up shared by the commands that read a checkpoint (eval, infer, score)."""

from __future__ import annotations

import argparse
import contextlib
import functools
import sys
from collections.abc import Callable, Iterator

from mtjax.errors import UserError

# Greedy decoding and sampling have no length penalty: a silent --alpha would look applied.
ALPHA_WITHOUT_BEAMS = ("--alpha is beam search's length penalty, and decoding is not a beam "
                       "search without --beam-size: add --beam-size N, or drop --alpha")


def add_checkpoint_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, metavar="DIR",
                        help="a run directory or its checkpoints/ directory (the latest "
                        "checkpoint), or one checkpoint directory (<run>/checkpoints/<step>, "
                        "or its state/ folder)")
    parser.add_argument("--tasks-module", default=None, metavar="MODULE",
                        help="module path or .py file registering your own SeqIO tasks "
                        "(default: the one the run was trained with)")
    parser.add_argument("--batch-size", type=int, default=32,
                        help="sequences per compiled batch (default 32)")
    parser.add_argument("--no-progress", action="store_true", help="no progress on stderr")


def check_output(args: argparse.Namespace) -> None:
    """A bad --output fails now, in one line, not after the work."""
    if getattr(args, "output", None) not in (None, "-"):
        from mtjax import outputs

        outputs.check_writable(args.output)


def note_empty_input(args: argparse.Namespace, records: list) -> None:
    if not records:
        print(f"mtjax: note: {args.input} holds no records (blank lines are skipped); "
              f"nothing to do", file=sys.stderr, flush=True)


def on_every_host(run: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """A command's ``run`` whose mistakes before the checkpoint loads (a flag, an --input file
    one host lacks) stop every host of a multi-host run, not this one alone."""

    @functools.wraps(run)
    def wrapped(args: argparse.Namespace) -> int:
        try:
            return run(args)
        except UserError as failure:
            from mtjax.parallel import distributed

            distributed.stop_with_the_others(failure)
            raise

    return wrapped


def load(args: argparse.Namespace):
    """Start multi-host JAX if configured, then load the checkpoint (params only)."""
    from mtjax.config import ConfigError

    if args.batch_size < 1:
        raise ConfigError(f"--batch-size must be positive, got {args.batch_size}")
    check_output(args)
    from mtjax.parallel import distributed

    distributed.initialize_from_env()
    from mtjax.infer import load as load_lib

    # What can fail on one host alone, checked before any host reads the checkpoint (Orbax
    # reads, even a config's JSON, wait for every host).
    failure = step_dir = None
    try:
        step_dir = load_lib.find_step_dir(args.checkpoint)
    except UserError as e:
        failure = e
    distributed.agree_on_set_up(failure)
    # Tasks modules after the run's config: their tasks that name no vocabulary take the run's.
    failure = None
    try:
        load_lib.import_tasks(load_lib.read_config(step_dir), step_dir, args.tasks_module)
        _check_names(args)  # a misspelt --task or --mixture fails before minutes of loading
    except UserError as e:
        failure = e
    distributed.agree_on_set_up(failure)
    model = load_lib.load(step_dir, tasks_module=args.tasks_module)
    load_lib.check_vocabulary_fits(model)
    from mtjax import compile_cache

    compile_cache.enable(model.config.train.compilation_cache)  # the run's own setting
    _log(args, f"mtjax: loaded {model.config.model.name} from {model.step_dir}")
    return model


def _check_names(args: argparse.Namespace) -> None:
    """The task (infer's --task) or mixture (eval's --mixture) named on the command line is
    registered, now that the run's tasks module is imported."""
    if getattr(args, "task", None):
        from mtjax.infer import records as records_lib

        records_lib.TaskText(args.task)  # an unknown name, or a mixture
    if getattr(args, "mixture", None):
        from mtjax.data import pipeline

        pipeline.lookup(args.mixture)


def _log(args: argparse.Namespace, message: str) -> None:
    if not args.no_progress:
        print(message, file=sys.stderr, flush=True)


@contextlib.contextmanager
def progress_bar(args: argparse.Namespace, total: int, unit: str) -> Iterator:
    """A tqdm bar on stderr; yields ``update(done)``."""
    from tqdm import tqdm

    # The first batch compiles the model (seconds to minutes): say so, rather than show a
    # rate that looks like the model's speed.
    bar = tqdm(total=total, unit=unit, file=sys.stderr, dynamic_ncols=True,
               disable=args.no_progress, desc="compiling")

    def update(done: int) -> None:
        if bar.n == 0 and done:
            bar.set_description_str("", refresh=False)
        bar.update(done - bar.n)

    try:
        yield update
    finally:
        bar.close()
