"""``mtjax bench``: benchmarks that print one JSON object on stdout and a table on stderr.

Usage::

    mtjax bench train [--smoke] [--steps N] [--warmup N] [--peak-flops F] [--output FILE.json]
                      [--profile DIR] [--config FILE] [KEY=VALUE ...]
    mtjax bench all   (same flags: every registered benchmark on the configured model)

A benchmark is a function ``run(config, options) -> dict`` registered in :data:`BENCHMARKS`;
``all`` runs them in registration order, so data, checkpoint and decode benchmarks plug in with
one line each.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import pathlib
import sys
from collections.abc import Callable
from typing import Any

from mtjax import config as config_lib
from mtjax import outputs

# The peer comparison's shape (benchmarks/README.md): T5 1.1 style 512 wide, 6+6 layers, batch 8,
# 512/128, AdamW. Applied before the user's overrides, and only without --config.
DEFAULT_OVERRIDES = ("model.name=t5_1_1_peer", "train.batch_size=8", "data.inputs_length=512",
                     "data.targets_length=128", "optim.name=adamw")
# CI: compiles in seconds on a CPU. Applied after the defaults, before the user's overrides.
SMOKE_OVERRIDES = ("model.name=t5_1_1_test", "train.batch_size=2", "data.inputs_length=32",
                   "data.targets_length=16")
SMOKE_STEPS, SMOKE_WARMUP, SMOKE_MATMUL = 3, 1, 512
PROFILE_STEPS = 3  # traced by --profile where log.profile_steps is 0

Benchmark = Callable[[config_lib.Config, Any], dict[str, Any]]


def _train(config: config_lib.Config, options: Any) -> dict[str, Any]:
    from mtjax.bench import train  # imports JAX: only when a benchmark runs

    return train.run(config, options)


# name -> benchmark; `all` runs every entry. Add data/checkpoint/decode here.
BENCHMARKS: dict[str, Benchmark] = {"train": _train}


def _decode(config: config_lib.Config, options: Any) -> dict[str, Any]:
    from mtjax.bench import decode  # imports JAX: only when a benchmark runs

    return decode.run(config, options)


def _checkpoint(config: config_lib.Config, options: Any) -> dict[str, Any]:
    from mtjax.bench import checkpoint  # imports JAX and Orbax: only when a benchmark runs

    return checkpoint.run(config, options)


BENCHMARKS["decode"] = _decode
BENCHMARKS["checkpoint"] = _checkpoint
BENCHMARKS["data"] = lambda config, options: __import__("mtjax.bench.data").bench.data.run(config, options)  # noqa: E501 - imports TF only when run


_EPILOG = f"""benchmarks:
  train       the compiled train step alone on full-length batches: compile time, step time
              (median, min, max), tokens/s, model FLOPs, MFU, memory
  decode      greedy and 4-beam decoding at batch 1 and 64: decoded tokens/s
  checkpoint  save and restore MB/s, and what asynchronous saving costs the step
  data        the input pipeline alone: examples/s, packed tokens/s, packing efficiency
  all         all four, in this order

Without --config the shape is the peer comparison's (T5 1.1 style, d_model 512, 6+6 layers;
benchmarks/README.md):
  {" ".join(DEFAULT_OVERRIDES)}
--smoke then applies
  {" ".join(SMOKE_OVERRIDES)}
and KEY=VALUE overrides any key of `mtjax train`. Examples:
  mtjax bench train model.name=t5_1_1_small
  mtjax bench all model.name=t5_1_1_base model.dtype=bfloat16 train.batch_size=64 \\
      data.inputs_length=512 data.targets_length=114 --output base.json
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mtjax bench", description="Time mtjax on synthetic data; JSON on stdout, a table "
        "on stderr.", epilog=_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False)
    parser.add_argument("benchmark", choices=[*BENCHMARKS, "all"])
    parser.add_argument("--smoke", action="store_true",
                        help=f"tiny model and lengths, {SMOKE_STEPS} timed steps (CI)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default 10)")
    parser.add_argument("--warmup", type=int, default=None,
                        help="untimed steps after compilation (default 2)")
    parser.add_argument("--peak-flops", type=float, default=None,
                        help="peak FLOP/s of one GPU/TPU chip (or of one host's CPU) for MFU; "
                        "MFU divides by it times the chips (hosts) of the job (default: the "
                        "chip table, or a measured matmul on CPU)")
    parser.add_argument("--output", default=None, metavar="FILE.json",
                        help="also write the JSON here")
    parser.add_argument("--profile", default=None, metavar="DIR",
                        help="`train`: after the timed steps, trace log.profile_steps more "
                        f"(default {PROFILE_STEPS}) with JAX's profiler into DIR, for "
                        "TensorBoard, XProf or Perfetto (the figures are of untraced steps)")
    parser.add_argument("--config", default=None,
                        help="a Python config file (default: the peer shape, below)")
    parser.add_argument("--tasks-module", default=None, metavar="MODULE",
                        help="module path or .py file registering your own SeqIO tasks, for "
                        "`bench data` (same as data.tasks_module=...)")
    parser.add_argument("overrides", nargs="*", default=[], metavar="KEY=VALUE",
                        help="dotted config overrides, as for `mtjax train`")
    return parser


def resolve(args: argparse.Namespace):
    """The config and options a command line asks for.

    Returns:
        (Config, train.BenchOptions).

    Raises:
        config_lib.ConfigError: a bad key, value or flag.
    """
    from mtjax.bench.train import BenchOptions

    overrides = [] if args.config else list(DEFAULT_OVERRIDES)
    if args.smoke:
        overrides += SMOKE_OVERRIDES
    overrides += list(args.overrides)
    if args.tasks_module:
        overrides.append(f"data.tasks_module={args.tasks_module}")
    config = config_lib.load(args.config, overrides)
    options = BenchOptions()
    if args.smoke:
        options = dataclasses.replace(options, steps=SMOKE_STEPS, warmup=SMOKE_WARMUP,
                                      matmul_size=SMOKE_MATMUL, smoke=True)
    if args.steps is not None:
        options = dataclasses.replace(options, steps=args.steps)
    if args.warmup is not None:
        options = dataclasses.replace(options, warmup=args.warmup)
    if options.steps < 1 or options.warmup < 0:
        raise config_lib.ConfigError("--steps must be >= 1 and --warmup >= 0")
    if args.peak_flops is not None and not (math.isfinite(args.peak_flops)
                                            and args.peak_flops > 0):
        raise config_lib.ConfigError(
            f"--peak-flops must be a positive number of FLOP/s (e.g. 989e12), got "
            f"{args.peak_flops}")
    if args.profile is not None:
        _check_profile_dir(args.profile)
        options = dataclasses.replace(options, profile_dir=args.profile,
                                      profile_steps=config.log.profile_steps or PROFILE_STEPS)
    return config, dataclasses.replace(options, peak_flops=args.peak_flops)


def _check_profile_dir(path: str) -> None:
    """``--profile DIR`` usable (created if missing), before minutes of benchmarking."""
    target = pathlib.Path(path)
    try:
        target.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise outputs.OutputError(f"--profile {path!r}: cannot create the directory "
                                  f"({e.strerror or e})") from None
    if not os.access(target, os.W_OK | os.X_OK):
        raise outputs.OutputError(f"--profile {path!r}: the directory is not writable")


def run(names: list[str], config: config_lib.Config, options: Any) -> dict[str, dict[str, Any]]:
    """Run the named benchmarks in order, printing each table to stderr; name -> result."""
    from mtjax.bench import report

    results = {}
    for name in names:
        report.reset_host_peak_memory()
        device_peak_before = report.device_peak_memory_bytes()
        result = results[name] = BENCHMARKS[name](config, options)
        # JAX cannot reset a device's peak: one no higher than before this benchmark belongs
        # to an earlier one, and this benchmark's own is unknown.
        peak = result.get("device_peak_memory_bytes")
        if peak is not None and device_peak_before and peak <= device_peak_before:
            result["device_peak_memory_bytes"] = None
            result["device_peak_memory_note"] = (
                f"no higher than an earlier benchmark's peak in this process "
                f"({device_peak_before} bytes); run `mtjax bench {name}` alone for its own")
        print(report.format_table(name, result), file=sys.stderr, flush=True)
    return results


def main(argv: list[str]) -> int:
    """Entry point of ``mtjax bench``; ``argv`` is what follows ``bench`` on the command line.

    Returns:
        0 on success, 2 on a config mistake (message on stderr).
    """
    args = build_parser().parse_intermixed_args(argv)
    for note in config_lib.repeated_keys(args.overrides):
        print(f"mtjax bench: note: {note}", file=sys.stderr)
    from mtjax.errors import UserError

    try:
        if args.output:
            outputs.check_writable(args.output)  # before minutes of benchmarking
        config, options = resolve(args)
        names = list(BENCHMARKS) if args.benchmark == "all" else [args.benchmark]
        results = run(names, config, options)
    except UserError as e:  # a bad key, model, mesh, mixture or tasks module
        message = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"mtjax bench: error: {message}", file=sys.stderr)
        return 2
    # `train` prints its result; `all` nests them so new benchmarks add keys, not shapes.
    result = results[args.benchmark] if args.benchmark in BENCHMARKS else {"benchmarks": results}
    text = outputs.dumps(result, indent=2)
    print(text)
    if args.output:
        try:
            outputs.write_text(args.output, text + "\n")
        except OSError as e:  # a full disk, a filesystem that takes no new files (/proc)
            print(f"mtjax bench: error: --output {args.output}: cannot write it ({e}); the "
                  f"result is on stdout above", file=sys.stderr)
            return 2
    return 0
