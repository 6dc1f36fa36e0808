"""List a run's checkpoints: step, time, size, metrics, and which is latest and best (by
checkpoint.best_metric of that run). Incomplete step directories (a save cut short) are listed
apart; they are never resumed from. ``--verify`` reads every array of every step (or of the
one step given) back and compares it with the checksum saved with it."""

from __future__ import annotations

import argparse
import datetime
import sys

from mtjax import outputs

HELP = "list a run's checkpoints (step, time, size, metrics, latest, best)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", metavar="RUN_DIR",
                        help="a run directory (its --workdir), its checkpoints/ folder or one "
                        "checkpoint in it")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("--verify", action="store_true",
                        help="read every array of every step (or of the one step given) and "
                        "compare it with the checksum saved with it (exit 1 when a step is "
                        "damaged)")


def run(args: argparse.Namespace) -> int:
    from mtjax.checkpoint import list_checkpoints
    from mtjax.checkpoint.listing import given_step

    listing = list_checkpoints(args.run_dir)
    # Given one step (or its state item), --verify reads that step alone.
    damaged = _verify(listing, given_step(args.run_dir)) if args.verify else []
    status = 1 if damaged else 0
    if args.json:
        print(outputs.dumps(listing, indent=2))
        _say_damaged(listing, damaged)
        return status
    metric = listing["best_metric"]
    print(f"{listing['run_dir']}/checkpoints  (best by {metric}, {listing['best_mode']})")
    width = max(10, len(metric))  # eval/<task>/<metric> names are long
    print(f"{'step':>8}  {'saved (UTC)':<19}  {'size':>9}  {metric:>{width}}  hosts"
          + ("  verified" if args.verify else ""))
    for row in listing["checkpoints"]:
        when = datetime.datetime.fromtimestamp(row["time"], datetime.timezone.utc)
        value = row["metrics"].get(metric)
        marks = [m for m, key in (("latest", "latest"), ("best", "best"))
                 if listing[key] == row["step"]]
        print(f"{row['step']:>8}  {when:%Y-%m-%d %H:%M:%S}  {row['bytes'] / 2**20:>6.1f}MiB  "
              f"{'' if value is None else f'{value:.4f}':>{width}}  {row['hosts']:>5}  "
              + (f"{row.get('verify', {}).get('status', '-'):<9} " if args.verify else "")
              + " ".join(marks))
    if not listing["checkpoints"]:
        print("  (no complete checkpoint)")
    for name in listing["incomplete"]:
        print(f"  incomplete, not used: {name}")
    for row in listing["checkpoints"] if args.verify else []:
        if row.get("verify", {"status": "ok"})["status"] != "ok":
            print(f"  step {row['step']} {row['verify']['status']}: {row['verify']['reason']}")
    _say_damaged(listing, damaged)
    return status


def _say_damaged(listing: dict, damaged: list[int]) -> None:
    if damaged:
        good = [r["step"] for r in listing["checkpoints"]
                if r.get("verify", {}).get("status") in ("ok", "unchecked")]
        print(f"damaged: step {', '.join(map(str, damaged))} (a resume sets a damaged step aside "
              f"and takes the newest good one; eval and infer refuse it"
              + (f": give step {good[-1]}" if good else "") + ")", file=sys.stderr)


def _verify(listing: dict, only: int | None = None) -> list[int]:
    """Verify every complete step of ``listing`` (or step ``only``) in place (a ``verify``
    entry per row verified, progress on stderr); returns the damaged steps."""
    from mtjax.checkpoint.verify import verify_step

    damaged = []
    for row in listing["checkpoints"]:
        if only is not None and row["step"] != only:
            continue
        print(f"verifying step {row['step']} ...", end="", file=sys.stderr, flush=True)
        row["verify"] = verify_step(row["path"])
        print(f" {row['verify']['status']} ({row['verify']['arrays']} arrays, "
              f"{row['verify']['bytes'] / 2**20:.1f} MiB, {row['verify']['seconds']:.1f} s)",
              file=sys.stderr)
        if row["verify"]["status"] == "damaged":
            damaged.append(row["step"])
    return damaged
