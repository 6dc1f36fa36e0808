"""The ``mtjax`` command: parse, load the config, call a library function. Nothing else.

Exit codes: 0 success; 2 a user mistake (config key, unknown task or model, bad checkpoint),
printed as one line; 42 preempted by SIGTERM after saving a checkpoint (launchers requeue).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from mtjax import config as config_lib

USER_ERROR_EXIT_CODE = 2
DEFAULT_WORKDIR = "runs/default"


def _add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="a Python config file defining get_config() "
                        "(default: the built-in demo, configs/demo.py)")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="dotted config overrides, e.g. train.steps=100 "
                        "model.name=t5_1_1_small")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mtjax", description="Train T5 models on multitask SeqIO mixtures with JAX.")
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="train (or resume) a run",
                           description="Train a T5 on a SeqIO mixture; resumes from the "
                           "workdir's latest checkpoint.")
    _add_config_args(train)
    train.add_argument("--workdir", default=None,
                       help=f"run directory (default: {DEFAULT_WORKDIR})")
    train.add_argument("--init-from", default=None, metavar="DIR",
                       help="start from the weights of this checkpoint (fresh optimizer)")
    train.add_argument("--tasks-module", default=None, metavar="MODULE",
                       help="module path or .py file registering your own SeqIO tasks "
                       "(same as data.tasks_module=...)")
    train.add_argument("--no-progress", action="store_true", help="no progress bar")

    model = sub.add_parser("model", help="model sizes and their cost")
    model_sub = model.add_subparsers(dest="model_command", required=True)
    info = model_sub.add_parser("info", help="parameters, FLOPs and memory of a named model")
    info.add_argument("name", help="a named model, e.g. t5_1_1_base")
    info.add_argument("--inputs-length", type=int, default=512)
    info.add_argument("--targets-length", type=int, default=114)
    model_sub.add_parser("list", help="all named models")
    bench = sub.add_parser("bench", help="time the train step (JSON on stdout); "
                           "`mtjax bench train --help`", add_help=False)
    bench.add_argument("rest", nargs=argparse.REMAINDER)  # parsed by mtjax.bench.main
    return parser


def _cmd_train(args: argparse.Namespace) -> int:
    overrides = list(args.overrides)
    if args.tasks_module:
        overrides.append(f"data.tasks_module={args.tasks_module}")
    config = config_lib.load(args.config, overrides)
    from mtjax.parallel import distributed

    distributed.initialize_from_env()
    from mtjax.train import trainer

    workdir = args.workdir or DEFAULT_WORKDIR
    print(f"mtjax: workdir {os.path.abspath(workdir)}", file=sys.stderr)
    try:
        result = trainer.train(config, workdir, init_from=args.init_from,
                               progress=not args.no_progress)
    except trainer.Preempted:
        return trainer.PREEMPTED_EXIT_CODE
    _print_summary(result)
    return 0


def _print_summary(result) -> None:
    import jax

    if jax.process_index() != 0:
        return
    m = result.metrics
    lines = [f"\ntrained steps {result.start_step} -> {result.step} in {result.wall_s:.0f}s, "
             f"{result.tokens_per_s:.0f} tokens/s"]
    if "loss" in m:
        lines.append(f"final loss {m['loss']:.4f}, token accuracy {m['accuracy']:.3f}")
    for task in result.task_names:
        if f"loss/{task}" in m:
            lines.append(f"  {task:<28} loss {m[f'loss/{task}']:.4f}  "
                         f"accuracy {m[f'accuracy/{task}']:.3f}")
    wd = result.workdir.absolute()
    lines.append(f"run directory {wd}: config.json, metrics.jsonl, summary.json, tensorboard/, "
                 f"checkpoints/")
    print("\n".join(lines), file=sys.stderr)


def _cmd_model(args: argparse.Namespace) -> int:
    from mtjax.model import sizes

    if args.model_command == "list":
        for name in sizes.MODEL_SIZES:
            print(name)
        return 0
    from mtjax.train.footprint import model_info

    info = model_info(args.name, inputs_length=args.inputs_length,
                      targets_length=args.targets_length)
    print(json.dumps(info, indent=2))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "bench":
        from mtjax import bench

        return bench.main(args.rest)
    from mtjax.errors import UserError
    from mtjax.train.trainer import TrainingError

    try:
        if args.command == "train":
            return _cmd_train(args)
        if args.command == "model":
            return _cmd_model(args)
    except UserError as e:
        message = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"mtjax: error: {message}", file=sys.stderr)
        return USER_ERROR_EXIT_CODE
    except TrainingError as e:
        print(f"mtjax: training stopped: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
