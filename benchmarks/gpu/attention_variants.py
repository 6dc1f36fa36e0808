"""cuDNN attention alone (forward + backward) at t5_1_1_base's shapes, in the ways mtjax could
hand T5's relative-position bias and the packing mask to cuDNN.

    python benchmarks/gpu/attention_variants.py --out-dir $OUT     # on a GPU: JSON lines
    python benchmarks/gpu/attention_variants.py --check            # any backend, seconds

On the 2026-12-04 H200 profile cuDNN attention took 25 of the base step's 97 ms, and part of
that is the bias: mtjax adds the packing mask to the position bias, so cuDNN reads a dense
[B, H, Q, S] bias and writes its gradient. The variants, for each attention of the model
(encoder self, decoder self, cross):

- ``dense``: what mtjax runs now (``jax.nn.dot_product_attention``, cuDNN): position bias plus
  mask as one [B, H, Q, S] bias.
- ``packed`` / ``packed_padding``: the position bias as [1, H, Q, S] and the packing as cuDNN's
  ragged segments (per-row segment offsets and lengths, through jax's internal cuDNN API),
  with ``NO_MASK`` or ``PADDING`` mask types (which of the two cuDNN honours is part of what
  this finds out); causal where the attention is.
- ``position_only``: [1, H, Q, S] bias, no mask (wrong for packed rows: prices the mask).
- ``no_bias``: no bias, no mask (the floor).
- ``mtjax_xla``: mtjax's own XLA attention (``model.attention=xla``), a second reference.

Every variant is checked against ``dense`` on real tokens (padding's rows get a zero
cotangent): the output and the gradients of queries, keys, values and the bias's diagonals
(T5's bias depends on key - query only, so it is built from [H, Q + S - 1] diagonals and its
gradient summed back onto them; a segment-local or row-absolute indexing of the bias by cuDNN
gives the same numbers). A variant that fails or disagrees is recorded as such.

``--check`` runs on any backend: it checks the segment-id -> offsets conversion against the
segment mask and the dense variant (XLA's path off the GPU) at a small shape.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time
import traceback
from typing import Any

import numpy as np

_ROOT = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(_ROOT))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from mtjax.model import attention as attention_lib  # noqa: E402
from mtjax.model import position_bias  # noqa: E402

MASK_BIAS = -1e9


def packed_segment_ids(rng: np.random.Generator, batch: int, length: int, segments: int,
                       fill: float = 0.9) -> np.ndarray:
    """[batch, length] int32: ``segments`` consecutive segments 1..n of random lengths filling
    about ``fill`` of the row, then padding (0), as mtjax's packing lays rows out."""
    ids = np.zeros((batch, length), np.int32)
    for row in range(batch):
        cuts = np.sort(rng.choice(np.arange(1, int(length * fill)), segments - 1, replace=False))
        bounds = [0, *cuts.tolist(), int(length * fill)]
        for s in range(segments):
            ids[row, bounds[s]:bounds[s + 1]] = s + 1
    return ids


def offsets_and_lengths(segment_ids: np.ndarray, max_segments: int
                        ) -> tuple[np.ndarray, np.ndarray]:
    """Per row, cuDNN's ragged layout of mtjax's segment ids: offsets [B, M + 1] (each
    segment's first position, -1 after the last) and lengths [B, M] (-1 after the last)."""
    batch = segment_ids.shape[0]
    offsets = np.full((batch, max_segments + 1), -1, np.int32)
    lengths = np.full((batch, max_segments), -1, np.int32)
    for row in range(batch):
        ids = segment_ids[row]
        for j, segment in enumerate(s for s in np.unique(ids) if s > 0):
            where = np.flatnonzero(ids == segment)
            offsets[row, j], lengths[row, j] = where[0], where.size
    return offsets, lengths


def mask_from_ragged(q_offsets, q_lengths, kv_offsets, kv_lengths, q_len: int, kv_len: int,
                     causal: bool) -> np.ndarray:
    """[B, Q, S] bool: query i sees key j when both lie in segment number n of their rows
    (the ragged layout's meaning), and j <= i within the segment when causal."""
    batch = q_offsets.shape[0]
    mask = np.zeros((batch, q_len, kv_len), bool)
    for row in range(batch):
        for n in range(q_lengths.shape[1]):
            if q_lengths[row, n] < 0:
                break
            q0, qn, k0, kn = q_offsets[row, n], q_lengths[row, n], kv_offsets[row, n], kv_lengths[
                row, n]
            block = np.ones((qn, kn), bool)
            if causal:
                block = np.tril(block)
            mask[row, q0:q0 + qn, k0:k0 + kn] = block
    return mask


def segment_mask(q_ids: np.ndarray, kv_ids: np.ndarray, causal: bool) -> np.ndarray:
    """mtjax's mask on real tokens: same nonzero segment, and causal for the decoder."""
    mask = (q_ids[:, :, None] == kv_ids[:, None, :]) & (kv_ids[:, None, :] > 0) & (
        q_ids[:, :, None] > 0)
    if causal:
        mask &= np.tril(np.ones((q_ids.shape[1], kv_ids.shape[1]), bool))[None]
    return mask


def problem(name: str, batch: int, heads: int, head_dim: int, q_len: int, kv_len: int,
            segments: int, causal: bool, with_bias: bool, seed: int = 0) -> dict[str, Any]:
    """Inputs of one attention: q, k, v, bias diagonals, masks, ragged layout, cotangent."""
    rng = np.random.default_rng(seed)
    if q_len == kv_len:
        q_ids = kv_ids = packed_segment_ids(rng, batch, q_len, segments)
    else:  # cross-attention: segment n of the decoder attends to segment n of the encoder
        q_ids = packed_segment_ids(rng, batch, q_len, segments)
        kv_ids = packed_segment_ids(rng, batch, kv_len, segments)
    q_off, q_lens = offsets_and_lengths(q_ids, segments)
    kv_off, kv_lens = offsets_and_lengths(kv_ids, segments)
    keys = jax.random.split(jax.random.key(seed), 5)
    dtype = jnp.bfloat16

    def normal(key, shape, scale=1.0):
        return (scale * jax.random.normal(key, shape, jnp.float32)).astype(dtype)

    return {
        "name": name, "causal": causal, "with_bias": with_bias,
        "q": normal(keys[0], (batch, q_len, heads, head_dim), head_dim ** -0.5),
        "k": normal(keys[1], (batch, kv_len, heads, head_dim)),
        "v": normal(keys[2], (batch, kv_len, heads, head_dim)),
        "diagonals": jax.random.normal(keys[3], (heads, q_len + kv_len - 1), jnp.float32),
        # Zero on padding queries: their rows are fully masked, and no variant's output
        # there is meaningful.
        "cotangent": normal(keys[4], (batch, q_len, heads, head_dim)) * jnp.asarray(
            q_ids > 0)[:, :, None, None].astype(dtype),
        "mask": jnp.asarray(segment_mask(q_ids, kv_ids, causal)),
        "ragged": tuple(jnp.asarray(x) for x in (q_lens, kv_lens, q_off, kv_off)),
        "q_ids": q_ids, "kv_ids": kv_ids,
        "offsets": (q_off, q_lens, kv_off, kv_lens),
    }


def attention_fn(variant: str, p: dict[str, Any], implementation: str | None):
    """``f(q, k, v, diagonals) -> output`` for one variant."""
    q_len, kv_len = p["q"].shape[1], p["k"].shape[1]
    mask, (q_lens, kv_lens, q_off, kv_off) = p["mask"], p["ragged"]
    causal, with_bias = p["causal"], p["with_bias"]

    def position(diagonals):
        return position_bias.toeplitz_bias(diagonals, q_len, kv_len)[None]  # [1, H, Q, S]

    def f(q, k, v, diagonals):
        bias = position(diagonals) if with_bias else None
        if variant == "dense":
            mask_bias = jnp.where(mask, 0.0, MASK_BIAS)[:, None]
            full = mask_bias if bias is None else bias + mask_bias
            return jax.nn.dot_product_attention(q, k, v, bias=full.astype(q.dtype), scale=1.0,
                                                implementation=implementation)
        if variant == "mtjax_xla":  # mtjax's own einsum path, float32 bias and softmax
            mask_bias = jnp.where(mask, 0.0, MASK_BIAS)[:, None]
            return attention_lib.xla_attention(
                q, k, v, mask_bias if bias is None else bias + mask_bias)
        if variant in ("position_only", "no_bias"):
            b = bias.astype(q.dtype) if (variant == "position_only" and bias is not None) else None
            return jax.nn.dot_product_attention(q, k, v, bias=b, scale=1.0,
                                                implementation=implementation)
        from jax._src.cudnn import fused_attention_stablehlo as cudnn

        kind = {("packed", False): "NO_MASK", ("packed", True): "CAUSAL",
                ("packed_padding", False): "PADDING",
                ("packed_padding", True): "PADDING_CAUSAL"}[variant, causal]
        return cudnn.dot_product_attention(
            q, k, v, None if bias is None else bias.astype(q.dtype), None, q_lens, kv_lens,
            q_off, kv_off, scale=1.0, mask_type=cudnn.MaskType[kind], qkv_layout="BTNH")

    return f


def timed_grad(f, p: dict[str, Any], steps: int, warmup: int):
    """Output and gradients once, then the median time of forward + backward."""
    def loss(q, k, v, diagonals):
        out = f(q, k, v, diagonals)
        return jnp.sum(out.astype(jnp.float32) * p["cotangent"].astype(jnp.float32)), out

    step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3), has_aux=True))
    args = (p["q"], p["k"], p["v"], p["diagonals"])
    t0 = time.perf_counter()
    (_, out), grads = jax.block_until_ready(step(*args))
    first_s = time.perf_counter() - t0
    for _ in range(warmup):
        jax.block_until_ready(step(*args))
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        jax.block_until_ready(step(*args))
        times.append(time.perf_counter() - t0)
    return out, grads, first_s, float(np.median(times)), float(min(times))


def max_relative_error(a, b, rows) -> float:
    """Largest |a - b| on the real query rows, over the largest |b| there."""
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    if rows is not None:
        a, b = a[rows], b[rows]
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


def compare(reference, candidate, p) -> dict[str, float]:
    (out_r, grads_r), (out_c, grads_c) = reference, candidate
    q_real, kv_real = p["q_ids"] > 0, p["kv_ids"] > 0
    errors = {"out": max_relative_error(out_c, out_r, q_real)}
    for name, g_r, g_c, rows in zip(("dq", "dk", "dv", "d_diagonals"), grads_r, grads_c,
                                    (q_real, kv_real, kv_real, None), strict=True):
        errors[name] = max_relative_error(g_c, g_r, rows)
    return errors


def shapes(batch: int, heads: int, head_dim: int, inputs: int, targets: int, segments: int):
    common = dict(batch=batch, heads=heads, head_dim=head_dim, segments=segments)
    return [
        dict(name="encoder_self", q_len=inputs, kv_len=inputs, causal=False, with_bias=True,
             **common),
        dict(name="decoder_self", q_len=targets, kv_len=targets, causal=True, with_bias=True,
             **common),
        dict(name="cross", q_len=targets, kv_len=inputs, causal=False, with_bias=False,
             **common),
    ]


def check_offsets(segments: int = 3) -> None:
    """The ragged layout built from segment ids means exactly mtjax's mask on real tokens."""
    rng = np.random.default_rng(1)
    for q_len, kv_len, causal in ((64, 64, False), (24, 24, True), (24, 64, False)):
        q_ids = packed_segment_ids(rng, 5, q_len, segments)
        kv_ids = q_ids if q_len == kv_len else packed_segment_ids(rng, 5, kv_len, segments)
        q_off, q_lens = offsets_and_lengths(q_ids, segments + 1)  # one unused slot: -1 filled
        kv_off, kv_lens = offsets_and_lengths(kv_ids, segments + 1)
        assert (q_off[:, segments:] == -1).all() and (q_lens[:, segments:] == -1).all()
        ragged = mask_from_ragged(q_off, q_lens, kv_off, kv_lens, q_len, kv_len, causal)
        expected = segment_mask(q_ids, kv_ids, causal)
        assert (ragged == expected).all(), (q_len, kv_len, causal)


def main() -> None:
    parser = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    parser.add_argument("--out-dir", type=pathlib.Path, default=None)
    parser.add_argument("--check", action="store_true",
                        help="check the offsets and run the dense variant at a small shape")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--segments", type=int, default=3, help="packed examples per row")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    args = parser.parse_args()
    check_offsets()
    on_gpu = jax.default_backend() == "gpu"
    if args.check:
        cases = shapes(2, 2, 16, 64, 24, args.segments)
        variants, implementation, steps = ["dense", "mtjax_xla", "position_only"], None, 2
    else:
        cases = shapes(args.batch, 12, 64, 512, 114, args.segments)  # t5_1_1_base, packed
        variants = ["dense", "packed", "packed_padding", "position_only", "no_bias",
                    "mtjax_xla"]
        implementation, steps = ("cudnn" if on_gpu else None), args.steps
    out, records = None, []
    if args.out_dir is not None:
        args.out_dir.mkdir(parents=True, exist_ok=True)
        out = (args.out_dir / "attention_variants.jsonl").open("a")
    for case in cases:
        p = problem(**case)
        reference = None
        for variant in variants:
            record: dict[str, Any] = {"attention": case["name"], "variant": variant,
                                      "batch": case["batch"], "q_len": case["q_len"],
                                      "kv_len": case["kv_len"], "backend": jax.default_backend()}
            try:
                result = timed_grad(attention_fn(variant, p, implementation), p, steps,
                                    args.warmup)
                out_value, grads, first_s, median_s, min_s = result
                record.update(first_call_s=round(first_s, 3), median_ms=median_s * 1e3,
                              min_ms=min_s * 1e3)
                if variant == "dense":
                    reference = (out_value, grads)
                elif reference is not None:
                    record["errors"] = compare(reference, (out_value, grads), p)
                    # bfloat16 inputs: agreement to a few bf16 ulps of the largest value.
                    record["agrees"] = all(e < 5e-2 for e in record["errors"].values())
            except Exception as e:  # noqa: BLE001 - record and go on: the lease is short
                record["error"] = f"{type(e).__name__}: {e}"[:1500]
                record["traceback"] = traceback.format_exc()[-2000:]
            records.append(record)
            line = json.dumps(record)
            if out is not None:
                out.write(line + "\n")
                out.flush()
            shown = {k: (round(v, 3) if isinstance(v, float) else v) for k, v in record.items()
                     if k not in ("traceback", "errors")}
            print(json.dumps(shown)[:400], flush=True)
    if args.check:
        references = [r for r in records if r["variant"] in ("dense", "mtjax_xla")]
        assert all("error" not in r for r in references), references
        assert all(r["agrees"] for r in references if r["variant"] == "mtjax_xla"), references
        print("check passed: the ragged layout equals the segment mask", flush=True)


if __name__ == "__main__":
    main()
