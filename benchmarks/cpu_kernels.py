"""mtjax's CPU kernels against the XLA paths they replace, alone, at the peer shape.

    python benchmarks/cpu_kernels.py --impl kernel          # the best build for this CPU
    MTJAX_CPU_KERNEL_ISA=avx2 python benchmarks/cpu_kernels.py --impl kernel
    python benchmarks/cpu_kernels.py --impl xla

Prints one JSON object: median milliseconds of 20 calls after 2 warm-up calls, forward and
forward + backward, for encoder self-attention (B 8, H 8, 512 x 512, head dim 64, position bias
and a mask), cross-attention (128 x 512, mask only), decoder self-attention (114 x 114) and the
loss with z-loss over [8, 128, 32128] logits. Run each implementation in its own process,
alternating (the machine is noisy). mtjax's CPU XLA flags are applied as the `mtjax` command
applies them.
"""

from __future__ import annotations

import argparse
import json
import time

from mtjax import xla_env

xla_env.set_cpu_defaults()

import jax  # noqa: E402  (after the XLA flags)
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from mtjax import kernels  # noqa: E402
from mtjax.model import attention as attention_lib  # noqa: E402
from mtjax.train import step as step_lib  # noqa: E402

SHAPES = {  # B, Q, S, H, head dim
    "encoder_self": (8, 512, 512, 8, 64),
    "cross": (8, 128, 512, 8, 64),
    "decoder_self": (8, 114, 114, 8, 64),
}


def median_ms(fn, *args, calls: int = 20) -> float:
    for _ in range(2):
        jax.block_until_ready(fn(*args))
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return round(1e3 * float(np.median(times)), 2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--impl", choices=("kernel", "xla"), required=True)
    impl = parser.parse_args().impl
    if impl == "kernel":
        kernels.require()
        from mtjax.kernels import attention as kernel_attention
        from mtjax.kernels import cross_entropy as kernel_loss

    rng = np.random.default_rng(0)
    result = {"impl": impl, "cpu_kernel_isa": kernels.cpu_kernel_isa()[0] if impl == "kernel"
              else None, "jax": jax.__version__}
    for name, (b, q_len, s_len, h, d) in SHAPES.items():
        q = jnp.asarray(rng.normal(size=(b, q_len, h, d)) * 0.5, jnp.float32)
        k, v = (jnp.asarray(rng.normal(size=(b, s_len, h, d)) * 0.5, jnp.float32)
                for _ in "kv")
        diagonals = (None if name == "cross" else
                     jnp.asarray(rng.normal(size=(h, q_len + s_len - 1)), jnp.float32))
        mask = jnp.asarray(rng.random((b, q_len, s_len)) > 0.1)

        def attend(q, k, v, diagonals=diagonals, mask=mask, q_len=q_len, s_len=s_len):
            if impl == "kernel":
                return kernel_attention.cpu_attention(q, k, v, diagonals, mask)
            bias = attention_lib.AttentionBias(None, mask, position_diagonals=diagonals)
            return attention_lib.xla_attention(q, k, v, bias.dense(q_len, s_len))

        grads = jax.grad(lambda q, k, v, f=attend: jnp.sum(f(q, k, v) ** 2), argnums=(0, 1, 2))
        result[name] = {"forward_ms": median_ms(jax.jit(attend), q, k, v),
                        "forward_backward_ms": median_ms(jax.jit(grads), q, k, v)}
    logits = jnp.asarray(rng.normal(size=(8, 128, 32128)), jnp.float32)
    targets = jnp.asarray(rng.integers(0, 32128, (8, 128)), jnp.int32)
    loss_fn = (kernel_loss.cross_entropy_with_z_loss if impl == "kernel"
               else step_lib.cross_entropy_with_z_loss)
    loss_grad = jax.jit(jax.grad(lambda x: jnp.sum(loss_fn(x, targets, 1e-4)[0])))
    result["loss_forward_backward_ms"] = median_ms(loss_grad, logits)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
