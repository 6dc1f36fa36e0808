"""Train a T5 on a SeqIO mixture; re-running with the same workdir resumes from its latest
checkpoint. Exit codes: 0 done, 1 stopped (non-finite loss), 2 user mistake, 42 preempted
(SIGTERM; a checkpoint was written; run the same command again to resume), 130 Ctrl-C (the same,
saved at the end of the step; a second Ctrl-C stops at once)."""

from __future__ import annotations

import argparse
import signal
import sys

from mtjax import config as config_lib
from mtjax import outputs
from mtjax.errors import UserError

HELP = "train (or resume) a run"
PARSER_KWARGS = {"formatter_class": argparse.RawDescriptionHelpFormatter,
                 "epilog": config_lib.keys_help()}
DEFAULT_WORKDIR = "runs/default"


def add_config_arguments(parser: argparse.ArgumentParser,
                         example: str = "train.steps=100 model.name=t5_1_1_small") -> None:
    """--config FILE and KEY=VALUE overrides, shared by every command that takes a config;
    ``example``: overrides that mean something to the command."""
    parser.add_argument("--config", help="a Python config file defining get_config() "
                        "(default: the built-in demo, configs/demo.py)")
    # default=[]: argparse otherwise lists an empty `*` positional among the missing ones.
    parser.add_argument("overrides", nargs="*", default=[], metavar="KEY=VALUE",
                        help=f"dotted config overrides, e.g. {example}")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser)
    parser.add_argument("--workdir", default=None,
                        help=f"run directory (default: {DEFAULT_WORKDIR})")
    parser.add_argument("--init-from", default=None, metavar="DIR",
                        help="start from the weights of this checkpoint (fresh optimizer)")
    parser.add_argument("--tasks-module", default=None, metavar="MODULE",
                        help="module path or .py file registering your own SeqIO tasks "
                        "(same as data.tasks_module=...)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--dry-run", action="store_true",
                        help="print the mesh, per-device memory and parameter shardings, "
                        "compile the step, and exit without training (JSON on stdout)")


def run(args: argparse.Namespace) -> int:
    from mtjax.train import early_stop

    previous = early_stop.install()  # before the seconds of imports below
    try:
        return _run(args)
    finally:
        signal.signal(signal.SIGTERM, previous)


def _run(args: argparse.Namespace) -> int:
    overrides = list(args.overrides)
    if args.tasks_module:
        overrides.append(f"data.tasks_module={args.tasks_module}")
    from mtjax.parallel import distributed

    try:
        config = config_lib.load(args.config, overrides)
    except UserError as failure:
        distributed.stop_with_the_others(failure)
        raise
    distributed.initialize_from_env()
    if args.dry_run:
        return _dry_run(config)
    from mtjax.train import preemption, trainer

    workdir = args.workdir or DEFAULT_WORKDIR
    try:
        result = trainer.train(config, workdir, init_from=args.init_from,
                               progress=not args.no_progress)
    except preemption.Preempted as stopped:
        return stopped.exit_code
    _print_summary(result, label_smoothing=config.train.label_smoothing)
    return 0


def _dry_run(config: config_lib.Config) -> int:
    from mtjax.parallel import distributed
    from mtjax.parallel import mesh as mesh_lib
    from mtjax.train import dryrun, setup

    failure = None
    try:
        mesh, _ = setup.mesh_and_rules(config)
    except UserError as e:
        failure = e
    distributed.agree_on_set_up(failure)  # what train does first: the hosts stop together
    print(f"mtjax: planning {config.model.name} and compiling its train step (nothing runs; "
          "a large model takes minutes)", file=sys.stderr, flush=True)
    report = dryrun.dry_run(config)
    print(dryrun.format_report(report, mesh_lib.describe(mesh)), file=sys.stderr)
    print(outputs.dumps(report, indent=2))
    return 0


def _steps_text(steps: list[int], shown: int = 10) -> str:
    text = ", ".join(map(str, steps[:shown]))
    return text + (f" and {len(steps) - shown} more" if len(steps) > shown else "")


def _print_summary(result, label_smoothing: float = 0.0) -> None:
    """The closing lines: speed, the final training figures, and each task's, with its
    held-out ones apart (tasks of an eval.mixture the run did not train on too)."""
    import jax

    if jax.process_index() != 0 or result.step == result.start_step:
        return  # nothing was trained (the trainer said so)
    m = result.metrics
    lines = [f"\ntrained steps {result.start_step} -> {result.step} in {result.wall_s:.0f}s, "
             + (f"{result.tokens_per_s:.0f} tokens/s" if result.tokens_per_s is not None
                else "tokens/s not measured (only one step ran, and it compiles)")
             + (f", {100 * result.throughput['mfu']:.1f}% MFU" if "mfu" in result.throughput
                else "")]
    if result.skipped_steps:
        lines.append(f"{len(result.skipped_steps)} of {result.step - result.start_step} updates "
                     f"skipped (non-finite): steps {_steps_text(result.skipped_steps)}")
    if "loss" in m:
        at = (f" (logged at step {result.metrics_step})"
              if result.metrics_step not in (None, result.step) else "")
        # Smoothed, the training loss sits above the held-out one, which is not smoothed.
        smoothed = f", label-smoothed by {label_smoothing:g}" if label_smoothing else ""
        lines.append(f"final loss {m['loss']:.4f}{smoothed}, token accuracy "
                     f"{m['accuracy']:.3f}{at}")
    held_out = sorted({key.split("/")[1] for key in m if key.startswith("eval/")}
                      - set(result.task_names))
    for task in [*result.task_names, *held_out]:
        # A task can miss the last logging window (a small batch) and still have eval results.
        train = (f"loss {m[f'loss/{task}']:.4f}  accuracy {m[f'accuracy/{task}']:.3f}"
                 if f"loss/{task}" in m else "(not trained on)" if task in held_out
                 else "(not in the last logged batches)")
        evals = "  ".join(f"{key.split('/')[-1]} {value:.3g}"
                          for key, value in sorted(m.items()) if key.startswith(f"eval/{task}/"))
        # Held-out figures apart: the eval `loss` beside training's would read as one of them.
        evals = f"  | eval: {evals}" if evals else ""
        if f"loss/{task}" in m or evals:
            lines.append(f"  {task:<28} {train}{evals}")
    if result.compilation_cache is not None and result.compilation_cache.directory:
        lines.append(result.compilation_cache.describe())
    wd = result.workdir.absolute()
    written = ["config.json", "metrics.jsonl", "summary.json"]
    written += [d + "/" for d in ("tensorboard", "profile") if (wd / d).is_dir()]
    lines.append(f"run directory {wd}: {', '.join(written + ['checkpoints/'])}")
    print("\n".join(lines), file=sys.stderr)
