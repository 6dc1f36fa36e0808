"""Tests of the T5 model layer: shapes, masks, packing, causality, sharding names, counts."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mtjax.model import sizes
from mtjax.model import t5 as t5_lib
from mtjax.model.position_bias import relative_position_bucket
from mtjax.model.t5 import FEATURE_CONVERTER, T5
from mtjax.parallel import mesh as mesh_lib

VOCAB = 64
# Dropout only acts with deterministic=False, so one model serves the dropout test and the rest.
CFG = dataclasses.replace(sizes.get_config("t5_1_1_test"), vocab_size=VOCAB, dropout_rate=0.1)


def activate(preset: str = "fsdp_tensor"):
    """A one-device mesh with the given rules, as the trainer makes it."""
    return mesh_lib.activate(mesh_lib.make_mesh(mesh_lib.MeshShape()), mesh_lib.get_rules(preset))


def make_model(cfg: sizes.T5Config = CFG, seed: int = 0) -> T5:
    with activate():
        return T5(cfg, rngs=nnx.Rngs(seed))


@functools.partial(nnx.jit, static_argnames=("deterministic",))
def forward(model, enc, dec, enc_seg=None, dec_seg=None, *, deterministic=True, rngs=None):
    return model(enc, dec, enc_seg, dec_seg, deterministic=deterministic, rngs=rngs)


def run(model, *args, **kwargs):
    with activate():
        return np.asarray(forward(model, *args, **kwargs))


def token_losses(logits_BTV, targets_BT):
    """Per-token cross-entropy [B, T]."""
    logits = jnp.asarray(logits_BTV)
    gold = jnp.take_along_axis(logits, jnp.asarray(targets_BT)[..., None], axis=-1)[..., 0]
    return np.asarray(jax.nn.logsumexp(logits, axis=-1) - gold)


@pytest.fixture(scope="module")
def model():
    return make_model()


def i32(rows):
    return jnp.asarray(rows, jnp.int32)


# Most forward calls share the shapes [2, 7] -> [2, 6] so that they share one compilation.
ENC = i32([[3, 4, 5, 0, 0, 0, 0], [6, 7, 0, 0, 0, 0, 0]])
DEC = i32([[0, 11, 12, 0, 0, 0], [0, 14, 0, 0, 0, 0]])
TARGETS = [[11, 12, 13, 0, 0, 0], [14, 15, 0, 0, 0, 0]]


def test_shapes_and_float32_logits(model):
    logits = run(model, ENC, DEC)
    assert logits.shape == (2, 6, VOCAB)
    assert logits.dtype == np.float32
    assert np.isfinite(logits).all()
    with activate():
        encoded = nnx.jit(lambda m, e: m.encode(e))(model, ENC)
    assert encoded.shape == (2, 7, CFG.d_model)
    assert T5.FEATURE_CONVERTER == FEATURE_CONVERTER == "EncDecFeatureConverter"


def test_padding_does_not_change_real_positions(model):
    short = run(model, ENC[:, :3], DEC[:, :3])
    padded = run(model, ENC, DEC)
    np.testing.assert_allclose(padded[0, :3], short[0], atol=1e-5)
    np.testing.assert_allclose(padded[1, :2], short[1, :2], atol=1e-5)


def test_packed_row_equals_examples_alone(model):
    # The two rows of ENC/DEC/TARGETS packed into one row: segments 1 and 2, then padding.
    enc = i32([[3, 4, 5, 6, 7, 0, 0]])
    enc_seg = i32([[1, 1, 1, 2, 2, 0, 0]])
    dec = i32([[0, 11, 12, 0, 14, 0]])
    dec_seg = i32([[1, 1, 1, 2, 2, 0]])
    targets = [[11, 12, 13, 14, 15, 0]]
    packed = token_losses(run(model, enc, dec, enc_seg, dec_seg), targets)[0]
    alone = token_losses(run(model, ENC, DEC), TARGETS)
    np.testing.assert_allclose(packed[:3], alone[0, :3], atol=1e-5)
    np.testing.assert_allclose(packed[3:5], alone[1, :2], atol=1e-5)


def test_decoder_is_causal(model):
    changed = DEC.at[:, 3:].set(30)
    a, b = run(model, ENC, DEC), run(model, ENC, changed)
    np.testing.assert_allclose(a[:, :3], b[:, :3], atol=1e-6)
    assert not np.allclose(a[:, 3:], b[:, 3:])


def test_every_param_has_logical_names_and_shards_under_fsdp_tensor():
    with activate("fsdp_tensor"):
        abstract = nnx.eval_shape(lambda: T5(CFG, rngs=nnx.Rngs(0)))
        state = nnx.state(abstract, nnx.Param)
        specs = nnx.get_partition_spec(state)
    leaves = nnx.to_flat_state(state)
    assert len(leaves) > 0
    for path, var in leaves:
        names = var.get_metadata().get("out_sharding")
        assert names is not None and len(names) == len(var.shape), path
        assert set(names) <= set(mesh_lib.LOGICAL_AXES), (path, names)
    for path, spec_var in nnx.to_flat_state(specs):
        spec = spec_var.get_value()
        mesh_axes = {a for entry in spec if entry for a in np.atleast_1d(entry)}
        assert mesh_axes and mesh_axes <= set(mesh_lib.MESH_AXES), (path, spec)


def test_count_params_matches_instantiated_model(model):
    real = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    assert sizes.count_params(CFG) == real
    tiny = sizes.get_config("t5_1_1_tiny")
    with activate():
        abstract = nnx.eval_shape(lambda: T5(tiny, rngs=nnx.Rngs(0)))
    real_tiny = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(abstract, nnx.Param)))
    assert sizes.count_params(tiny) == real_tiny
    assert 1e6 < real_tiny < 30e6


# Published counts: the T5 (Hugging Face's exact counts for 1.0), mT5 and ByT5 papers.
@pytest.mark.parametrize("name, published", [
    ("t5_1_1_base", 247.6e6), ("t5_1_1_large", 783e6), ("t5_1_0_base", 222.9e6),
    ("t5_1_0_small", 60.5e6), ("t5_1_0_large", 737.7e6), ("t5_1_0_3b", 2.85e9),
    ("t5_1_0_11b", 11.3e9), ("t5_1_1_xl", 2.85e9), ("t5_1_1_xxl", 11.1e9),
    ("mt5_small", 300e6), ("mt5_base", 582e6), ("mt5_large", 1.23e9), ("mt5_xl", 3.74e9),
    ("mt5_xxl", 12.9e9), ("byt5_small", 300e6), ("byt5_base", 582e6), ("byt5_large", 1.23e9),
    ("byt5_xl", 3.74e9), ("byt5_xxl", 12.9e9),
])
def test_published_param_counts(name, published):
    assert abs(sizes.count_params(sizes.get_config(name)) - published) / published < 0.01


def test_every_published_size_is_present():
    for variant, names in [("t5_1_0", "small base large 3b 11b"),
                           ("t5_1_1", "small base large xl xxl"),
                           ("mt5", "small base large xl xxl"), ("byt5", "small base large xl xxl")]:
        for size in names.split():
            assert f"{variant}_{size}" in sizes.MODEL_SIZES
    byt5 = sizes.get_config("byt5_small")
    assert byt5.num_encoder_layers == 3 * byt5.num_decoder_layers


def test_unknown_model_names_closest():
    with pytest.raises(sizes.UnknownModelError, match="t5_1_1_base") as info:
        sizes.get_config("t5_1_1_bsae")
    assert isinstance(info.value, KeyError)
    # In capitals the name was too far from every size to be suggested (t5_1_1_xl came first).
    with pytest.raises(sizes.UnknownModelError, match=r"did you mean t5_1_1_test\?$"):
        sizes.get_config("T5_1_1_TEST")


def test_train_flops_formula():
    cfg = sizes.get_config("t5_1_1_base")
    flops = sizes.train_flops_per_step(cfg, batch_size=8, inputs_length=512, targets_length=128)
    # Rule of thumb: 6 * (non-embedding params) * tokens, plus attention; same order of magnitude.
    dense_params = sizes.count_params(cfg) - cfg.vocab_size * cfg.d_model
    rough = 6 * dense_params * 8 * (512 + 128) / 2
    assert 0.5 * rough < flops < 3 * rough
    assert sizes.train_flops_per_step(cfg, 16, 512, 128) == 2 * flops


@pytest.mark.parametrize("relative, bidirectional, expected", [
    (0, True, 0), (-1, True, 1), (1, True, 17), (-8, True, 8), (-20, True, 10), (20, True, 26),
    (-200, True, 15), (128, True, 31),
    (5, False, 0), (-3, False, 3), (-16, False, 16), (-40, False, 23), (-127, False, 31),
    (-1000, False, 31),
])
def test_relative_position_bucket(relative, bidirectional, expected):
    # Hand computed from HF T5Attention._relative_position_bucket, 32 buckets, max distance 128:
    # e.g. bidirectional -20: 16 buckets per side, max_exact 8, 8 + int(log(20/8)/log(16)*8) = 10.
    got = relative_position_bucket(jnp.asarray([relative]), bidirectional=bidirectional)
    assert int(got[0]) == expected


def test_dropout_deterministic_and_reproducible(model):
    assert CFG.dropout_rate == 0.1
    det1, det2 = run(model, ENC, DEC), run(model, ENC, DEC)
    np.testing.assert_array_equal(det1, det2)
    # An rbg key: threefry dropout masks take ~20 s to compile on 2 CPU cores, rbg ~4 s.
    key = jax.random.key(1, impl="unsafe_rbg")
    drop1 = run(model, ENC, DEC, deterministic=False, rngs=nnx.Rngs(dropout=key))
    drop2 = run(model, ENC, DEC, deterministic=False, rngs=nnx.Rngs(dropout=key))
    np.testing.assert_array_equal(drop1, drop2)
    assert not np.allclose(drop1, det1)


def test_tied_embeddings_variant():
    cfg = dataclasses.replace(CFG, tie_embeddings=True, mlp_activation="relu")
    m = make_model(cfg)
    state = nnx.state(m, nnx.Param)
    assert "lm_head" not in state
    assert sizes.count_params(cfg) == sum(x.size for x in jax.tree.leaves(state))
    logits = run(m, i32([[3, 4, 0]]), i32([[0, 8]]))
    assert logits.shape == (1, 2, VOCAB) and np.isfinite(logits).all()


def test_per_layer_bias_variant_counts():
    cfg = dataclasses.replace(CFG, per_layer_relative_bias=True)
    with activate():
        abstract = nnx.eval_shape(lambda: T5(cfg, rngs=nnx.Rngs(0)))
    state = nnx.state(abstract, nnx.Param)
    assert "relpos_bias" in state["encoder"]["layers"][0]
    assert "relpos_bias" not in state["encoder"]
    assert sizes.count_params(cfg) == sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state))


@pytest.mark.parametrize("variant", [{}, {"tie_embeddings": True, "mlp_activation": "relu"},
                                     {"per_layer_relative_bias": True, "num_decoder_layers": 3}])
def test_layers_initialised_by_scan_equal_a_loop(monkeypatch, variant):
    # make_layers compiles one layer's initialisers instead of every layer's; the values, and
    # where the key stream stands afterwards (lm_head comes last), must not change.
    cfg = dataclasses.replace(CFG, **variant)

    def init():
        return nnx.to_pure_dict(nnx.state(T5(cfg, rngs=nnx.Rngs(3)), nnx.Param))

    with activate():
        scanned = jax.jit(init)()
        eager = init()  # built outside jit, make_layers loops (a scan would compile each time)
        monkeypatch.setattr(t5_lib, "make_layers",
                            lambda make, n, rngs: nnx.List([make(rngs) for _ in range(n)]))
        looped = jax.jit(init)()
    assert jax.tree.structure(scanned) == jax.tree.structure(looped)
    for a, b, c in zip(jax.tree.leaves(scanned), jax.tree.leaves(looped),
                       jax.tree.leaves(eager), strict=True):
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(a, c)
    # Different layers got different draws (the counter moved between them).
    layers = scanned["encoder"]["layers"]
    assert not np.array_equal(layers[0]["mlp"]["wo"]["kernel"], layers[1]["mlp"]["wo"]["kernel"])


def test_remat_gives_same_loss_and_grads():
    enc, dec, targets = i32([[3, 4, 5, 6]]), i32([[0, 8, 9]]), i32([[8, 9, 10]])

    @nnx.jit
    def loss_and_grad(m):
        def loss(m):
            logits = m(enc, dec)
            gold = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
            return jnp.mean(jax.nn.logsumexp(logits, axis=-1) - gold)

        return nnx.value_and_grad(loss)(m)

    results = []
    small = dataclasses.replace(CFG, num_encoder_layers=1, num_decoder_layers=1)
    for remat in ("none", "full"):
        m = make_model(dataclasses.replace(small, remat=remat))
        with activate():
            value, grads = loss_and_grad(m)
        results.append((float(value), jax.tree.leaves(nnx.state(grads))))
    assert results[0][0] == pytest.approx(results[1][0], abs=1e-6)
    for a, b in zip(results[0][1], results[1][1], strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5)


def test_bfloat16_activations_give_float32_logits():
    m = make_model(dataclasses.replace(CFG, dtype="bfloat16"))
    logits = run(m, i32([[3, 4, 5]]), i32([[0, 8]]))
    assert logits.dtype == np.float32 and np.isfinite(logits).all()


def test_config_validation():
    with pytest.raises(ValueError, match="mlp_activation"):
        dataclasses.replace(CFG, mlp_activation="swish")
    with pytest.raises(ValueError, match="attention"):
        dataclasses.replace(CFG, attention="flash")
