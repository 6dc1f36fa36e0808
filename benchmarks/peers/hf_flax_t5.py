"""Peer benchmark: Hugging Face FlaxT5 (``transformers`` 4.x) + optax AdamW at the shape of
``mtjax bench train``.

Not part of the package or CI. Random init, AdamW with global-norm clipping at 1.0 (as mtjax),
synthetic full-length batches, the whole step jitted with the state donated (as the Hugging Face
Flax example scripts do). Prints the same JSON fields as mtjax's bench.

    python3 -m venv /tmp/flaxpeer
    /tmp/flaxpeer/bin/pip install jax==0.10.2 flax==0.12.8 optax==0.2.8 'transformers>=4.57,<5'
    /tmp/flaxpeer/bin/python benchmarks/peers/hf_flax_t5.py [--model t5_1_1_peer]

FlaxT5 was removed in transformers 5: pin 4.57.x. The model shape is read from
mtjax/model/sizes.py by path (mtjax itself is not imported).
"""

from __future__ import annotations

import functools
import sys
import time

import _common  # benchmarks/peers/_common.py (the script's folder is on sys.path)
import jax
import jax.numpy as jnp
import numpy as np
import optax

try:
    import transformers
except ImportError as e:  # run with mtjax's interpreter instead of the peer's venv
    _common.missing_packages(__file__, e, "jax, flax, optax and transformers 4.57.x")

_clip = jnp.clip


def _clip_compat(x, min=None, max=None, *, a_min=None, a_max=None, **kwargs):  # noqa: A002
    """jax 0.10 removed ``jnp.clip(a_min=, a_max=)``, which FlaxT5's position buckets still use."""
    return _clip(x, a_min if min is None else min, a_max if max is None else max, **kwargs)


jnp.clip = _clip_compat  # the one shim FlaxT5 needs on jax >= 0.10; numerics unchanged


def measure_matmul_peak(dtype: str, size: int = 2048, trials: int = 5, repeats: int = 3) -> float:
    """Best FLOP/s of chained [size, size] matmuls, as ``mtjax.bench.peak`` measures it."""
    a = jax.random.normal(jax.random.key(0), (size, size), jnp.dtype(dtype))
    b = jax.random.normal(jax.random.key(1), (size, size), jnp.dtype(dtype)) / size**0.5

    matmul = jax.jit(lambda x, w: x @ w)  # one call per matmul: XLA cannot fuse the chain
    fused = jax.jit(lambda x, w: functools.reduce(lambda y, _: y @ w, range(repeats), x))

    def separate():
        x = a
        for _ in range(repeats):
            x = matmul(x, b)
        return x.block_until_ready()

    def one_program():
        return fused(a, b).block_until_ready()

    best = min(_best_seconds(separate, trials), _best_seconds(one_program, trials))
    return 2.0 * size**3 * repeats / best


def _best_seconds(run, trials: int) -> float:
    """The fastest of ``trials`` timed calls of ``run`` after one untimed call."""
    run()  # compile and warm caches
    best = float("inf")
    for _ in range(trials):
        start = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - start)
    return best


def main(argv: list[str] | None = None) -> int:
    args = _common.parser(__doc__.splitlines()[0]).parse_args(argv)
    _common.check_microbatches(args)
    sizes = _common.load_sizes()
    cfg = sizes.get_config(args.model)
    dtype = jnp.bfloat16 if args.dtype == "bfloat16" else jnp.float32
    config = transformers.T5Config(**_common.hf_config_kwargs(cfg))
    # dtype is the computation dtype; FlaxT5 keeps float32 parameters either way.
    model = transformers.FlaxT5ForConditionalGeneration(config, seed=0, dtype=dtype)
    params = model.params
    tx = optax.chain(optax.clip_by_global_norm(1.0),
                     optax.adamw(1e-3, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0))
    opt_state = tx.init(params)

    b, s, t = args.batch_size, args.inputs_length, args.targets_length
    rng = np.random.default_rng(0)
    input_ids = jnp.asarray(rng.integers(1, cfg.vocab_size, (b, s)), jnp.int32)
    labels = jnp.asarray(rng.integers(1, cfg.vocab_size, (b, t)), jnp.int32)
    decoder_input_ids = jnp.concatenate([jnp.zeros((b, 1), jnp.int32), labels[:, :-1]], axis=1)

    m = args.microbatches

    def slices(x):
        return x.reshape(m, b // m, *x.shape[1:])

    def step(params, opt_state, dropout_rng):
        def loss_fn(p, inputs, decoder_inputs, targets):
            logits = model(input_ids=inputs, decoder_input_ids=decoder_inputs, params=p,
                           dropout_rng=dropout_rng, train=True).logits
            return optax.softmax_cross_entropy_with_integer_labels(
                logits.astype(jnp.float32), targets).mean()

        def accumulate(carry, batch):  # gradient accumulation in the jitted step, as mtjax's
            loss, grads = jax.value_and_grad(loss_fn)(params, *batch)
            scaled = (loss / m, jax.tree.map(lambda g: g / m, grads))
            return jax.tree.map(jnp.add, carry, scaled), None

        zeros = (jnp.zeros(()), jax.tree.map(jnp.zeros_like, params))
        (loss, grads), _ = jax.lax.scan(
            accumulate, zeros, (slices(input_ids), slices(decoder_input_ids), slices(labels)))
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    jitted = jax.jit(step, donate_argnums=(0, 1))
    dropout_rng = jax.random.key(0)
    start = time.perf_counter()
    compiled = jitted.lower(params, opt_state, dropout_rng).compile()
    compile_s = time.perf_counter() - start
    for _ in range(args.warmup):
        params, opt_state, loss = compiled(params, opt_state, dropout_rng)
    jax.block_until_ready(params)
    seconds = []
    for _ in range(args.steps):
        start = time.perf_counter()
        params, opt_state, loss = compiled(params, opt_state, dropout_rng)
        jax.block_until_ready((params, opt_state, loss))
        seconds.append(time.perf_counter() - start)

    device = jax.devices()[0]
    try:
        stats = device.memory_stats() or {}
    except Exception:  # noqa: BLE001 - CPU backends may raise
        stats = {}
    peak = ((args.peak_flops, "override") if args.peak_flops
            else (measure_matmul_peak(args.dtype), "measured_matmul"))
    import flax

    _common.emit(_common.result(
        args, peer="hf_flax_t5", sizes=sizes, cfg=cfg,
        num_params=sum(x.size for x in jax.tree.leaves(params)), seconds=seconds,
        compile_s=compile_s, first_step_s=None, peak=peak, loss=float(loss),
        device_peak_memory_bytes=stats.get("peak_bytes_in_use"),
        environment={
            "versions": {"jax": jax.__version__, "flax": flax.__version__,
                         "optax": optax.__version__, "transformers": transformers.__version__},
            "platform": device.platform, "device_kind": device.device_kind}), args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
