"""``mtjax bench data``: input pipeline throughput and packing efficiency, without the model.

Two cases, each timing `InputPipeline` batches as the trainer would pull them (one host, the
configured batch size and seed, packing as configured):

- ``mixture``: the configured mixture (default `mtjax_demo`) at the configured lengths;
- ``span_corruption``: T5's objective at 512/128 over the generated biographies
  (`mtjax_kb_bio_span_corruption`; with --smoke, at the configured lengths).

Reported per case: examples/s, packed (non-padding) tokens/s, token slots/s, packing efficiency
(non-padding fraction of all slots, per side, and of the side whose length binds), the time to
the first batch. Compare the
packed tokens/s with `mtjax bench train`'s tokens/s for the same config: the pipeline should
deliver at least 10x what the step consumes.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from mtjax import config as config_lib
from mtjax.bench import report

SPAN_CORRUPTION_TASK = "mtjax_kb_bio_span_corruption"
SPAN_CORRUPTION_LENGTHS = (512, 128)
BATCHES_PER_STEP = 10  # timed batches per --steps (default 10 steps -> 100 batches)


def measure(pipeline, batches: int, warmup: int) -> dict[str, Any]:
    """Pulls `warmup` then `batches` batches; returns rates and packing efficiency.

    Args:
        pipeline: an iterator of host batches (an `InputPipeline`).
        batches: timed batches.
        warmup: untimed batches first (fills prefetch and shuffle buffers).
    """
    for _ in range(warmup):
        next(pipeline)
    examples = enc_tokens = dec_tokens = enc_slots = dec_slots = 0
    start = time.perf_counter()
    for _ in range(batches):
        batch = next(pipeline)
        enc, dec = batch["encoder_input_tokens"], batch["decoder_target_tokens"]
        seg = batch["decoder_segment_ids"]
        examples += int(seg.max(axis=1).sum())  # segments are numbered 1..k in each row
        enc_tokens += int(np.count_nonzero(enc))
        dec_tokens += int(np.count_nonzero(dec))
        enc_slots += enc.size
        dec_slots += dec.size
    seconds = time.perf_counter() - start
    tokens, slots = enc_tokens + dec_tokens, enc_slots + dec_slots
    return {
        "batches": batches, "seconds": seconds,
        "batches_per_s": batches / seconds,
        "examples_per_s": examples / seconds,
        "examples_per_row": examples / (batches * batch["decoder_segment_ids"].shape[0]),
        "packed_tokens_per_s": tokens / seconds,
        "token_slots_per_s": slots / seconds,
        "packing_efficiency": tokens / slots,
        "encoder_efficiency": enc_tokens / enc_slots,
        "decoder_efficiency": dec_tokens / dec_slots,
        # The side whose length binds: the other side's slack comes from the lengths' ratio,
        # not from packing.
        "binding_side_efficiency": max(enc_tokens / enc_slots, dec_tokens / dec_slots),
    }


def _case(config: config_lib.Config, mixture: str, lengths: tuple[int, int], batches: int,
          warmup: int) -> dict[str, Any]:
    from mtjax.data import pipeline as pipeline_lib

    data = config.data
    start = time.perf_counter()
    pipeline = pipeline_lib.InputPipeline(
        mixture, inputs_length=lengths[0], targets_length=lengths[1],
        batch_size=config.train.batch_size, pack=data.pack, seed=config.train.seed,
        mixing=data.mixing if mixture == data.mixture else "mixture",
        mixing_cap=data.mixing_cap, mixing_temperature=data.mixing_temperature)
    build_s = time.perf_counter() - start
    next(pipeline)
    first_batch_s = time.perf_counter() - start
    result = {"mixture": mixture, "tasks": len(pipeline.task_names),
              "inputs_length": lengths[0], "targets_length": lengths[1],
              "batch_size": config.train.batch_size, "pack": data.pack,
              "build_s": build_s, "first_batch_s": first_batch_s}
    result.update(measure(pipeline, batches, warmup))
    return result


def run(config: config_lib.Config, options: Any) -> dict[str, Any]:
    """Times the configured mixture and a 512/128 span-corruption task.

    Args:
        config: the resolved config (mixture, lengths, batch size, packing, mixing, seed).
        options: `BenchOptions`; steps * 10 batches are timed after warmup * 10.

    Returns:
        A JSON-ready dict: one entry per case under "cases", headline figures at the top.
    """
    import sys

    from mtjax.data import pipeline as pipeline_lib

    pipeline_lib.prepare(config)
    batches = max(options.steps * BATCHES_PER_STEP, 1)
    warmup = options.warmup * BATCHES_PER_STEP
    span_lengths = ((config.data.inputs_length, config.data.targets_length) if options.smoke
                    else SPAN_CORRUPTION_LENGTHS)
    cases = {}
    for name, mixture, lengths in (
            ("mixture", config.data.mixture,
             (config.data.inputs_length, config.data.targets_length)),
            ("span_corruption", SPAN_CORRUPTION_TASK, span_lengths)):
        print(f"bench data: {name} ({mixture}, {lengths[0]}/{lengths[1]}, "
              f"{batches} batches) ...", file=sys.stderr, flush=True)
        cases[name] = _case(config, mixture, lengths, batches, warmup)
    headline = {f"{case}_{key}": cases[case][key] for case in cases
                for key in ("examples_per_s", "packed_tokens_per_s", "packing_efficiency",
                            "binding_side_efficiency")}
    return {
        "benchmark": "data",
        **headline,
        "cases": cases,
        "host_peak_memory_bytes": report.host_peak_memory_bytes(),
        "environment": report.environment(packages=("tensorflow", "seqio")),
        "config": config_lib.to_dict(config),
    }
