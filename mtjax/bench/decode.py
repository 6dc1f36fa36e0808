"""``mtjax bench decode``: decoded tokens/s of the KV-cache decoder, greedy and beam search.

Four cases: greedy and beam search with 4 beams, at batch 1 (latency) and batch 64
(throughput), on random weights and random full-length inputs of ``data.inputs_length``. EOS is
ignored so that every sequence runs ``data.targets_length`` steps: tokens/s is
``batch * targets_length / median seconds per decode`` (output tokens; beam search computes
4 beams for each). What is timed is the compiled decode alone, encoder included.
"""

from __future__ import annotations

import time
from typing import Any

import jax
import numpy as np

from mtjax import config as config_lib
from mtjax.bench import report
from mtjax.infer import load as load_lib
from mtjax.infer.decode import DecodeOptions, Decoder
from mtjax.model import sizes
from mtjax.parallel import mesh as mesh_lib
from mtjax.train import setup as setup_lib

CASES = (("greedy", 1, 1), ("greedy", 1, 64), ("beam", 4, 1), ("beam", 4, 64))


def _time_case(decoder: Decoder, params: Any, tokens_BS: np.ndarray, options: DecodeOptions,
               steps: int, warmup: int) -> dict[str, Any]:
    start = time.perf_counter()
    decoder(params, tokens_BS, options)  # compiles, then decodes once
    first_call_s = time.perf_counter() - start
    for _ in range(warmup):
        decoder(params, tokens_BS, options)
    seconds = []
    for _ in range(steps):
        start = time.perf_counter()
        decoder(params, tokens_BS, options)  # returns host arrays: the decode has finished
        seconds.append(time.perf_counter() - start)
    stats = report.timing_stats(seconds)
    tokens = tokens_BS.shape[0] * options.max_decode_length
    return {"first_call_s": first_call_s, "decode_s": stats,
            "tokens_per_s": tokens / stats["median"]}


def run(config: config_lib.Config, options: Any) -> dict[str, Any]:
    """Time greedy and beam-4 decoding at batch 1 and 64 for ``config``'s model and lengths.

    Args:
        config: model name and dtype, ``data.inputs_length`` (encoder) and
            ``data.targets_length`` (decoded tokens), mesh.
        options: ``steps`` timed decodes per case (median reported) and ``warmup``.

    Returns:
        A JSON-ready dict with one entry per case and flat ``<case>_tokens_per_s`` keys.
    """
    vocab_size = sizes.get_config(config.model.name).vocab_size
    model_cfg = load_lib.model_config(config, vocab_size)
    m = config.mesh
    mesh = mesh_lib.make_mesh(mesh_lib.MeshShape(m.data, m.fsdp, m.tensor, m.dcn_data,
                                                 m.dcn_fsdp, m.dcn_tensor))
    rules = mesh_lib.get_rules(config.mesh.rules)
    # What `bench train` refuses in one line before compiling (JAX's errors for them are
    # tracebacks): one mesh axis for two axes of a parameter (abstract_model), a dimension
    # it cannot split.
    model_def, target = load_lib.abstract_model(model_cfg, mesh, rules)
    setup_lib.check_params_divide(target, jax.tree.map(lambda a: a.sharding, target),
                                  config.model.name)
    params = load_lib.init_params(model_def, target, mesh, rules, config.train.seed)
    decoder = Decoder(model_def, mesh, rules)
    rng = np.random.default_rng(config.train.seed % 2**64)  # (a negative seed too)
    s, t = config.data.inputs_length, config.data.targets_length

    result: dict[str, Any] = {
        "benchmark": "decode", "model": config.model.name,
        "mesh": {axis: int(size) for axis, size in mesh.shape.items()},
        "mesh_rules": config.mesh.rules,
        "num_params": sizes.count_params(model_cfg), "dtype": config.model.dtype,
        "inputs_length": s, "decode_length": t, "steps": options.steps,
        "warmup": options.warmup,
    }
    cases = []
    for algorithm, beams, batch in CASES:
        tokens_BS = rng.integers(2, vocab_size, (batch, s), dtype=np.int32)
        decode_options = DecodeOptions(max_decode_length=t, beam_size=beams, eos_id=-1)
        timing = _time_case(decoder, params, tokens_BS, decode_options, options.steps,
                            options.warmup)
        name = f"{algorithm}{beams if beams > 1 else ''}_b{batch}"
        cases.append({"case": name, "algorithm": algorithm, "beam_size": beams,
                      "batch_size": batch, **timing})
        result[f"{name}_tokens_per_s"] = timing["tokens_per_s"]
        result[f"{name}_decode_s"] = timing["decode_s"]["median"]
    result["cases"] = cases
    result["host_peak_memory_bytes"] = report.host_peak_memory_bytes()
    result["device_peak_memory_bytes"] = report.device_peak_memory_bytes()
    result["environment"] = report.environment()
    result["config"] = config_lib.to_dict(config)
    del params
    return result
