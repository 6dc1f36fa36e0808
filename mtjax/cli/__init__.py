"""The ``mtjax`` command: parse, initialise, call a library function. Nothing else.

Each subcommand lives in its own module ``mtjax/cli/<name>.py`` defining

    HELP: str                                   one line for ``mtjax --help``
    def add_arguments(parser) -> None           its flags
    def run(args) -> int                        calls the library; returns the exit code

Modules are discovered, so a new command is a new file. Exit codes: 0 success; 1 training
stopped (non-finite loss); 2 a user mistake (config key, unknown task or model, bad checkpoint),
printed as one line without a traceback; 42 preempted by SIGTERM after saving a checkpoint
(launchers requeue on it).
"""

from __future__ import annotations

import argparse
import importlib
import os
import pkgutil
import sys
from types import ModuleType

USER_ERROR_EXIT_CODE = 2
TRAINING_ERROR_EXIT_CODE = 1


def _command_modules() -> dict[str, ModuleType]:
    modules = {}
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda i: i.name):
        if info.name.startswith("_"):
            continue
        modules[info.name] = importlib.import_module(f"{__name__}.{info.name}")
    return modules


def build_parser() -> argparse.ArgumentParser:
    # allow_abbrev=False everywhere: `--task` given to a command without it must not be taken
    # for `--tasks-module`.
    parser = argparse.ArgumentParser(
        prog="mtjax", description="Train T5 models on multitask SeqIO mixtures with JAX.",
        allow_abbrev=False)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, module in _command_modules().items():
        kwargs = getattr(module, "PARSER_KWARGS", {})
        command = sub.add_parser(name, help=module.HELP, description=module.__doc__,
                                 allow_abbrev=False, **kwargs)
        module.add_arguments(command)
        command.set_defaults(_run=module.run)
    return parser


def _parse(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """``parse_args``, except that KEY=VALUE overrides may also follow options
    (``mtjax train data.mixture=x --workdir runs/x train.steps=40``): argparse alone takes
    positionals in one run only, and its intermixed parsing does not work with subcommands."""
    args, extra = parser.parse_known_args(argv)
    overrides = [a for a in extra if "=" in a and not a.startswith("-")]
    if extra and (len(overrides) < len(extra) or not hasattr(args, "overrides")):
        unknown = [a for a in extra if a not in overrides or not hasattr(args, "overrides")]
        _command_parser(parser, args.command).error(
            f"unrecognized arguments: {' '.join(unknown)}")
    if overrides:
        args.overrides = [*args.overrides, *overrides]
    if hasattr(args, "overrides"):
        from mtjax import config as config_lib

        for note in config_lib.repeated_keys(args.overrides):
            print(f"mtjax: note: {note}", file=sys.stderr)
    return args


def _command_parser(parser: argparse.ArgumentParser, command: str) -> argparse.ArgumentParser:
    """The parser of one subcommand, whose usage line an error should show."""
    for action in parser._subparsers._group_actions:  # argparse keeps no public handle
        if command in getattr(action, "choices", {}):
            return action.choices[command]
    return parser


def main(argv: list[str] | None = None) -> int:
    if argv is None:  # a real command line, not a call from Python: the process is ours
        from mtjax import malloc_env

        malloc_env.reexec_with_hugepages()  # returns only where nothing is to be done
    argv = sys.argv[1:] if argv is None else list(argv)
    from mtjax import xla_env

    xla_env.set_cpu_defaults()  # before JAX starts a backend; never over the user's XLA_FLAGS
    if argv[:1] == ["bench"]:  # `mtjax bench` owns all of its flags, --help included
        from mtjax import bench

        return bench.main(argv[1:])
    args = _parse(build_parser(), argv)
    from mtjax.errors import TrainingError, UserError

    try:
        return args._run(args)
    except UserError as e:
        message = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"mtjax: error: {message}", file=sys.stderr)
        return USER_ERROR_EXIT_CODE
    except TrainingError as e:
        print(f"mtjax: training stopped: {e}", file=sys.stderr)
        return TRAINING_ERROR_EXIT_CODE
    except KeyboardInterrupt:  # a Ctrl-C that nothing turned into an orderly stop
        print("\nmtjax: interrupted (Ctrl-C)", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `mtjax checkpoints RUN --json | head`: the reader has all it wants
        # Python would report the failed flush of stdout at exit too; point it at /dev/null.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + 13  # as a shell reports a process ended by SIGPIPE


if __name__ == "__main__":
    sys.exit(main())
