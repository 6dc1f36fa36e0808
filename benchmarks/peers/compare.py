"""Run mtjax and its peers one after another at the same shape; print ratios as JSON + a table.

The machine this project develops on is noisy (10-20% between minutes), so a ratio is only
meaningful when both numbers come from one sitting. This script is that sitting:

    python benchmarks/peers/compare.py --model t5_1_1_peer --output compare_peer.json \\
        --mtjax "mtjax" --torch-python /tmp/peers/bin/python --flax-python /tmp/flaxpeer/bin/python

Each entry runs in its own process (a fresh JAX/torch, nothing shared), in the order given by
``--order``; an entry whose interpreter is not given is skipped. ``mtjax`` is interleaved first
and last by default so drift during the sitting shows up as the spread of its two runs. Stdout:
one JSON object (every result, and each peer's tokens/s ratio to mtjax's best run); stderr: a
markdown table for the README.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import shlex
import subprocess
import sys
import tempfile
import time

_HERE = pathlib.Path(__file__).resolve().parent


def _entries(args: argparse.Namespace) -> dict[str, list[str] | None]:
    shape = ["--model", args.model, "--batch-size", str(args.batch_size), "--inputs-length",
             str(args.inputs_length), "--targets-length", str(args.targets_length),
             "--steps", str(args.steps), "--warmup", str(args.warmup),
             "--microbatches", str(args.microbatches)]
    mtjax_shape = [f"model.name={args.model}", f"train.batch_size={args.batch_size}",
                   f"data.inputs_length={args.inputs_length}",
                   f"data.targets_length={args.targets_length}", "optim.name=adamw",
                   f"train.microbatches={args.microbatches}"]
    mtjax = (shlex.split(args.mtjax) + ["bench", "train", "--steps", str(args.steps),
                                        "--warmup", str(args.warmup), *mtjax_shape,
                                        *args.mtjax_overrides]) if args.mtjax else None
    torch = args.torch_python and [args.torch_python, str(_HERE / "hf_torch_t5.py"), *shape]
    flax = args.flax_python and [args.flax_python, str(_HERE / "hf_flax_t5.py"), *shape]
    return {"mtjax": mtjax, "torch_eager": torch, "torch_compile": torch and [*torch, "--compile"],
            "flax_t5": flax}


# An entry named "<name>+hugepages" runs <name> with glibc asked for huge pages, as the `mtjax`
# command does for itself (mtjax/malloc_env.py): the same allocator help for a peer.
HUGEPAGES_SUFFIX = "+hugepages"


def _run(name: str, command: list[str]) -> dict:
    env = dict(os.environ)
    if name.endswith(HUGEPAGES_SUFFIX):
        tunables = env.get("GLIBC_TUNABLES", "")
        env["GLIBC_TUNABLES"] = ":".join(filter(None, [tunables, "glibc.malloc.hugetlb=1"]))
    with tempfile.TemporaryDirectory() as tmp:
        out = pathlib.Path(tmp) / "result.json"
        print(f"[compare] {name}: {shlex.join(command)}", file=sys.stderr, flush=True)
        start = time.perf_counter()
        proc = subprocess.run([*command, "--output", str(out)], stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True, env=env)
        wall = time.perf_counter() - start
        if proc.returncode or not out.exists():
            tail = "\n".join(proc.stderr.strip().splitlines()[-5:])
            return {"error": f"exit {proc.returncode}: {tail}", "wall_s": wall}
        result = json.loads(out.read_text())
        result["wall_s"] = wall
        print(f"[compare] {name}: {result['tokens_per_s']:.0f} tokens/s, "
              f"MFU {result['mfu']:.1%} ({wall:.0f} s)", file=sys.stderr, flush=True)
        return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="t5_1_1_peer")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--inputs-length", type=int, default=512)
    p.add_argument("--targets-length", type=int, default=128)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--microbatches", type=int, default=1,
                   help="gradient accumulation over this many slices of the batch, on every side")
    p.add_argument("--mtjax", default="mtjax", help="the mtjax command ('' to skip)")
    p.add_argument("--mtjax-overrides", nargs="*", default=[], metavar="KEY=VALUE")
    p.add_argument("--torch-python", default=None, help="interpreter with torch + transformers")
    p.add_argument("--flax-python", default=None,
                   help="interpreter with jax + flax + transformers 4.57 (FlaxT5)")
    p.add_argument("--order", default="mtjax,torch_eager,torch_compile,flax_t5,mtjax",
                   help="entries in run order; append +hugepages to a peer's name to also run "
                        "it with GLIBC_TUNABLES=glibc.malloc.hugetlb=1, as mtjax runs itself")
    p.add_argument("--output", default=None)
    args = p.parse_args(argv)

    entries = _entries(args)
    # A misspelt name (torch_compiled, flax) would otherwise be skipped like a peer whose
    # interpreter is not given, and the sitting would end with exit 0 and that row missing.
    unknown = [name for name in args.order.split(",")
               if name.removesuffix(HUGEPAGES_SUFFIX) not in entries]
    if unknown:
        p.error(f"--order: unknown {', '.join(map(repr, unknown))}; the entries are "
                f"{', '.join(entries)}, each optionally with {HUGEPAGES_SUFFIX}")
    runs = []
    for name in args.order.split(","):
        command = entries.get(name.removesuffix(HUGEPAGES_SUFFIX))
        if command:
            runs.append({"name": name, **_run(name, command)})
    ok = [r for r in runs if "error" not in r]
    mtjax_best = max((r["tokens_per_s"] for r in ok if r["name"] == "mtjax"), default=None)
    summary = {}
    for r in ok:
        best = summary.get(r["name"])
        if best is None or r["tokens_per_s"] > best["tokens_per_s"]:
            summary[r["name"]] = {
                "tokens_per_s": r["tokens_per_s"], "mfu": r["mfu"],
                "achieved_flops_per_s": r["achieved_flops_per_s"],
                "peak_flops_per_s": r["peak_flops_per_s"], "compile_s": r.get("compile_s"),
                "host_peak_memory_bytes": r.get("host_peak_memory_bytes"),
                "mtjax_speedup": (mtjax_best / r["tokens_per_s"]) if mtjax_best else None}
    report = {"shape": {k: getattr(args, k) for k in
                        ("model", "batch_size", "inputs_length", "targets_length", "steps",
                         "warmup")},
              "mtjax_tokens_per_s_runs": [r["tokens_per_s"] for r in ok if r["name"] == "mtjax"],
              "summary": summary, "runs": runs}
    text = json.dumps(report, indent=2)
    print(text)
    if args.output:
        pathlib.Path(args.output).write_text(text + "\n")
    print("\n| implementation | tokens/s | GFLOP/s | MFU (own peak) | mtjax speed-up |\n"
          "| --- | ---: | ---: | ---: | ---: |", file=sys.stderr)
    for name, s in summary.items():
        speedup = f"{s['mtjax_speedup']:.2f}x" if s["mtjax_speedup"] else "-"
        print(f"| {name} | {s['tokens_per_s']:.0f} | {s['achieved_flops_per_s'] / 1e9:.0f} | "
              f"{s['mfu']:.1%} | {speedup} |", file=sys.stderr)
    errors = [r for r in runs if "error" in r]
    for r in errors:
        print(f"[compare] {r['name']} failed: {r['error']}", file=sys.stderr)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
