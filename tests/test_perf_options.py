"""Throughput options keep the numbers: scan over layers, jax.nn.dot_product_attention,
the hand-written attention backward, bfloat16 optimizer state, the CPU XLA defaults; and the
step's loss (T5X's label smoothing, the gradient's normalization)."""

from __future__ import annotations

import dataclasses
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from mtjax import config as config_lib
from mtjax import xla_env
from mtjax.bench import train as train_bench
from mtjax.model import attention as attention_lib
from mtjax.model import layers, position_bias, sizes, t5
from mtjax.model import softmax as softmax_lib
from mtjax.parallel import mesh as mesh_lib
from mtjax.train import layerwise, optim
from mtjax.train import setup as setup_lib
from mtjax.train import state as state_lib
from mtjax.train import step as step_lib

VOCAB = 256
CFG = dataclasses.replace(sizes.get_config("t5_1_1_test"), vocab_size=VOCAB)


@pytest.fixture(scope="module")
def mesh():
    m = mesh_lib.make_mesh(mesh_lib.MeshShape(1, 1, 1), jax.devices()[:1])
    with mesh_lib.activate(m, mesh_lib.get_rules("data")):
        yield m


@pytest.fixture(scope="module")
def batch():
    rng = np.random.default_rng(0)
    enc = rng.integers(1, VOCAB, (2, 12)).astype(np.int32)
    enc[1, 9:] = 0  # padding in one row
    dec = rng.integers(1, VOCAB, (2, 6)).astype(np.int32)
    dec[:, 0] = 0
    return jnp.asarray(enc), jnp.asarray(dec)


def _loss_and_grads(cfg: sizes.T5Config, batch, **call_kwargs):
    """Loss and gradients of a fixed-seed model (same parameters for every cfg variant)."""
    enc, dec = batch
    graphdef, params, rest = nnx.split(t5.T5(cfg, rngs=nnx.Rngs(0)), nnx.Param, ...)

    def loss(p):
        logits = nnx.merge(graphdef, p, rest)(enc, dec, **call_kwargs)
        return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, dec))

    return jax.jit(jax.value_and_grad(loss))(params)


def _assert_close(a, b, atol=1e-5):
    (loss_a, grads_a), (loss_b, grads_b) = a, b
    np.testing.assert_allclose(loss_a, loss_b, atol=atol, rtol=0)
    assert jax.tree.structure(grads_a) == jax.tree.structure(grads_b)
    for x, y in zip(jax.tree.leaves(grads_a), jax.tree.leaves(grads_b), strict=True):
        np.testing.assert_allclose(x, y, atol=atol, rtol=0)


@pytest.fixture(scope="module")
def reference(mesh, batch):
    return _loss_and_grads(CFG, batch)


@pytest.mark.parametrize("variant", [
    {"scan_layers": True},
    {"scan_layers": True, "remat": "full"},
    {"scan_layers": True, "remat": "dots_saveable"},
    {"attention": "dot_product"},
    {"attention": "dot_product", "scan_layers": True},
    {"remat": "dots_saveable"},
    {"weight_grad": "transposed"},
    {"weight_grad": "transposed", "scan_layers": True, "remat": "dots_saveable"},
])
def test_variant_has_reference_loss_and_grads(mesh, batch, reference, variant):
    _assert_close(_loss_and_grads(dataclasses.replace(CFG, **variant), batch), reference)


def test_scan_with_per_layer_bias_and_relu(mesh, batch):
    cfg = dataclasses.replace(CFG, per_layer_relative_bias=True, mlp_activation="relu",
                              tie_embeddings=True, num_encoder_layers=3)
    _assert_close(_loss_and_grads(dataclasses.replace(cfg, scan_layers=True), batch),
                  _loss_and_grads(cfg, batch))


def test_scan_keeps_the_parameter_tree(mesh):
    def shapes(cfg):
        model = nnx.eval_shape(lambda: t5.T5(cfg, rngs=nnx.Rngs(0)))
        return jax.tree.map(lambda x: x.shape, nnx.to_pure_dict(nnx.state(model, nnx.Param)))

    assert shapes(dataclasses.replace(CFG, scan_layers=True)) == shapes(CFG)


def test_scan_dropout_is_random_and_reproducible(mesh, batch):
    cfg = dataclasses.replace(CFG, scan_layers=True, dropout_rate=0.5)
    enc, dec = batch
    graphdef, params, rest = nnx.split(t5.T5(cfg, rngs=nnx.Rngs(0)), nnx.Param, ...)

    @jax.jit
    def run(seed):
        model = nnx.merge(graphdef, params, rest)
        dropped = model(enc, dec, deterministic=False, rngs=nnx.Rngs(dropout=seed))
        return dropped, model(enc, dec)

    first, plain = run(jax.random.key(1))
    np.testing.assert_array_equal(run(jax.random.key(1))[0], first)
    assert not np.allclose(run(jax.random.key(2))[0], first)
    assert not np.allclose(first, plain)


def test_scan_model_decodes_with_the_cache_like_the_forward_pass(mesh, batch):
    enc, dec = batch
    graphdef, state = nnx.split(t5.T5(dataclasses.replace(CFG, scan_layers=True),
                                      rngs=nnx.Rngs(0)))

    @jax.jit
    def forward_and_init(state):
        model = nnx.merge(graphdef, state)
        return model(enc, dec), model.init_cache(model.encode(enc), enc, dec.shape[1])

    @jax.jit
    def step(state, tokens, cache, index):
        return nnx.merge(graphdef, state).decode_step(tokens, cache, index)

    full_BTV, cache = forward_and_init(state)
    for i in range(dec.shape[1]):
        step_BV, cache = step(state, dec[:, i:i + 1], cache, i)
        np.testing.assert_allclose(step_BV, full_BTV[:, i], atol=1e-5)


def test_dot_product_attention_equals_xla_with_broadcast_bias(mesh):
    rng = np.random.default_rng(1)
    q, k, v = (jnp.asarray(rng.normal(size=(2, L, 3, 4)), jnp.float32) for L in (5, 7, 7))
    bias = jnp.asarray(rng.normal(size=(1, 3, 5, 7)), jnp.float32)
    mask = jnp.where(jnp.asarray(rng.random((2, 1, 5, 7)) > 0.3), 0.0, attention_lib.MASK_BIAS)
    np.testing.assert_allclose(attention_lib.dot_product_attention(q, k, v, bias + mask),
                               attention_lib.xla_attention(q, k, v, bias + mask), atol=1e-6)


def test_attention_without_a_bias_equals_a_zero_bias(mesh):
    """No bias at all (None: cuDNN then runs without one) is a zero bias, in value and
    gradient, in both attention paths."""
    rng = np.random.default_rng(3)
    q, k, v = (jnp.asarray(rng.normal(size=(2, L, 3, 4)), jnp.float32) for L in (5, 7, 7))
    zero = jnp.zeros((1, 1, 5, 7), jnp.float32)
    for attend in (attention_lib.xla_attention, attention_lib.dot_product_attention):
        def loss(q, k, v, bias, attend=attend):
            return jnp.sum(attend(q, k, v, bias) ** 2)

        got = jax.grad(loss, argnums=(0, 1, 2))(q, k, v, None)
        want = jax.grad(loss, argnums=(0, 1, 2))(q, k, v, zero)
        np.testing.assert_allclose(attend(q, k, v, None), attend(q, k, v, zero), atol=1e-6)
        for g, w in zip(got, want, strict=True):
            np.testing.assert_allclose(g, w, atol=1e-5)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_heads_major_attention_equals_softmax_attention(mesh, dtype):
    """The decoding cache's [B, H, S, K] layout computes what [B, S, H, K] does, with the
    decoding step's biases (relative positions plus a causal mask; an encoder padding mask)."""
    rng = np.random.default_rng(4)
    q, k, v = (jnp.asarray(rng.normal(size=(2, L, 3, 4)), dtype) for L in (1, 7, 7))
    mask = jnp.where(jnp.arange(7) <= 3, 0.0, attention_lib.MASK_BIAS)[None, None, None]
    for bias in (jnp.asarray(rng.normal(size=(1, 3, 1, 7)), jnp.float32) + mask,
                 jnp.where(jnp.asarray(rng.random((2, 1, 1, 7)) > 0.3), 0.0,
                           attention_lib.MASK_BIAS)):
        got = attention_lib.heads_major_attention(q, jnp.swapaxes(k, 1, 2),
                                                  jnp.swapaxes(v, 1, 2), bias)
        want = attention_lib.softmax_attention(q, k, v, bias)
        assert got.shape == want.shape and got.dtype == want.dtype
        np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32),
                                   atol=1e-6 if dtype == jnp.float32 else 1e-2)


def _reference_attention(q, k, v, bias):
    scores = jnp.einsum("BQHK,BSHK->BHQS", q, k, preferred_element_type=jnp.float32) + bias
    probs = jax.nn.softmax(scores, axis=-1)
    return jnp.einsum("BHQS,BSHK->BQHK", probs.astype(v.dtype), v)


@pytest.mark.parametrize("bias_shape", [(2, 3, 5, 7), (1, 3, 5, 7), (2, 1, 1, 7)])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_softmax_attention_equals_autodiff_of_softmax(bias_shape, dtype):
    rng = np.random.default_rng(5)
    q, k, v = (jnp.asarray(rng.normal(size=(2, L, 3, 4)) * 2, dtype) for L in (5, 7, 7))
    bias = jnp.asarray(rng.normal(size=bias_shape) * 3, jnp.float32)
    bias = bias.at[..., -1].set(attention_lib.MASK_BIAS)  # a masked key, as padding makes
    probe = jnp.asarray(rng.normal(size=(2, 5, 3, 4)), jnp.float32)

    def value_and_grads(attend, *args):
        def loss(q, k, v, bias):
            return jnp.sum(attend(q, k, v, bias).astype(jnp.float32) * probe)
        out = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3)))(*args)
        return [np.asarray(x, np.float32) for x in jax.tree.leaves(out)]

    got = value_and_grads(attention_lib.softmax_attention, q, k, v, bias)
    want = value_and_grads(_reference_attention, q, k, v, bias)
    for g, w, arg in zip(got, want, (jnp.zeros(()), q, k, v, bias), strict=True):
        assert g.shape == w.shape == arg.shape
    # The masked key gets no attention and no gradient.
    np.testing.assert_array_equal(got[2][:, -1], 0.0)
    if dtype == jnp.float32:
        for g, w in zip(got, want, strict=True):
            np.testing.assert_allclose(g, w, atol=1e-5 * max(1.0, np.abs(w).max()))
    else:  # bfloat16 rounds in different places: no further from float32 than autodiff is
        exact = value_and_grads(_reference_attention,
                                *(x.astype(jnp.float32) for x in (q, k, v)), bias)
        for g, w, e in zip(got, want, exact, strict=True):
            assert np.abs(g - e).max() <= 3 * np.abs(w - e).max() + 1e-2 * np.abs(e).max()


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_scores_times_heads_equals_einsum(dtype):
    """The heads-major product behind a barrier (CPU) computes the einsum it replaces, for
    cross-attention shapes (Q != S) too."""
    rng = np.random.default_rng(8)
    a = jnp.asarray(rng.normal(size=(2, 3, 5, 7)), dtype)
    x = jnp.asarray(rng.normal(size=(2, 7, 3, 4)), dtype)
    got = jax.jit(attention_lib._scores_times_heads)(a, x)
    want = jnp.einsum("BHQS,BSHK->BQHK", a, x, preferred_element_type=jnp.float32)
    assert got.shape == (2, 5, 3, 4) and got.dtype == jnp.float32
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


def test_row_max_and_softmax_equal_jax():
    rng = np.random.default_rng(6)
    x = jnp.asarray(rng.normal(size=(3, 4, 33)) * 5, jnp.float32)
    for axis in (-1, 1):
        np.testing.assert_array_equal(softmax_lib.row_max(x, axis), jnp.max(x, axis))
        np.testing.assert_array_equal(softmax_lib.row_max(x, axis, keepdims=True),
                                      jnp.max(x, axis, keepdims=True))
        np.testing.assert_allclose(softmax_lib.softmax(x, axis), jax.nn.softmax(x, axis),
                                   rtol=1e-6)
    probe = jnp.asarray(rng.normal(size=x.shape), jnp.float32)
    grad = lambda f: jax.grad(lambda x: jnp.sum(f(x, -1) * probe))(x)
    np.testing.assert_allclose(grad(softmax_lib.softmax), grad(jax.nn.softmax), atol=1e-6)
    assert softmax_lib.row_max(jnp.full((2, 3), -jnp.inf), -1).tolist() == [-np.inf, -np.inf]


def test_bfloat16_optimizer_state_stores_bf16_and_updates_like_f32():
    params = {"w": jnp.linspace(-1.0, 1.0, 12).reshape(3, 4)}
    grads = {"w": jnp.full((3, 4), 0.25)}
    cfg = config_lib.OptimConfig(name="adamw", learning_rate=0.1, warmup_steps=1)
    f32_tx, _ = optim.make_optimizer(cfg, 10)
    bf16_tx, _ = optim.make_optimizer(dataclasses.replace(cfg, state_dtype="bfloat16"), 10)
    f32_state, bf16_state = f32_tx.init(params), bf16_tx.init(params)
    dtypes = {jax.tree_util.keystr(path): leaf.dtype
              for path, leaf in jax.tree_util.tree_flatten_with_path(bf16_state)[0]}
    # The first moment in bfloat16; the second moment and the count as they were.
    assert [d for k, d in dtypes.items() if ".mu" in k] == [jnp.bfloat16]
    assert [d for k, d in dtypes.items() if ".nu" in k] == [jnp.float32]
    assert jnp.int32 in dtypes.values()
    for _ in range(3):
        f32_updates, f32_state = f32_tx.update(grads, f32_state, params)
        bf16_updates, bf16_state = bf16_tx.update(grads, bf16_state, params)
        np.testing.assert_allclose(bf16_updates["w"], f32_updates["w"], rtol=2e-2)


def test_bfloat16_optimizer_state_follows_a_falling_gradient_scale():
    """A second moment rounded to bfloat16 after each step never decays (b2 = 0.999 moves it
    by less than half its last bit): after the gradients shrank 4x, AdamW's updates were half
    of float32's. Only the first moment is stored in bfloat16, and the updates keep up."""
    cfg = config_lib.OptimConfig(name="adamw", learning_rate=1e-3, warmup_steps=1,
                                 grad_clip_norm=0.0)
    txs = [optim.make_optimizer(dataclasses.replace(cfg, state_dtype=d), 10_000)[0]
           for d in ("float32", "bfloat16")]
    params = {"w": jnp.zeros((32, 32))}
    noise = jax.random.normal(jax.random.key(0), (3000, 32, 32))
    scale = jnp.where(jnp.arange(3000) < 1500, 1.0, 0.25)[:, None, None]

    def last_update_rms(tx):
        def body(state, g):
            updates, state = tx.update({"w": g}, state, params)
            return state, jnp.sqrt(jnp.mean(updates["w"] ** 2))
        return jax.jit(lambda: jax.lax.scan(body, tx.init(params), noise * scale)[1][-1])()

    f32_rms, bf16_rms = (float(last_update_rms(tx)) for tx in txs)
    np.testing.assert_allclose(bf16_rms, f32_rms, rtol=0.05)


def test_bfloat16_optimizer_state_with_adafactor_is_refused():
    with pytest.raises(config_lib.ConfigError, match="adafactor keeps none"):
        config_lib.load(None, ["optim.name=adafactor", "optim.state_dtype=bfloat16"])


def test_train_step_with_every_option(mesh):
    """The configured step (scan, dot_product, bf16 optimizer state) trains like the default."""
    base = config_lib.load(None, [
        "model.name=t5_1_1_test", "train.batch_size=2", "data.inputs_length=16",
        "data.targets_length=8", "optim.name=adamw", "mesh.fsdp=1"])
    fast = config_lib.apply_overrides(base, [
        "model.scan_layers=true", "model.attention=dot_product", "optim.state_dtype=bfloat16"])
    host = train_bench.synthetic_batch(2, 16, 8, VOCAB)
    results = []
    for config in (base, fast):
        setup = setup_lib.build(config, vocab_size=VOCAB, num_tasks=1, total_steps=4,
                                mesh=mesh, rules=mesh_lib.get_rules("data"))
        assert setup.model_cfg.scan_layers == (config is fast)
        state = setup.init_state(0)
        losses = []
        for _ in range(2):
            state, metrics = setup.step(state, {k: jnp.asarray(v) for k, v in host.items()})
            losses.append(float(metrics["loss_sum"] / metrics["weight_sum"]))
        results.append(losses)
    # Step 1 sees identical parameters; step 2 follows a bf16-rounded optimizer state.
    np.testing.assert_allclose(results[1][0], results[0][0], atol=1e-5)
    np.testing.assert_allclose(results[1][1], results[0][1], rtol=1e-2)


YNN_DOT = "--xla_cpu_experimental_ynn_fusion_type=LIBRARY_FUSION_TYPE_DOT"
PLAIN_SCHEDULE = "--xla_cpu_enable_concurrency_optimized_scheduler=false"


@pytest.mark.parametrize("existing,expected_added", [
    ("", [YNN_DOT, PLAIN_SCHEDULE]),
    ("--xla_force_host_platform_device_count=8", [YNN_DOT, PLAIN_SCHEDULE]),
    # The user's own choice of a flag wins; the other flag is still added.
    ("--xla_cpu_experimental_ynn_fusion_type=LIBRARY_FUSION_TYPE_DOT,"
     "LIBRARY_FUSION_TYPE_REDUCE", [PLAIN_SCHEDULE]),
    ("--xla_cpu_enable_concurrency_optimized_scheduler=true", [YNN_DOT]),
    ("--xla_cpu_scheduler_type=CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED", [YNN_DOT]),
])
def test_cpu_xla_defaults_respect_user_flags(existing, expected_added):
    env = {"XLA_FLAGS": existing} if existing else {}
    assert xla_env.set_cpu_defaults(env, jaxlib_version="0.10.2") == expected_added
    assert env["XLA_FLAGS"].split() == existing.split() + expected_added
    untouched = {"XLA_FLAGS": existing}
    assert xla_env.set_cpu_defaults(untouched, jaxlib_version="0.99.0") == []  # unknown jaxlib
    assert untouched == {"XLA_FLAGS": existing}
    opted_out = {"XLA_FLAGS": existing, "MTJAX_XLA_DEFAULTS": "0"}
    assert xla_env.set_cpu_defaults(opted_out, jaxlib_version="0.10.2") == []
    assert opted_out["XLA_FLAGS"] == existing


@pytest.mark.parametrize("name,extra", [
    ("adafactor", {}),
    ("adamw", {"weight_decay": 0.01}),
    ("adamw", {"state_dtype": "bfloat16"}),
])
def test_layerwise_optimizer_matches_per_parameter_and_traces_less(mesh, name, extra):
    """model.scan_layers' optimizer: the same state layout and updates, traced once per stack."""
    params = nnx.to_pure_dict(nnx.state(t5.T5(CFG, rngs=nnx.Rngs(0)), nnx.Param))
    assert layerwise.find_layer_stacks(params) == [("decoder", "layers"), ("encoder", "layers")]
    cfg = config_lib.OptimConfig(name=name, warmup_steps=1, **extra)
    plain, _ = optim.make_optimizer(cfg, 10)
    stacked, _ = optim.make_optimizer(cfg, 10, per_layer_kind=True)
    rng = np.random.default_rng(0)
    grads = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape) * 0.1, p.dtype), params)
    states = [jax.jit(plain.init)(params), jax.jit(stacked.init)(params)]  # (scans compile)
    assert jax.tree.structure(states[0]) == jax.tree.structure(states[1])
    trees = [params, params]
    for _ in range(3):
        for i, tx in enumerate((plain, stacked)):
            updates, states[i] = jax.jit(tx.update)(grads, states[i], trees[i])
            trees[i] = optax.apply_updates(trees[i], updates)
    assert jax.tree.structure(states[0]) == jax.tree.structure(states[1])
    for a, b in zip(jax.tree.leaves((trees[0], states[0])),
                    jax.tree.leaves((trees[1], states[1])), strict=True):
        assert a.dtype == b.dtype and a.shape == b.shape
        np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32),
                                   atol=1e-6 if a.dtype == jnp.float32 else 1e-2, rtol=1e-5)

    def op_count(tx, layers_each):
        cfg = dataclasses.replace(CFG, num_encoder_layers=layers_each,
                                  num_decoder_layers=layers_each)
        p = jax.eval_shape(  # shapes are all the lowering needs
            lambda: nnx.to_pure_dict(nnx.state(t5.T5(cfg, rngs=nnx.Rngs(0)), nnx.Param)))
        text = jax.jit(tx.update).lower(p, jax.eval_shape(tx.init, p), p).as_text()
        return sum(1 for line in text.splitlines() if " = " in line)

    # Per extra layer the plain update emits all its arithmetic again; the layerwise one only its
    # stacking and slicing (cheap to compile): measured 0.29x (Adafactor), 0.51x (AdamW).
    plain_per_layer = (op_count(plain, 4) - op_count(plain, 2)) / 4
    stacked_per_layer = (op_count(stacked, 4) - op_count(stacked, 2)) / 4
    assert stacked_per_layer < 0.6 * plain_per_layer, (stacked_per_layer, plain_per_layer)


@pytest.mark.parametrize("method", ["gather", "onehot"])
def test_relative_bias_lookup_and_gradient_equal_take(mesh, method):
    table_HN = jnp.asarray(np.random.default_rng(0).normal(size=(3, 8)), jnp.float32)
    rel_QS = jnp.arange(9)[None, :] - jnp.arange(6)[:, None]
    bucket_QS = position_bias.relative_position_bucket(rel_QS, bidirectional=True, num_buckets=8,
                                                max_distance=16)
    g_HQS = jnp.asarray(np.random.default_rng(1).normal(size=(3, 6, 9)), jnp.float32)
    np.testing.assert_array_equal(position_bias.lookup_relative_bias(table_HN, bucket_QS, method),
                                  jnp.take(table_HN, bucket_QS, axis=1))

    def grad(lookup):
        return jax.grad(lambda t: jnp.sum(lookup(t) * g_HQS))(table_HN)

    np.testing.assert_allclose(
        grad(lambda t: position_bias.lookup_relative_bias(t, bucket_QS, method)),
        grad(lambda t: jnp.take(t, bucket_QS, axis=1)), atol=1e-5)


def test_relative_bias_lookup_rejects_unknown_method():
    with pytest.raises(ValueError, match="method"):
        position_bias.lookup_relative_bias(jnp.zeros((2, 4)), jnp.zeros((3, 3), jnp.int32), "scan")


def test_cross_entropy_target_logit_equals_take_along_axis():
    rng = np.random.default_rng(0)
    logits = jnp.asarray(rng.normal(size=(2, 5, 11)) * 3, jnp.float32)
    targets = jnp.asarray(rng.integers(0, 11, (2, 5)), jnp.int32)
    loss, z = step_lib.cross_entropy_with_z_loss(logits, targets, 1e-4)
    log_z = jax.nn.logsumexp(logits, axis=-1)
    gold = log_z - jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    np.testing.assert_allclose(loss - z, gold, atol=1e-6)
    np.testing.assert_allclose(z, 1e-4 * log_z**2, rtol=1e-6)


def _t5x_smoothed_loss(logits, targets, label_smoothing, z_loss):
    """T5X's compute_weighted_cross_entropy per token, in float64 numpy: the soft targets
    written out, the loss against them, minus T5X's normalizing constant, plus the z-loss."""
    logits = np.asarray(logits, np.float64)
    vocab_size = logits.shape[-1]
    confidence = 1.0 - label_smoothing
    low = label_smoothing / (vocab_size - 1)
    soft = np.full(logits.shape, low)
    np.put_along_axis(soft, np.asarray(targets)[..., None], confidence, axis=-1)
    top = logits.max(-1, keepdims=True)
    log_z = np.log(np.exp(logits - top).sum(-1, keepdims=True)) + top
    constant = -(confidence * np.log(confidence)
                 + (vocab_size - 1) * low * np.log(low + 1e-20))
    loss = -np.sum(soft * (logits - log_z), axis=-1) - constant + z_loss * log_z[..., 0] ** 2
    return loss, soft, log_z


def _random_logits(seed, vocab_size=101):
    rng = np.random.default_rng(seed)
    logits = jnp.asarray(rng.normal(size=(3, 5, vocab_size)) * 3, jnp.float32)
    return logits, jnp.asarray(rng.integers(0, vocab_size, (3, 5)), jnp.int32)


@pytest.mark.parametrize("label_smoothing", [0.1, 0.6])
def test_label_smoothed_loss_equals_t5x_formula(label_smoothing):
    logits, targets = _random_logits(2)
    loss, z = step_lib.cross_entropy_with_z_loss(logits, targets, 1e-2, label_smoothing)
    want, _, log_z = _t5x_smoothed_loss(logits, targets, label_smoothing, 1e-2)
    np.testing.assert_allclose(loss, want, rtol=2e-6, atol=2e-6)
    np.testing.assert_allclose(z, 1e-2 * log_z[..., 0] ** 2, rtol=1e-6)


def test_label_smoothed_loss_gradient_is_softmax_minus_soft_targets():
    """d loss / d logits = (1 + 2 z_loss log Z) softmax - soft targets, per token."""
    logits, targets = _random_logits(3)
    cotangent_BL = jnp.asarray(np.random.default_rng(4).uniform(0.5, 2.0, (3, 5)), jnp.float32)

    def weighted_sum(x):
        return jnp.sum(step_lib.cross_entropy_with_z_loss(x, targets, 1e-2, 0.2)[0] * cotangent_BL)

    _, soft, log_z = _t5x_smoothed_loss(logits, targets, 0.2, 1e-2)
    softmax = np.exp(np.asarray(logits, np.float64) - log_z)
    want = np.asarray(cotangent_BL)[..., None] * ((1 + 2e-2 * log_z) * softmax - soft)
    np.testing.assert_allclose(jax.grad(weighted_sum)(logits), want, atol=1e-6)


def test_no_label_smoothing_is_the_loss_as_before_bit_for_bit():
    """label_smoothing=0 computes what the step computed before the option (log Z - target
    logit + z-loss), in value and gradient; a -inf logit off the target stays harmless
    (the smoothed formula's 0 * sum(logits) would make it NaN)."""
    logits, targets = _random_logits(5)
    logits = logits.at[0, 0, (int(targets[0, 0]) + 1) % logits.shape[-1]].set(-jnp.inf)

    def before(x):
        log_z = jax.nn.logsumexp(x, axis=-1)
        z = 1e-4 * jnp.square(log_z)
        return log_z - jnp.take_along_axis(x, targets[..., None], axis=-1)[..., 0] + z, z

    def now(x):
        return step_lib.cross_entropy_with_z_loss(x, targets, 1e-4, 0.0)

    for got, want in zip(now(logits), before(logits), strict=True):
        np.testing.assert_array_equal(got, want)
    assert np.isfinite(np.asarray(now(logits)[0])).all()
    grad_now, grad_before = (jax.grad(lambda x, f=f: jnp.sum(f(x)[0]))(logits)
                             for f in (now, before))
    np.testing.assert_array_equal(grad_now, grad_before)


def test_label_smoothing_takes_xla_loss_and_refuses_the_cpu_kernel():
    assert step_lib.resolve_cross_entropy("auto", 0.1) == "xla"
    with pytest.raises(ValueError, match=r"train\.cross_entropy=cpu_fused has no label "
                                         r"smoothing \(train\.label_smoothing=0\.1\)"):
        step_lib.resolve_cross_entropy("cpu_fused", 0.1)


def test_first_argmax_equals_argmax_with_ties():
    rng = np.random.default_rng(1)
    # Small integers: most rows have their maximum more than once.
    logits = jnp.asarray(rng.integers(-3, 4, (3, 7, 19)), jnp.float32)
    logits = logits.at[0, 0].set(-jnp.inf)  # an all -inf row: index 0, as argmax
    np.testing.assert_array_equal(softmax_lib.first_argmax(logits), jnp.argmax(logits, axis=-1))
    logits_np = np.asarray(logits)
    assert np.mean(np.sum(logits_np == logits_np.max(-1, keepdims=True), -1) > 1) > 0.5


def test_tied_embeddings_with_transposed_weight_grads_match_autodiff(mesh, batch):
    tied = dataclasses.replace(CFG, tie_embeddings=True, mlp_activation="relu")
    _assert_close(_loss_and_grads(dataclasses.replace(tied, weight_grad="transposed"), batch),
                  _loss_and_grads(tied, batch))


@pytest.mark.parametrize("dtype,out_dtype,tol,rows", [
    (jnp.float32, None, 1e-5, 5), (jnp.float32, jnp.float32, 1e-5, 5),
    (jnp.float32, None, 1e-5, 16),  # 32 rows: transpose_2d's tiled path
    (jnp.bfloat16, jnp.float32, 1e-2, 5), (jnp.bfloat16, None, 2e-2, 5)])
def test_matmul_with_transposed_weight_grad_equals_autodiff(dtype, out_dtype, tol, rows):
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.normal(size=(2, rows, 4)), dtype)
    kernel = jnp.asarray(rng.normal(size=(4, 3)), dtype)
    probe = jnp.asarray(rng.normal(size=(2, rows, 3)), jnp.float32)

    def loss(weight_grad):
        def f(x, kernel):
            y = layers.matmul(x, kernel, out_dtype=out_dtype, weight_grad=weight_grad)
            assert y.dtype == (out_dtype or dtype)
            return jnp.sum(y.astype(jnp.float32) * probe)
        return jax.jit(jax.value_and_grad(f, argnums=(0, 1)))(x, kernel)

    (value, (dx, dkernel)), (ref_value, (ref_dx, ref_dkernel)) = loss("transposed"), loss("xla")
    assert dx.dtype == dtype and dkernel.dtype == dtype and dkernel.shape == (4, 3)
    np.testing.assert_allclose(value, ref_value, rtol=tol)
    for got, want in ((dx, ref_dx), (dkernel, ref_dkernel)):
        np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32),
                                   rtol=tol, atol=tol)
    if dtype == jnp.float32 and rows == 16:  # the tiled transpose changes no bit of dK
        with mock.patch.object(layers, "transpose_2d", lambda x: x.T):
            _, (_, plain_dkernel) = loss("transposed")
        np.testing.assert_array_equal(dkernel, plain_dkernel)
    # Against the definition, not only against autodiff: dK = x^T @ probe.
    want = np.einsum("bli,blo->io", np.asarray(x, np.float32), np.asarray(probe))
    np.testing.assert_allclose(np.asarray(dkernel, np.float32), want, rtol=2 * tol, atol=2 * tol)


@pytest.mark.parametrize("shape", [(32, 7), (64, 64), (48, 1), (10, 3), (17, 16)])
def test_transpose_2d_is_exactly_the_transpose(shape):
    rng = np.random.default_rng(8)
    # Normal values spanning many binades: the identity products give every bit back.
    x = rng.normal(size=shape) * np.exp2(rng.integers(-100, 100, size=shape))
    x = jnp.asarray(x, jnp.float32)
    got = jax.jit(layers.transpose_2d)(x)
    np.testing.assert_array_equal(np.asarray(got).view(np.uint32),
                                  np.asarray(x).T.view(np.uint32))
    if shape[0] % 16 == 0:  # the tiled path: the matmuls flush denormals, -0 becomes +0
        edge = x.at[0, 0].set(-0.0).at[-1, -1].set(1e-45)
        got = np.asarray(jax.jit(layers.transpose_2d)(edge))
        assert got[0, 0] == 0 and got[-1, -1] == 0 and not np.signbit(got[0, 0])
    bf16 = x.astype(jnp.bfloat16)  # other dtypes take the plain transpose
    np.testing.assert_array_equal(layers.transpose_2d(bf16), bf16.T)


def test_auto_weight_grad_is_transposed_only_on_cpu(monkeypatch):
    assert layers.resolve_weight_grad("auto") == "transposed"  # this CPU
    assert layers.resolve_weight_grad("xla") == "xla"
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert layers.resolve_weight_grad("auto") == "xla"
    assert layers.resolve_weight_grad("transposed") == "transposed"
    with pytest.raises(ValueError, match="weight_grad"):
        dataclasses.replace(CFG, weight_grad="folded")


def test_auto_attention_is_cudnn_only_on_gpu_in_bfloat16(monkeypatch):
    assert attention_lib.resolve_attention("auto", jnp.bfloat16) == "xla"  # this CPU
    assert attention_lib.resolve_attention("dot_product", jnp.float32) == "dot_product"
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert attention_lib.resolve_attention("auto", jnp.dtype("bfloat16")) == "dot_product"
    assert attention_lib.resolve_attention("auto", jnp.float32) == "xla"
    assert attention_lib.resolve_attention("xla", jnp.bfloat16) == "xla"


@pytest.mark.parametrize("q_len, s_len, offset, bidirectional", [
    (6, 9, 0, True), (9, 6, 0, False), (7, 7, 0, False), (1, 12, 5, False), (1, 12, 0, True)])
def test_toeplitz_relative_bias_equals_lookup_in_value_and_gradient(q_len, s_len, offset,
                                                                    bidirectional):
    module = nnx.eval_shape(lambda: position_bias.RelativePositionBias(
        3, num_buckets=8, max_distance=16, bidirectional=bidirectional, dtype=jnp.float32,
        param_dtype=jnp.float32, rngs=nnx.Rngs(0)))
    graphdef = nnx.graphdef(module)
    table_HN = jnp.asarray(np.random.default_rng(0).normal(size=(3, 8)), jnp.float32)
    g_HQS = jnp.asarray(np.random.default_rng(1).normal(size=(3, q_len, s_len)), jnp.float32)
    relative_QS = jnp.arange(s_len)[None, :] - (jnp.arange(q_len) + offset)[:, None]
    bucket_QS = position_bias.relative_position_bucket(relative_QS, bidirectional=bidirectional,
                                                num_buckets=8, max_distance=16)

    def toeplitz(table, query_offset):
        bias = nnx.merge(graphdef, nnx.State({"rel_embedding": nnx.Param(table)}))
        bias.method = "toeplitz"  # "auto" is "gather" on this CPU
        return bias(q_len, s_len, query_offset)[0]

    expected = jnp.take(table_HN, bucket_QS, axis=1)
    np.testing.assert_array_equal(toeplitz(table_HN, offset), expected)
    # The decoder passes a traced offset.
    np.testing.assert_array_equal(jax.jit(toeplitz)(table_HN, jnp.int32(offset)), expected)
    grad = jax.grad(lambda t: jnp.sum(toeplitz(t, offset) * g_HQS))(table_HN)
    grad_take = jax.grad(lambda t: jnp.sum(jnp.take(t, bucket_QS, axis=1) * g_HQS))(table_HN)
    np.testing.assert_allclose(grad, grad_take, atol=1e-5)


def test_diagonal_sums_add_up_each_key_minus_query_diagonal():
    x = np.random.default_rng(2).normal(size=(2, 4, 7))
    expected = np.zeros((2, 4 + 7 - 1))
    for q in range(4):
        for s in range(7):
            expected[:, s - q + 3] += x[:, q, s]
    np.testing.assert_allclose(position_bias.diagonal_sums(jnp.asarray(x, jnp.float32)), expected,
                               atol=1e-6)


@pytest.mark.parametrize("backend", ["cpu", "gpu"])
@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 1e-5), (jnp.bfloat16, 2e-2)])
def test_scale_features_gradient_is_the_column_sum(monkeypatch, backend, dtype, tol):
    """The scale's gradient sums dy * x over every leading axis (a ones-vector product on CPU,
    a plain sum elsewhere); x's gradient is dy * scale, as autodiff's."""
    monkeypatch.setattr(jax, "default_backend", lambda: backend)
    rng = np.random.default_rng(5)
    x = jnp.asarray(rng.normal(size=(3, 7, 6)), dtype)
    scale = jnp.asarray(rng.normal(size=(6,)), dtype)
    probe = jnp.asarray(rng.normal(size=(3, 7, 6)), jnp.float32)

    def grads(fn):
        def f(x, scale):
            return jnp.sum(fn(x, scale).astype(jnp.float32) * probe)
        return jax.jit(jax.grad(f, argnums=(0, 1)))(x, scale)

    (dx, dscale), (ref_dx, ref_dscale) = grads(layers.scale_features), grads(
        lambda x, s: x * s[None, None, :])
    assert dx.dtype == dtype and dscale.dtype == dtype and dscale.shape == (6,)
    np.testing.assert_array_equal(dx, ref_dx)
    want = np.einsum("bld,bld->d", np.asarray(x, np.float32),
                     np.asarray(probe.astype(dtype), np.float32))
    np.testing.assert_allclose(np.asarray(dscale, np.float32), want, rtol=tol, atol=tol)
    np.testing.assert_allclose(np.asarray(dscale, np.float32),
                               np.asarray(ref_dscale, np.float32), rtol=tol, atol=tol)


def test_global_norm_and_clipping_equal_optax():
    rng = np.random.default_rng(6)
    tree = {"w": jnp.asarray(rng.normal(size=(3, 4)), jnp.float32),
            "b": jnp.asarray(rng.normal(size=(5,)), jnp.bfloat16),
            "s": jnp.asarray(-2.5, jnp.float32),
            "stacked": jnp.asarray(rng.normal(size=(2, 3, 4)), jnp.float32)}
    norm = optim.global_norm(tree)
    assert norm.dtype == jnp.float32
    exact = np.sqrt(sum(np.sum(np.asarray(x, np.float64) ** 2) for x in jax.tree.leaves(tree)))
    np.testing.assert_allclose(norm, exact, rtol=1e-6)  # float32 sums, also of the bf16 leaf
    np.testing.assert_allclose(norm, optax.tree.norm(tree), rtol=1e-3)  # optax squares in bf16
    for max_norm in (0.5 * float(norm), 2.0 * float(norm)):  # clipped, then untouched
        ours, theirs = optim.clip_by_global_norm(max_norm), optax.clip_by_global_norm(max_norm)
        got, got_state = ours.update(tree, ours.init(tree))
        want, want_state = theirs.update(tree, theirs.init(tree))
        assert jax.tree.structure(got_state) == jax.tree.structure(want_state)  # checkpoints
        for a, b, x in zip(jax.tree.leaves(got), jax.tree.leaves(want), jax.tree.leaves(tree),
                           strict=True):
            assert a.dtype == b.dtype == x.dtype
            if max_norm > norm:
                np.testing.assert_array_equal(a, x)
            np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32),
                                       rtol=1e-2 if x.dtype == jnp.bfloat16 else 1e-3)
        np.testing.assert_allclose(optim.global_norm(got), min(max_norm, float(norm)),
                                   rtol=1e-2)  # the bf16 leaf rounds


def _packed_test_batch() -> dict[str, jax.Array]:
    """4 rows of 16 / 8 tokens whose weighted sequences differ in length: row 0 weighs 5
    target tokens and row 1 two; row 2 packs two sequences of 3 and 5; row 3 has one of 6 and
    two padding tokens. 21 weighted tokens in 5 sequences."""
    host = train_bench.synthetic_batch(4, 16, 8, VOCAB)
    weights = np.ones((4, 8), np.int32)
    weights[0, 5:] = 0  # the microbatches, rows (0, 2) and (1, 3), weigh 13 and 8 tokens
    weights[1, 2:] = 0
    weights[3, 6:] = 0
    host["decoder_loss_weights"] = weights
    host["decoder_segment_ids"][2] = [1, 1, 1, 2, 2, 2, 2, 2]
    host["decoder_positions"][2] = [0, 1, 2, 0, 1, 2, 3, 4]
    host["encoder_segment_ids"][2] = [1] * 8 + [2] * 8
    host["encoder_positions"][2] = list(range(8)) * 2
    host["decoder_segment_ids"][3, 6:] = 0
    return {k: jnp.asarray(v) for k, v in host.items()}


@pytest.mark.parametrize("microbatches, label_smoothing, factor, normalization",
                         [(1, 0.0, 0.0, "tokens"), (2, 0.0, 0.0, "tokens"),
                          (2, 0.1, 0.0, "tokens"), (1, 0.0, 64.0, "tokens"),
                          (2, 0.0, 0.0, "total_tokens"), (2, 0.1, 0.0, "per_sequence")])
def test_step_gradient_is_the_mean_the_loss_normalization_names(
        mesh, microbatches, label_smoothing, factor, normalization):
    """grad_norm is the norm of the gradient of (weighted loss sum / weighted token count),
    also when the batch runs as microbatches with different token counts each; of the
    smoothed loss with train.label_smoothing; of (loss sum / F) with
    train.loss_normalizing_factor=F; of (loss sum / batch x length) with
    train.loss_normalization=total_tokens; and of the mean over sequences of each sequence's
    mean token loss with per_sequence (T5X's AVERAGE_PER_SEQUENCE), packed sequences each
    counted once. The config reaches the step."""
    config = config_lib.load(None, [
        "model.name=t5_1_1_test", "train.batch_size=4", "data.inputs_length=16",
        "data.targets_length=8", "optim.name=adamw", "mesh.fsdp=1",
        f"train.microbatches={microbatches}", f"train.label_smoothing={label_smoothing}",
        f"train.loss_normalizing_factor={factor}", f"train.loss_normalization={normalization}"])
    setup = setup_lib.build(config, vocab_size=VOCAB, num_tasks=1, total_steps=4,
                            mesh=mesh, rules=mesh_lib.get_rules("data"))
    batch = _packed_test_batch()
    state = setup.init_state(0)
    weights, segments = (np.asarray(batch[k]) for k in ("decoder_loss_weights",
                                                         "decoder_segment_ids"))

    def mean_loss(params):
        logits = step_lib.model_logits(setup.model_def, params, batch, None)
        loss_BL, _ = step_lib.cross_entropy_with_z_loss(
            logits, batch["decoder_target_tokens"], config.train.z_loss, label_smoothing)
        if normalization == "per_sequence":
            sequence_means = [jnp.sum(loss_BL[row] * mask) / mask.sum()
                              for row in range(4) for segment in (1, 2)
                              if (mask := weights[row] * (segments[row] == segment)).sum()]
            assert len(sequence_means) == 5
            return sum(sequence_means) / 5
        denominator = factor or (32 if normalization == "total_tokens" else weights.sum())
        return jnp.sum(loss_BL * weights) / denominator

    want = optax.tree.norm(jax.jit(jax.grad(mean_loss))(state.params))
    _, metrics = setup.step(state, batch)
    assert float(metrics["weight_sum"]) == 21.0  # logged sums keep the loss weights
    np.testing.assert_allclose(metrics["grad_norm"], want, rtol=2e-5)


def test_per_sequence_weights_sum_to_one_per_weighted_sequence():
    """Each packed sequence's weights become 1 / its weighted length; padding, and a sequence
    with no weight, stay 0."""
    weights = jnp.asarray([[1, 1, 1, 1, 1, 0, 0, 0], [1, 0, 1, 1, 0, 0, 1, 0]])
    segments = jnp.asarray([[1, 1, 2, 2, 2, 3, 0, 0], [1, 1, 2, 2, 2, 3, 3, 0]])
    got = step_lib.per_sequence_weights(weights, segments)
    np.testing.assert_allclose(got, [[1 / 2, 1 / 2, 1 / 3, 1 / 3, 1 / 3, 0, 0, 0],
                                     [1, 0, 1 / 2, 1 / 2, 0, 0, 1, 0]], rtol=1e-6)


def test_per_sequence_weights_of_segment_ids_past_the_row_length():
    """The packer numbers a row's examples on every side alike, so an example without target
    tokens (targets without EOS, empty) still takes a number: the decoder ids of the next ones
    can pass the row's length (here 7 in a row of 4). Their sequences keep their weight."""
    got = step_lib.per_sequence_weights(jnp.asarray([[1, 1, 1, 0], [1, 1, 1, 1]]),
                                        jnp.asarray([[1, 1, 7, 0], [5, 9, 9, 9]]))
    np.testing.assert_allclose(got, [[1 / 2, 1 / 2, 1, 0], [1, 1 / 3, 1 / 3, 1 / 3]],
                               rtol=1e-6)


@pytest.mark.parametrize("microbatches", [1, 2])
def test_a_loss_normalizing_factor_scales_the_gradients_and_not_the_logged_loss(
        mesh, microbatches):
    """train.loss_normalizing_factor=F divides the loss sum by F instead of the batch's weighted
    token count (23 here): the gradients are 23 / F times the default's, with microbatches too;
    the metric sums do not change."""
    config = config_lib.load(None, [
        "model.name=t5_1_1_test", "train.batch_size=4", "data.inputs_length=16",
        "data.targets_length=8", "mesh.fsdp=1", f"train.microbatches={microbatches}"])
    setup = setup_lib.build(config, vocab_size=VOCAB, num_tasks=1, total_steps=4,
                            mesh=mesh, rules=mesh_lib.get_rules("data"))
    host = train_bench.synthetic_batch(4, 16, 8, VOCAB)
    host["decoder_loss_weights"][0, 5:] = 0
    host["decoder_loss_weights"][1, 2:] = 0
    batch = {k: jnp.asarray(v) for k, v in host.items()}
    # An "optimizer" whose state is the step's gradients, read exactly (no update to subtract).
    keep_gradients = optax.GradientTransformation(
        init=lambda params: jax.tree.map(jnp.zeros_like, params),
        update=lambda grads, _, params=None: (jax.tree.map(jnp.zeros_like, grads), grads))
    params = setup.init_state(0).params
    state = state_lib.TrainState(step=jnp.asarray(0, jnp.int32), params=params,
                                 opt_state=keep_gradients.init(params))
    gradients, metrics = [], []
    for factor in (0.0, 1000.0):
        step = step_lib.make_train_step(
            setup.model_def, keep_gradients, optax.constant_schedule(1.0), num_tasks=1,
            z_loss=config.train.z_loss, microbatches=microbatches,
            loss_normalizing_factor=factor)
        new_state, step_metrics = jax.jit(step)(state, batch)
        gradients.append(new_state.opt_state)
        metrics.append(jax.device_get(step_metrics))
    default, scaled = gradients
    assert float(metrics[0]["weight_sum"]) == 23.0
    for got, want in zip(jax.tree.leaves(scaled), jax.tree.leaves(default), strict=True):
        want = np.asarray(want) * 23.0 / 1000.0  # float32 rounding: atol from the leaf's scale
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
    for name in ("loss_sum", "z_loss_sum", "correct_sum", "weight_sum", "task_loss_sum"):
        np.testing.assert_array_equal(metrics[1][name], metrics[0][name], err_msg=name)
    np.testing.assert_allclose(metrics[1]["grad_norm"], metrics[0]["grad_norm"] * 0.023,
                               rtol=1e-5)


def test_microbatch_i_takes_every_nth_row():
    """Microbatch i holds rows i, i + n, ...: with the batch split over devices in contiguous
    blocks, every microbatch takes the same rows from each device's block."""
    x = jnp.arange(8 * 3).reshape(8, 3)
    split = step_lib.split_microbatches(x, 2)
    assert split.shape == (2, 4, 3)
    for i in range(2):
        np.testing.assert_array_equal(split[i], x[i::2])


def test_a_skipped_step_keeps_the_optimizer_count_with_the_step(mesh):
    """train.on_nonfinite=skip keeps the old weights and statistics but not the old step count:
    the optimizer's schedule stays at schedule(state.step), the learning rate the step logs
    (reverting the count too left every later update one schedule step behind its log)."""
    config = config_lib.load(None, [
        "model.name=t5_1_1_test", "train.batch_size=2", "data.inputs_length=16",
        "data.targets_length=8", "optim.name=adamw", "optim.warmup_steps=10", "mesh.fsdp=1",
        "train.on_nonfinite=skip"])
    setup = setup_lib.build(config, vocab_size=VOCAB, num_tasks=1, total_steps=20,
                            mesh=mesh, rules=mesh_lib.get_rules("data"))
    host = train_bench.synthetic_batch(2, 16, 8, VOCAB)
    state = setup.init_state(0)
    for call in range(3):
        batch = dict(host)
        if call == 1:  # a NaN weight: a non-finite loss, and the step is skipped
            batch["decoder_loss_weights"] = host["decoder_loss_weights"].astype(np.float32)
            batch["decoder_loss_weights"][0, 0] = np.nan
        before = jax.device_get(state.params)  # the step donates the state's buffers
        state, metrics = setup.step(state, {k: jnp.asarray(v) for k, v in batch.items()})
        assert bool(metrics["finite"]) == (call != 1)
        counts = [int(x) for x in jax.tree.leaves(state.opt_state)
                  if jnp.issubdtype(x.dtype, jnp.integer)]
        assert counts and set(counts) == {int(state.step)} == {call + 1}, counts
        kept = all(np.array_equal(a, b) for a, b in zip(
            jax.tree.leaves(before), jax.tree.leaves(jax.device_get(state.params)), strict=True))
        if call:  # (the first update's warmup learning rate is 0)
            assert kept == (call == 1)


@pytest.mark.parametrize("schedule, warmup, expected", [
    # T5's rsqrt: the plateau value until warmup_steps, then learning_rate * sqrt(warmup / step).
    ("rsqrt", 10, {0: 1.0, 10: 1.0, 40: 0.5, 250: 0.2}),
    # Linear warmup from 0, then each shape; the step is optax's count (0 for the first update).
    ("constant", 10, {0: 0.0, 5: 0.5, 10: 1.0, 99: 1.0, 500: 1.0}),
    ("constant", 0, {0: 1.0, 99: 1.0}),  # T5's fine-tuning schedule
    ("linear", 10, {0: 0.0, 5: 0.5, 10: 1.0, 55: 0.5, 100: 0.0, 200: 0.0}),
    ("linear", 0, {0: 1.0, 50: 0.5, 100: 0.0}),
    ("cosine", 10, {0: 0.0, 10: 1.0, 55: 0.55, 100: 0.1}),
])
def test_learning_rate_schedules_follow_their_formulas(schedule, warmup, expected):
    cfg = config_lib.load(None, [f"optim.schedule={schedule}", f"optim.warmup_steps={warmup}",
                                 "optim.learning_rate=1.0"]).optim
    lr = optim.make_schedule(cfg, total_steps=100)
    assert {s: float(lr(s)) for s in expected} == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize("schedule", ["rsqrt", "constant", "linear", "cosine"])
def test_every_schedule_takes_a_one_step_run_without_warmup(schedule):
    """cosine with warmup_steps=0 and train.steps=1 asked optax for 0 decay steps (a
    traceback)."""
    cfg = config_lib.load(None, [f"optim.schedule={schedule}", "optim.warmup_steps=0"]).optim
    assert np.isfinite(float(optim.make_schedule(cfg, total_steps=1)(0)))


def test_auto_schedule_is_rsqrt_for_adafactor_and_cosine_for_adamw():
    for name, resolved in (("adafactor", "rsqrt"), ("adamw", "cosine")):
        cfg = config_lib.load(None, [f"optim.name={name}"]).optim
        assert optim.schedule_name(cfg) == resolved
        explicit = dataclasses.replace(cfg, schedule=resolved)
        assert [float(optim.make_schedule(cfg, 1000)(s)) for s in (0, 50, 500, 999)] == [
            float(optim.make_schedule(explicit, 1000)(s)) for s in (0, 50, 500, 999)]
    with pytest.raises(config_lib.ConfigError, match="optim.schedule"):
        config_lib.load(None, ["optim.schedule=exponential"])


def test_adafactor_statistics_are_sharded_like_the_parameter_axes_they_keep(mesh):
    """Adafactor's factored statistics (v_row, v_col) each average one axis out of a parameter;
    for a square kernel (every attention projection of the T5 sizes, 768 × 12·64 in base) the
    shapes cannot tell which, and v_row took the other axis's sharding. The axes each statistic
    keeps are read from optax's own numbers: after one update from a gradient that varies along
    one axis only, a statistic varies where it kept that axis."""
    from jax.sharding import NamedSharding, PartitionSpec

    shapes = {"square": (128, 128), "wide": (128, 256), "tall": (256, 128),
              "stacked": (2, 128, 128)}
    specs = {k: (None,) * (len(s) - 2) + ("fsdp", "tensor") for k, s in shapes.items()}
    params = {k: jnp.ones(s, jnp.float32) for k, s in shapes.items()}
    tx, _ = optim.make_optimizer(config_lib.OptimConfig(name="adafactor"), 10)
    shardings = state_lib.opt_state_shardings(
        jax.eval_shape(tx.init, params), jax.eval_shape(lambda: params),
        {k: NamedSharding(mesh, PartitionSpec(*s)) for k, s in specs.items()}, mesh)

    def factored(state):
        return next(x for x in jax.tree.leaves(state, is_leaf=lambda x: hasattr(x, "v_row"))
                    if hasattr(x, "v_row"))

    kept = {(k, field): [] for k in shapes for field in ("v_row", "v_col")}
    for axis in range(3):
        grads = {k: jnp.broadcast_to(jnp.arange(1.0, s[axis] + 1).reshape(
                     [-1 if a == axis else 1 for a in range(len(s))]), s)
                 if axis < len(s) else jnp.ones(s) for k, s in shapes.items()}
        _, state = tx.update(grads, tx.init(params), params)
        for (k, field), axes in kept.items():
            if np.ptp(np.asarray(getattr(factored(state), field)[k])) > 0:
                axes.append(axis)
    for (k, field), axes in kept.items():
        assert len(axes) == len(shapes[k]) - 1, (k, field, axes)
        got = getattr(factored(shardings), field)[k].spec
        assert got == PartitionSpec(*(specs[k][a] for a in axes)), (k, field, got)


def test_cosine_without_warmup_starts_at_the_peak():
    """optim.warmup_steps=0 is no warmup for cosine as for constant and linear (the start-up
    line says "cosine decay"): the first update takes the peak learning rate, the decay is a
    tenth at train.steps. A warmup of one step was forced on it, so the first update's rate was
    0 (a one-step run trained nothing) and the cosine came a step late."""
    cfg = config_lib.load(None, ["optim.schedule=cosine", "optim.warmup_steps=0",
                                 "optim.learning_rate=1.0"]).optim
    lr = optim.make_schedule(cfg, total_steps=100)
    assert {s: float(lr(s)) for s in (0, 50, 100)} == pytest.approx(
        {0: 1.0, 50: 0.55, 100: 0.1}, abs=1e-6)
    assert float(optim.make_schedule(cfg, total_steps=1)(0)) == 1.0
