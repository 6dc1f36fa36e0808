"""List a run's checkpoints: step, time, size, metrics, and which is latest and best (by
checkpoint.best_metric of that run). Incomplete step directories (a save cut short) are listed
apart; they are never resumed from."""

from __future__ import annotations

import argparse
import datetime

from mtjax import outputs

HELP = "list a run's checkpoints (step, time, size, metrics, latest, best)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", metavar="RUN_DIR",
                        help="a run directory (its --workdir), its checkpoints/ folder or one "
                        "checkpoint in it")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")


def run(args: argparse.Namespace) -> int:
    from mtjax.checkpoint import list_checkpoints

    listing = list_checkpoints(args.run_dir)
    if args.json:
        print(outputs.dumps(listing, indent=2))
        return 0
    metric = listing["best_metric"]
    print(f"{listing['run_dir']}/checkpoints  (best by {metric}, {listing['best_mode']})")
    width = max(10, len(metric))  # eval/<task>/<metric> names are long
    print(f"{'step':>8}  {'saved (UTC)':<19}  {'size':>9}  {metric:>{width}}  hosts")
    for row in listing["checkpoints"]:
        when = datetime.datetime.fromtimestamp(row["time"], datetime.timezone.utc)
        value = row["metrics"].get(metric)
        marks = [m for m, key in (("latest", "latest"), ("best", "best"))
                 if listing[key] == row["step"]]
        print(f"{row['step']:>8}  {when:%Y-%m-%d %H:%M:%S}  {row['bytes'] / 2**20:>6.1f}MiB  "
              f"{'' if value is None else f'{value:.4f}':>{width}}  {row['hosts']:>5}  "
              f"{' '.join(marks)}")
    if not listing["checkpoints"]:
        print("  (no complete checkpoint)")
    for name in listing["incomplete"]:
        print(f"  incomplete, not used: {name}")
    return 0
