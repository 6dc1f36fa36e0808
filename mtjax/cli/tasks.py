"""Look at tasks and mixtures before training.

    mtjax tasks list [--json]
    mtjax tasks show NAME                       source, preprocessors, features, sizes, rate (JSON)
    mtjax tasks preview NAME -n 5 [--split S]   decoded examples, token lengths, truncation rate

All take `--tasks-module` for your own tasks, and `--config FILE` / KEY=VALUE overrides for the
lengths (data.inputs_length, data.targets_length), vocabulary and mixing strategy of a run.
"""

from __future__ import annotations

import argparse
import sys

from mtjax import config as config_lib
from mtjax import outputs
from mtjax.cli.train import add_config_arguments

HELP = "list, show and preview tasks and mixtures; `mtjax tasks --help`"
PARSER_KWARGS = {"add_help": False}  # build_parser owns the flags (KEY=VALUE after options)
COMMANDS = ("list", "show", "preview")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    # Why a flag of our own: with add_help off, a leading --help would not reach `rest`.
    parser.add_argument("-h", "--help", action="store_true", dest="tasks_help")
    parser.add_argument("rest", nargs=argparse.REMAINDER)


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser of `mtjax tasks COMMAND ...` (one per command, so KEY=VALUE may follow flags)."""
    parser = argparse.ArgumentParser(prog="mtjax tasks" + (f" {command}" if command else ""),
                                     description=__doc__, allow_abbrev=False,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    if command is None:
        parser.add_argument("command", choices=COMMANDS, metavar="{" + ",".join(COMMANDS) + "}")
        return parser
    if command in ("show", "preview"):
        parser.add_argument("name", help="a task or mixture name")
        parser.add_argument("--split", default="train",
                            help="the split to read (default train; e.g. validation)")
    parser.add_argument("--tasks-module", default=None, metavar="MODULE",
                        help="module path or .py file registering your own SeqIO tasks")
    if command in ("list", "preview"):
        parser.add_argument("--json", action="store_true", help="JSON lines on stdout")
    if command == "preview":
        parser.add_argument("-n", "--num-examples", type=int, default=5,
                            help="examples shown per task (default 5)")
        parser.add_argument("--sample", type=int, default=500,
                            help="examples per task measured for lengths and truncation "
                            "(default 500)")
    add_config_arguments(parser, example="data.inputs_length=512 data.mixing=temperature")
    return parser


def parse(argv: list[str]) -> argparse.Namespace:
    """Parses what follows `mtjax tasks`; --help and mistakes exit as argparse does."""
    if not argv or argv[0] not in COMMANDS:
        build_parser().parse_args(argv[:1])
    args = build_parser(argv[0]).parse_intermixed_args(argv[1:])
    args.tasks_command = argv[0]
    return args


def _setup(args: argparse.Namespace) -> config_lib.Config:
    overrides = list(args.overrides)
    if args.tasks_module:
        overrides.append(f"data.tasks_module={args.tasks_module}")
    config = config_lib.load(args.config, overrides)
    from absl import logging as absl_logging

    absl_logging.set_verbosity(absl_logging.ERROR)  # seqio's info/warnings are not for users
    from mtjax.data import pipeline

    pipeline.prepare(config)
    return config


def run(args: argparse.Namespace) -> int:
    args = parse(["--help"] if args.tasks_help else args.rest)
    config = _setup(args)
    return {"list": _list, "show": _show, "preview": _preview}[args.tasks_command](args, config)


def _list(args: argparse.Namespace, config: config_lib.Config) -> int:
    import seqio

    rows = []
    for name in sorted(seqio.MixtureRegistry.names()):
        mixture = seqio.MixtureRegistry.get(name)
        rows.append({"name": name, "kind": "mixture",
                     "detail": f"{len(mixture.tasks)} task{'s' * (len(mixture.tasks) != 1)}: "
                     + ", ".join(
                         t.name for t in mixture.tasks)})
    for name in sorted(seqio.TaskRegistry.names()):
        task = seqio.TaskRegistry.get(name)
        rows.append({"name": name, "kind": "task", "detail": type(task.source).__name__})
    if args.json:
        for row in rows:
            print(outputs.dumps(row))
        return 0
    width = max(len(r["name"]) for r in rows)
    for row in rows:
        detail = row["detail"] if len(row["detail"]) < 90 else row["detail"][:87] + "..."
        print(f"{row['name']:<{width}}  {row['kind']:<8} {detail}")
    return 0


def _show(args: argparse.Namespace, config: config_lib.Config) -> int:
    from mtjax.data import preview

    data = config.data
    info = preview.describe(args.name, mixture=data.mixture, mixing=data.mixing,
                            cap=data.mixing_cap, temperature=data.mixing_temperature,
                            split=args.split, vocabulary=data.vocabulary)
    table = info.pop("table", None)
    print(outputs.dumps(preview.as_json(info), indent=2))
    if table:
        print(table, file=sys.stderr)
    return 0


def _preview(args: argparse.Namespace, config: config_lib.Config) -> int:
    import seqio

    from mtjax.data import preview
    from mtjax.data.pipeline import _shared_vocabulary, lookup

    if args.num_examples < 0 or args.sample < 1:
        raise config_lib.ConfigError("-n must be >= 0 and --sample >= 1")
    provider = lookup(args.name)
    tasks = provider.tasks if isinstance(provider, seqio.Mixture) else [provider]
    # Tasks on another vocabulary than data.vocabulary are refused, as `train` refuses them.
    _shared_vocabulary(args.name, tasks, config.data.vocabulary)
    lengths = {"inputs": config.data.inputs_length, "targets": config.data.targets_length}
    stats_by_task = {}
    for task in tasks:
        print(f"reading {task.name} ...", file=sys.stderr, flush=True)
        examples = preview.untrimmed_examples(task, args.split, lengths,
                                              max(args.sample, args.num_examples),
                                              seed=config.train.seed)
        stats = stats_by_task[task.name] = preview.length_stats(examples, lengths)
        vocab = task.output_features["targets"].vocabulary
        shown = []
        for ex in examples[:args.num_examples]:
            row = {"task": task.name}
            for key in preview.FEATURES:
                text, cut = preview.decode(vocab, ex[key], lengths[key])
                row[key] = text
                row[f"{key}_tokens"] = len(ex[key])
                row[f"{key}_truncated"] = cut
            shown.append(row)
        if args.json:
            for row in shown:
                print(outputs.dumps(row))
            print(outputs.dumps({"task": task.name, "stats": stats}))
        else:
            _print_task(task.name, shown, stats)
    for warning in preview.truncation_warnings(stats_by_task):
        print(f"mtjax: {warning}", file=sys.stderr)
    return 0


def _print_task(name: str, shown: list[dict], stats: dict) -> None:
    print(f"== {name}")
    for i, row in enumerate(shown):
        for key in ("inputs", "targets"):
            mark = "  [truncated]" if row[f"{key}_truncated"] else ""
            print(f"  [{i}] {key:<7} ({row[f'{key}_tokens']:>4} tokens){mark}: {row[key]!r}")
    print(f"  lengths over {stats['examples']} examples (tokens, EOS included):")
    for key in ("inputs", "targets"):
        s = stats[key]
        print(f"    {key:<7} mean {s['mean']:7.1f}  p50 {s['p50']:5d}  p90 {s['p90']:5d}  "
              f"max {s['max']:5d}  | length {s['length']:5d} truncates {s['truncated']:6.1%}")
    print(f"    truncated (either side): {stats['truncated']:.1%}")
