"""A/B the compiled train step across config variants in one process, alternating step by step.

On a noisy CPU, separate `mtjax bench train` runs minutes apart differ by 10-20%; here every
variant is compiled first, then the variants take turns one step at a time, so drift hits them
all alike and the ratios hold:

    python benchmarks/ab_step.py --rounds 5 "" "model.remat=full" "model.scan_layers=true" \\
        "optim.state_dtype=bfloat16,train.microbatches=2"

Each variant is a comma-separated list of `mtjax train` overrides applied on top of the peer
shape (`mtjax bench train`'s defaults; "" is the baseline). Prints one JSON line per variant
(median/min step seconds, tokens/s, MFU against the in-process matmul peak, speed-up over the
first variant, compiled temp memory). Not part of the package or CI.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

from mtjax import malloc_env, xla_env

malloc_env.reexec_with_hugepages()  # as the mtjax command does (re-runs this script once)
xla_env.set_cpu_defaults()

import jax  # noqa: E402 - after the XLA flags

from mtjax import config as config_lib  # noqa: E402
from mtjax.bench import DEFAULT_OVERRIDES  # noqa: E402
from mtjax.bench import peak as peak_lib  # noqa: E402
from mtjax.bench import train as train_bench  # noqa: E402
from mtjax.errors import UserError  # noqa: E402
from mtjax.model import sizes  # noqa: E402
from mtjax.parallel import mesh as mesh_lib  # noqa: E402
from mtjax.train import setup as setup_lib  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("variants", nargs="+", help="comma-separated overrides per variant")
    p.add_argument("--rounds", type=int, default=5)
    args = p.parse_args()
    if args.rounds < 1:
        p.error(f"--rounds must be at least 1, got {args.rounds}")
    base = config_lib.load(None, list(DEFAULT_OVERRIDES))
    # Every variant's overrides are checked before the first one compiles (a minute or more at
    # the peer shape), and a mistake is one line, not a traceback.
    try:
        configs = [config_lib.apply_overrides(base, [o for o in spec.split(",") if o])
                   for spec in args.variants]
        for config in configs:
            sizes.get_config(config.model.name)
    except UserError as e:
        p.error(str(e))
    runs = []
    for spec, config in zip(args.variants, configs, strict=True):
        vocab = sizes.get_config(config.model.name).vocab_size
        setup = setup_lib.build(config, vocab_size=vocab, num_tasks=1, total_steps=100)
        b, s, t = config.train.batch_size, config.data.inputs_length, config.data.targets_length
        host = train_bench.synthetic_batch(b, s, t, vocab)
        batch = {k: jax.make_array_from_process_local_data(setup.batch_sharding, v)
                 for k, v in host.items()}
        with mesh_lib.activate(setup.mesh, setup.rules):
            start = time.perf_counter()
            compiled = setup.step.lower(setup.abstract_state, batch).compile()
            compile_s = time.perf_counter() - start
            state, _ = compiled(setup.init_state(0), batch)  # warm-up
            jax.block_until_ready(state)
        memory = compiled.memory_analysis()
        runs.append(dict(spec=spec, compiled=compiled, state=state, batch=batch, setup=setup,
                         times=[], compile_s=compile_s, tokens=b * (s + t),
                         flops=sizes.train_flops_per_step(setup.model_cfg, b, s, t),
                         temp_bytes=getattr(memory, "temp_size_in_bytes", None)))
    for _ in range(args.rounds):
        for run in runs:
            with mesh_lib.activate(run["setup"].mesh, run["setup"].rules):
                start = time.perf_counter()
                run["state"], _ = run["compiled"](run["state"], run["batch"])
                jax.block_until_ready(run["state"])
                run["times"].append(time.perf_counter() - start)
    peak = peak_lib.measure_matmul_peak("float32")
    first = statistics.median(runs[0]["times"])
    for run in runs:
        median = statistics.median(run["times"])
        print(json.dumps({
            "variant": run["spec"] or "baseline", "step_s_median": median,
            "step_s_min": min(run["times"]), "tokens_per_s": run["tokens"] / median,
            "mfu": run["flops"] / median / peak, "speedup_vs_first": first / median,
            "compile_s": run["compile_s"], "temp_bytes": run["temp_bytes"],
            "peak_flops_per_s": peak}))


if __name__ == "__main__":
    main()
