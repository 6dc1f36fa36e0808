"""mtjax's CPU kernels (mtjax/kernels): the fused attention and the in-place cross-entropy give
the XLA paths' numbers in value and gradient, in the model and the train step too; the build
cache; and the fallback where they cannot run."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from mtjax import config as config_lib
from mtjax import kernels
from mtjax.bench import train as train_bench
from mtjax.kernels import attention as kernel_attention
from mtjax.kernels import cross_entropy as fused_ce
from mtjax.model import attention as attention_lib
from mtjax.model import sizes, t5
from mtjax.model import softmax as softmax_lib
from mtjax.parallel import mesh as mesh_lib
from mtjax.train import setup as setup_lib
from mtjax.train import step as step_lib

READY, WHY_NOT = kernels.cpu_kernel_status()
needs_kernel = pytest.mark.skipif(not READY, reason=f"CPU kernels unavailable: {WHY_NOT}")


def _reference(q, k, v, diagonals, mask):
    bias = attention_lib.AttentionBias(None, mask, position_diagonals=diagonals)
    return attention_lib.softmax_attention(q, k, v, bias.dense(q.shape[1], k.shape[1]))


def _value_and_grads(attend, q, k, v, position, mask, probe):
    def loss(q, k, v, position):
        return jnp.sum(attend(q, k, v, position, mask) * probe)

    argnums = (0, 1, 2) if position is None else (0, 1, 2, 3)
    value, grads = jax.jit(jax.value_and_grad(loss, argnums=argnums))(q, k, v, position)
    return [np.asarray(value), *map(np.asarray, grads)]


@needs_kernel
@pytest.mark.parametrize("b, q_len, s_len, h, d, position, mask", [
    (2, 37, 114, 3, 64, "heads", "batch"),  # row and column tails, T5's 114 targets
    (2, 70, 70, 2, 64, "heads", "causal"),  # more rows than one block, decoder-style mask
    (1, 5, 7, 2, 32, "shared", None),       # position bias broadcast over heads, no mask
    (3, 6, 20, 2, 16, None, "shared"),      # cross-attention: mask only, one for the batch
])
def test_kernel_equals_xla_attention_in_value_and_gradient(b, q_len, s_len, h, d, position,
                                                           mask):
    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.normal(size=(b, q_len, h, d)) * 0.5, jnp.float32)
    k, v = (jnp.asarray(rng.normal(size=(b, s_len, h, d)) * 0.5, jnp.float32) for _ in "kv")
    probe = jnp.asarray(rng.normal(size=(b, q_len, h, d)), jnp.float32)
    position_bias = None  # as diagonals [H, Q + S - 1]
    if position is not None:
        heads = h if position == "heads" else 1
        position_bias = jnp.asarray(rng.normal(size=(heads, q_len + s_len - 1)) * 2, jnp.float32)
    mask_BQS = None
    if mask == "batch":
        mask_BQS = jnp.asarray(rng.random((b, q_len, s_len)) > 0.3)
        mask_BQS = mask_BQS.at[0, 3].set(False)  # a fully masked query row (padding)
    elif mask == "causal":
        causal = np.arange(s_len)[None, :] <= np.arange(q_len)[:, None]
        mask_BQS = jnp.asarray(np.broadcast_to(causal, (b, q_len, s_len)))
    elif mask == "shared":
        mask_BQS = jnp.asarray(rng.random((1, q_len, s_len)) > 0.3)

    got = _value_and_grads(kernel_attention.cpu_attention, q, k, v, position_bias, mask_BQS,
                           probe)
    want = _value_and_grads(_reference, q, k, v, position_bias, mask_BQS, probe)
    y = np.asarray(jax.jit(kernel_attention.cpu_attention)(q, k, v, position_bias, mask_BQS))
    y_want = np.asarray(jax.jit(_reference)(q, k, v, position_bias, mask_BQS))
    np.testing.assert_allclose(y, y_want, atol=2e-6, rtol=0)
    for g, w in zip(got, want, strict=True):
        assert g.shape == w.shape
        np.testing.assert_allclose(g, w, atol=1e-5 * max(1.0, np.abs(w).max()), rtol=0)
    if mask == "batch":  # masked keys get no gradient where their row attends elsewhere
        dk = got[2]
        assert np.isfinite(dk).all()


@needs_kernel
def test_kernel_adds_the_models_mask_bias(monkeypatch):
    """The mask's bias reaches the kernel from ``attention_lib.MASK_BIAS`` (an FFI attribute, not a
    constant of its own): with a small one, masked keys keep some weight, the same in both."""
    monkeypatch.setattr(attention_lib, "MASK_BIAS", -3.0)
    rng = np.random.default_rng(2)
    q, k, v = (jnp.asarray(rng.normal(size=(2, 9, 2, 16)), jnp.float32) for _ in "qkv")
    mask = jnp.asarray(rng.random((2, 9, 9)) > 0.5)
    probe = jnp.asarray(rng.normal(size=q.shape), jnp.float32)
    got = _value_and_grads(kernel_attention.cpu_attention, q, k, v, None, mask, probe)
    want = _value_and_grads(_reference, q, k, v, None, mask, probe)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g, w, atol=1e-5 * max(1.0, np.abs(w).max()), rtol=0)
    monkeypatch.setattr(attention_lib, "MASK_BIAS", -1e10)
    masked_out = _value_and_grads(kernel_attention.cpu_attention, q, k, v, None, mask, probe)
    assert abs(float(got[0]) - float(masked_out[0])) > 1e-3  # -3 is not the usual bias


@needs_kernel
def test_kernel_rejects_other_dtypes():
    x = jnp.zeros((1, 4, 2, 16), jnp.bfloat16)
    with pytest.raises(ValueError, match="float32"):
        kernel_attention.cpu_attention(x, x, x, None, None)


VOCAB = 128
CFG = dataclasses.replace(sizes.get_config("t5_1_1_test"), vocab_size=VOCAB)


def _model_loss_and_grads(cfg, batch):
    enc, dec, enc_seg, dec_seg = batch
    graphdef, params, rest = nnx.split(t5.T5(cfg, rngs=nnx.Rngs(0)), nnx.Param, ...)

    def loss(p):
        logits = nnx.merge(graphdef, p, rest)(enc, dec, enc_seg, dec_seg)
        return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, dec))

    return jax.jit(jax.value_and_grad(loss))(params)


@needs_kernel
@pytest.mark.parametrize("variant", [{}, {"scan_layers": True, "remat": "dots_saveable"}])
def test_model_with_kernel_equals_xla_attention(variant):
    """Packed rows with padding: every attention of the model (encoder, causal decoder, cross)
    through the kernel gives the XLA path's loss and gradients."""
    enc = np.array([[5, 6, 7, 8, 9, 10, 11, 0], [12, 13, 14, 15, 16, 17, 18, 19]], np.int32)
    enc_seg = np.array([[1, 1, 1, 2, 2, 2, 2, 0], [1, 1, 1, 1, 1, 1, 1, 1]], np.int32)
    dec = np.array([[0, 20, 21, 0, 22, 0], [0, 23, 24, 25, 26, 27]], np.int32)
    dec_seg = np.array([[1, 1, 1, 2, 2, 0], [1, 1, 1, 1, 1, 1]], np.int32)
    batch = tuple(map(jnp.asarray, (enc, dec, enc_seg, dec_seg)))
    mesh = mesh_lib.make_mesh(mesh_lib.MeshShape(1, 1, 1), jax.devices()[:1])
    with mesh_lib.activate(mesh, mesh_lib.get_rules("data")):
        got = _model_loss_and_grads(dataclasses.replace(CFG, attention="cpu_fused", **variant),
                                    batch)
        want = _model_loss_and_grads(dataclasses.replace(CFG, attention="xla", **variant),
                                     batch)
    np.testing.assert_allclose(got[0], want[0], atol=1e-6, rtol=0)
    for g, w in zip(jax.tree.leaves(got[1]), jax.tree.leaves(want[1]), strict=True):
        np.testing.assert_allclose(g, w, atol=1e-5, rtol=0)


def test_auto_attention_falls_back_to_xla_where_the_kernel_cannot_run(monkeypatch):
    problem = attention_lib.cpu_fused_attention_problem(jnp.float32)
    assert attention_lib.resolve_attention("auto", jnp.float32) == (
        "xla" if problem else "cpu_fused")
    assert attention_lib.resolve_attention("auto", jnp.bfloat16) == "xla"
    with pytest.raises(ValueError, match="float32 activations.*model.attention=auto"):
        attention_lib.resolve_attention("cpu_fused", jnp.bfloat16)
    monkeypatch.setattr(kernels, "cpu_kernel_status", lambda: (False, "no compiler"))
    assert attention_lib.resolve_attention("auto", jnp.float32) == "xla"
    with pytest.raises(ValueError, match="cannot run: no compiler"):
        attention_lib.resolve_attention("cpu_fused", jnp.float32)


def test_build_is_cached_and_failures_say_why(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MTJAX_KERNEL_CACHE", str(tmp_path))
    for off in ("0", "false", "Off"):  # "false" used to leave the kernels on
        monkeypatch.setenv("MTJAX_CPU_KERNELS", off)
        with pytest.raises(kernels.KernelUnavailable, match=f"MTJAX_CPU_KERNELS={off}"):
            kernels.build()
    monkeypatch.delenv("MTJAX_CPU_KERNELS")
    monkeypatch.setattr(kernels, "cpu_kernel_isa", lambda: ("avx2", ""))
    with pytest.raises(kernels.KernelUnavailable, match=r"no C\+\+ compiler 'no-such-c\+\+'"):
        kernels.build("no-such-c++")
    with pytest.raises(kernels.KernelUnavailable, match="false.*failed"):
        kernels.build("false")  # a "compiler" that fails: nothing is left in the cache
    assert list(tmp_path.iterdir()) == []
    monkeypatch.setenv("MTJAX_KERNEL_CACHE", "/proc/mtjax-kernels")  # not writable, even by root
    with pytest.raises(kernels.KernelUnavailable, match="cannot write the kernel cache.*"
                                                        "MTJAX_KERNEL_CACHE"):
        kernels.build("true")  # any command on PATH: the cache fails before it would run
    monkeypatch.setenv("MTJAX_KERNEL_CACHE", str(tmp_path))
    if not READY:
        pytest.skip(f"no kernel build here: {WHY_NOT}")
    # Left by other versions: builds unused for 30 days and a killed build's partial file go
    # when a new build is made; a recent build and files not named as mtjax names them stay.
    month_ago = time.time() - 31 * 86400
    for name in ("cpu_kernels-avx512-0123456789abcdef.so", "cpu_kernels-avx2-old.so",
                 "cpu_kernels-avx2-x.so1a2b.partial", "someone_elses.so"):
        (tmp_path / name).write_bytes(b"x")
        os.utime(tmp_path / name, (month_ago, month_ago))
    (tmp_path / "cpu_kernels-avx2-recent.so").write_bytes(b"x")
    capsys.readouterr()
    path = kernels.build()
    assert path.parent == tmp_path and path.stat().st_size > 0
    assert f"building its CPU kernels for avx2 into {tmp_path}" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [path.name, path.name + ".sha256", "cpu_kernels-avx2-recent.so",
         "someone_elses.so"])  # no partial file left
    os.utime(path, (month_ago, month_ago))
    built = path.stat().st_ino
    assert kernels.build() == path and path.stat().st_ino == built  # not rebuilt
    assert capsys.readouterr().err == ""  # and silent
    assert path.stat().st_mtime > month_ago + 86400  # but marked as used
    assert os.access(path, os.R_OK) and path.stat().st_mode & 0o777 == 0o755
    # A build cut short (a copy, a disk fault) crashed the process that loaded it (SIGBUS):
    # its digest no longer matches, so it is built again, with a note.
    whole = path.read_bytes()
    path.write_bytes(whole[: len(whole) // 2])
    assert kernels.build() == path and path.read_bytes() == whole
    assert "is damaged; building it again" in capsys.readouterr().err
    # CXX may carry flags or a wrapper; a missing compiler is named as given.
    with pytest.raises(kernels.KernelUnavailable, match=r"no C\+\+ compiler 'nocc -O2'"):
        kernels.build("nocc -O2")
    # A wrapper with its own arguments runs (here `env false`, a compiler that fails at once).
    with pytest.raises(kernels.KernelUnavailable, match=r"^env false -O3 .* failed \(1\)"):
        kernels.build("env false")


def test_kernels_build_for_the_best_instruction_set_the_cpu_has(monkeypatch):
    avx512 = {"avx512f", "avx512bw", "avx512dq", "avx512vl", "avx2", "fma"}
    monkeypatch.setattr(kernels.platform, "machine", lambda: "x86_64")
    monkeypatch.delenv("MTJAX_CPU_KERNEL_ISA", raising=False)
    for flags, isa in ((avx512, "avx512"), ({"avx2", "fma", "sse2"}, "avx2")):
        monkeypatch.setattr(kernels, "_cpu_flags", lambda flags=flags: flags)
        assert kernels.cpu_kernel_isa() == (isa, "")
    monkeypatch.setattr(kernels, "_cpu_flags", lambda: {"avx2", "sse2"})
    isa, why = kernels.cpu_kernel_isa()
    assert isa is None
    assert why == ("the CPU lacks avx512 (no avx512f, avx512bw, avx512dq, avx512vl) "
                   "and avx2 (no fma)")
    monkeypatch.setattr(kernels, "_cpu_flags", lambda: avx512)
    monkeypatch.setenv("MTJAX_CPU_KERNEL_ISA", "avx2")  # asked for: the AVX2 build
    assert kernels.cpu_kernel_isa() == ("avx2", "")
    monkeypatch.setattr(kernels, "_cpu_flags", lambda: {"avx2", "fma"})
    monkeypatch.setenv("MTJAX_CPU_KERNEL_ISA", "avx512")
    assert kernels.cpu_kernel_isa() == (
        None, "the CPU lacks avx512 (no avx512f, avx512bw, avx512dq, avx512vl)")
    monkeypatch.setenv("MTJAX_CPU_KERNEL_ISA", "sse")
    assert kernels.cpu_kernel_isa() == (
        None, "MTJAX_CPU_KERNEL_ISA='sse' is not one of auto, avx512, avx2")
    with pytest.raises(kernels.KernelUnavailable, match="MTJAX_CPU_KERNEL_ISA='sse'"):
        kernels.build()
    monkeypatch.setattr(kernels.platform, "machine", lambda: "aarch64")
    assert kernels.cpu_kernel_isa() == (None, "they need an x86-64 CPU (this is aarch64)")


def _reference_cross_entropy(logits, targets, z_loss):
    loss, z = step_lib.cross_entropy_with_z_loss(logits, targets, z_loss)
    return loss, z, (softmax_lib.first_argmax(logits) == targets).astype(jnp.float32)


@needs_kernel
def test_fused_cross_entropy_equals_xla_in_value_and_gradient():
    rng = np.random.default_rng(1)
    b, length, v = 3, 5, 1003  # V not a multiple of 16
    logits = jnp.asarray(rng.normal(size=(b, length, v)) * 3, jnp.float32)
    logits = logits.at[0, 1, 7].set(40.0).at[0, 1, 9].set(40.0)  # a tie: the first index wins
    targets = jnp.asarray(rng.integers(0, v, (b, length)), jnp.int32)
    targets = targets.at[0, 1].set(7).at[0, 2].set(9).at[1, 2].set(-1)  # -1: outside the vocab
    probes = [jnp.asarray(rng.normal(size=(b, length)), jnp.float32) for _ in range(2)]

    def objective(function):
        def f(x):
            loss, z, _ = function(x, targets, 1e-2)
            return jnp.sum(loss * probes[0] + z * probes[1])
        return jax.jit(jax.value_and_grad(f))(logits)

    got = jax.jit(fused_ce.cross_entropy_with_z_loss, static_argnums=2)(logits, targets, 1e-2)
    want = jax.jit(_reference_cross_entropy, static_argnums=2)(logits, targets, 1e-2)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-6, atol=1e-6)
    assert float(got[2][0, 1]) == 1.0 and float(got[2][0, 2]) == 0.0
    (value, grad), (value_want, grad_want) = objective(fused_ce.cross_entropy_with_z_loss), \
        objective(_reference_cross_entropy)
    np.testing.assert_allclose(value, value_want, rtol=1e-6)
    np.testing.assert_allclose(grad, grad_want, atol=1e-6, rtol=0)
    # A NaN logit: NaN loss (the step's non-finite check sees it), never a correct token.
    loss, _, correct = fused_ce.cross_entropy_with_z_loss(logits.at[2, 3, 5].set(jnp.nan),
                                                          targets, 1e-2)
    assert np.isnan(loss[2, 3]) and np.isfinite(np.delete(np.asarray(loss[2]), 3)).all()
    assert float(correct[2, 3]) == 0.0


@needs_kernel
def test_train_step_with_fused_kernels_equals_xla():
    """Two AdamW steps of a tiny model (the first at learning rate 0): the second step's loss,
    accuracy, gradient norm and parameter norm agree whichever attention and loss the step
    uses. (Parameters are not compared elementwise: Adam's m / sqrt(v) turns float32 noise in
    near-zero gradients into updates of full size.)"""
    results = []
    for kind in ("xla", "cpu_fused"):
        config = config_lib.load(None, [
            "model.name=t5_1_1_test", "train.batch_size=2", "data.inputs_length=24",
            "data.targets_length=8", "optim.name=adamw", f"model.attention={kind}",
            f"train.cross_entropy={kind}"])
        mesh = mesh_lib.make_mesh(mesh_lib.MeshShape(1, 1, 1), jax.devices()[:1])
        setup = setup_lib.build(config, vocab_size=VOCAB, num_tasks=1, total_steps=4,
                                mesh=mesh, rules=mesh_lib.get_rules("data"))
        batch = {k: jnp.asarray(x) for k, x in
                 train_bench.synthetic_batch(2, 24, 8, VOCAB).items()}
        state, metrics = setup.step(setup.init_state(0), batch)
        state, metrics = setup.step(state, batch)  # the first step's learning rate is 0
        results.append(jax.device_get(metrics))
    metrics_xla, metrics_fused = results
    assert float(metrics_xla["learning_rate"]) > 0
    for name in ("loss_sum", "z_loss_sum", "correct_sum", "grad_norm", "param_norm"):
        np.testing.assert_allclose(metrics_fused[name], metrics_xla[name], rtol=1e-5,
                                   err_msg=name)


def test_auto_cross_entropy_falls_back_to_xla_where_the_kernel_cannot_run(monkeypatch):
    ready = READY
    assert step_lib.resolve_cross_entropy("auto") == ("cpu_fused" if ready else "xla")
    assert step_lib.resolve_cross_entropy("xla") == "xla"
    monkeypatch.setattr(kernels, "cpu_kernel_status", lambda: (False, "no compiler"))
    assert step_lib.resolve_cross_entropy("auto") == "xla"
    with pytest.raises(ValueError, match="cannot run: no compiler.*train.cross_entropy=auto"):
        step_lib.resolve_cross_entropy("cpu_fused")


AVX2_CHECKS = "kernel_equals_xla_attention or mask_bias or fused_cross_entropy_equals"


@needs_kernel
def test_avx2_build_gives_the_same_numbers(tmp_path):
    """The AVX2 build (what machines without AVX-512 get) passes the kernels' equality tests
    here too, in a process that asks for it; its library holds no AVX-512 instruction."""
    if kernels.cpu_kernel_isa()[0] == "avx2":
        pytest.skip("the kernels above already ran the AVX2 build")
    if not {"avx2", "fma"} <= (kernels._cpu_flags() or set()):
        pytest.skip("the CPU lacks AVX2 or FMA")
    env = dict(os.environ, MTJAX_CPU_KERNEL_ISA="avx2", MTJAX_KERNEL_CACHE=str(tmp_path))
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-n", "0", "-p", "no:cacheprovider", __file__, "-k",
         AVX2_CHECKS], env=env, capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    passed = re.search(r"\b(\d+) passed\b", result.stdout)
    # 4 kernel cases, 2 model variants, the mask bias, the loss; none skipped.
    assert passed and int(passed.group(1)) >= 8 and "skipped" not in result.stdout, \
        result.stdout[-2000:]
    (library,) = tmp_path.glob("*.so")
    assert library.name.startswith("cpu_kernels-avx2-")
    if shutil.which("objdump"):
        disassembly = subprocess.run(["objdump", "-d", str(library)], capture_output=True,
                                     text=True, check=True).stdout
        assert "ymm" in disassembly and "zmm" not in disassembly


def test_setup_says_once_why_the_cpu_kernels_are_missing(monkeypatch, capsys):
    if jax.default_backend() != "cpu" or jax.device_count() != 1:
        pytest.skip("the notice is for one CPU device")
    config = config_lib.load(None, ["model.name=t5_1_1_test", "train.batch_size=2",
                                    "data.inputs_length=24", "data.targets_length=8"])

    def build(config=config):
        mesh = mesh_lib.make_mesh(mesh_lib.MeshShape(1, 1, 1), jax.devices()[:1])
        setup = setup_lib.build(config, vocab_size=VOCAB, num_tasks=1, total_steps=4,
                                mesh=mesh, rules=mesh_lib.get_rules("data"))
        build.attention_kernel = setup.attention_kernel
        return capsys.readouterr().err

    setup_lib._say_why_no_cpu_kernels.cache_clear()
    monkeypatch.setattr(kernels, "cpu_kernel_status", lambda: (False, "no C++ compiler 'c++'"))
    assert build() == ("mtjax: the step runs XLA's attention and loss: mtjax's faster CPU "
                       "kernels are unavailable here (no C++ compiler 'c++')\n")
    assert build() == ""  # once per process
    setup_lib._say_why_no_cpu_kernels.cache_clear()
    monkeypatch.setattr(kernels, "cpu_kernel_status",
                        lambda: (False, "switched off by MTJAX_CPU_KERNELS=0"))
    assert build() == ""  # off on purpose: nothing to say
    setup_lib._say_why_no_cpu_kernels.cache_clear()
    monkeypatch.setattr(kernels, "cpu_kernel_status", lambda: (False, "no C++ compiler 'c++'"))
    # The loss set to XLA: the attention's kernel is still missed, and said so.
    assert build(dataclasses.replace(config, train=dataclasses.replace(
        config.train, cross_entropy="xla"))) == (
        "mtjax: the step runs XLA's attention: mtjax's faster CPU kernels are unavailable "
        "here (no C++ compiler 'c++')\n")
    setup_lib._say_why_no_cpu_kernels.cache_clear()


def test_dropout_trains_with_xla_attention_and_says_so():
    """Neither fused kernel has dropout on the attention probabilities: with dropout the
    train step takes XLA's attention, the setup records that (bench reported cpu_fused), and
    naming a kernel is refused in one line."""
    if kernels.cpu_kernel_problem():
        pytest.skip(f"no kernel build here: {kernels.cpu_kernel_problem()}")
    base = ["model.name=t5_1_1_test", "train.batch_size=2", "data.inputs_length=24",
            "data.targets_length=8", "model.dropout_rate=0.1"]
    mesh = mesh_lib.make_mesh(mesh_lib.MeshShape(1, 1, 1), jax.devices()[:1])

    def build(*extra):
        return setup_lib.build(config_lib.load(None, base + list(extra)), vocab_size=VOCAB,
                               num_tasks=1, total_steps=4, mesh=mesh,
                               rules=mesh_lib.get_rules("data"))

    assert build().attention_kernel == "xla"
    with pytest.raises(config_lib.ConfigError, match="model.attention=cpu_fused cannot train "
                                                     "with model.dropout_rate=0.1"):
        build("model.attention=cpu_fused")


SHARDED_ATTENTION = """
import json
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
from mtjax.kernels import attention as kernel_attention
from mtjax.kernels import cross_entropy as fused_ce
from mtjax.model import attention as attention_lib
from mtjax.model import softmax as softmax_lib
from mtjax.parallel import mesh as mesh_lib
from mtjax.train import step as step_lib

rng = np.random.default_rng(0)
b, q_len, s_len, h, d = 4, 24, 40, 4, 16
q = jnp.asarray(rng.normal(size=(b, q_len, h, d)) * 0.5, jnp.float32)
k, v = (jnp.asarray(rng.normal(size=(b, s_len, h, d)) * 0.5, jnp.float32) for _ in "kv")
diagonals = jnp.asarray(rng.normal(size=(h, q_len + s_len - 1)), jnp.float32)
mask = jnp.asarray(rng.random((b, q_len, s_len)) > 0.3)
probe = jnp.asarray(rng.normal(size=q.shape), jnp.float32)

def reference(q, k, v, diagonals):
    bias = attention_lib.AttentionBias(None, mask, position_diagonals=diagonals)
    return attention_lib.softmax_attention(q, k, v, bias.dense(q_len, s_len))

def kernel(q, k, v, diagonals):
    return kernel_attention.cpu_attention(q, k, v, diagonals, mask)

def value_and_grads(attend):
    loss = lambda *a: jnp.sum(attend(*a) * probe)
    f = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3)))
    return f, [np.asarray(x) for x in jax.tree.leaves(f(q, k, v, diagonals))]

out = {"auto": attention_lib.resolve_attention("auto", jnp.float32),
       "loss_auto": step_lib.resolve_cross_entropy("auto")}
mesh = mesh_lib.make_mesh(mesh_lib.MeshShape(2, 2, 2), jax.devices())
with mesh_lib.activate(mesh, mesh_lib.get_rules("fsdp_tensor")):
    f, got = value_and_grads(kernel)
    _, want = value_and_grads(reference)
    out["custom_call_in_hlo"] = "mtjax_attention_cpu_forward" in f.lower(
        q, k, v, diagonals).as_text()
out["max_error"] = [float(np.abs(g - w).max()) for g, w in zip(got, want)]
out["scale"] = [float(np.abs(w).max()) for w in want]

# The loss kernel: each device its own tokens, where the rules keep the vocabulary whole.
logits = jnp.asarray(rng.normal(size=(8, 6, 301)) * 3, jnp.float32)
targets = jnp.asarray(rng.integers(0, 301, (8, 6)), jnp.int32)
probes = [jnp.asarray(rng.normal(size=(8, 6)), jnp.float32) for _ in range(2)]

def loss_value_and_grad(function):
    def f(x):
        loss, z, correct = function(x, targets, 1e-2)
        return jnp.sum(loss * probes[0] + z * probes[1]), correct
    f = jax.jit(jax.value_and_grad(f, has_aux=True))
    (value, correct), grad = f(logits)
    return f, [np.asarray(x) for x in (value, correct, grad)]

def reference_loss(x, targets, z_loss):
    loss, z = step_lib.cross_entropy_with_z_loss(x, targets, z_loss)
    return loss, z, (softmax_lib.first_argmax(x) == targets).astype(jnp.float32)

with mesh_lib.activate(mesh, mesh_lib.get_rules("fsdp")):
    out["loss_auto_fsdp"] = step_lib.resolve_cross_entropy("auto")
    out["loss_fused_fsdp"] = step_lib.resolve_cross_entropy("cpu_fused")
    logits = jax.device_put(logits, NamedSharding(mesh, P(("data", "fsdp"))))
    f, got = loss_value_and_grad(fused_ce.cross_entropy_with_z_loss)
    _, want = loss_value_and_grad(reference_loss)
    out["loss_custom_call_in_hlo"] = "mtjax_cross_entropy_cpu_forward" in f.lower(
        logits).as_text()
out["loss_max_error"] = [float(np.abs(g - w).max()) for g, w in zip(got, want)]
with mesh_lib.activate(mesh, mesh_lib.get_rules("fsdp_tensor")):
    out["loss_auto_fsdp_tensor"] = step_lib.resolve_cross_entropy("auto")
    try:
        step_lib.resolve_cross_entropy("cpu_fused")
    except ValueError as e:
        out["loss_refusal"] = str(e)
print("RESULT" + json.dumps(out))
"""


@needs_kernel
def test_kernels_run_split_over_a_mesh(subprocess_python):
    """On a mesh of 8 CPU devices (data, fsdp and tensor axes), each device runs the kernels on
    its own part: attention on its batch rows and heads, the loss on its tokens. The same
    values and gradients as XLA's attention and loss there, the position bias's gradient summed
    over the batch shards. The loss kernel needs whole rows of logits: where the rules split the
    vocabulary (fsdp_tensor), auto takes XLA's loss and cpu_fused says why; with several
    devices in one process auto takes XLA's loss anyway (measured no faster there)."""
    out = json.loads(subprocess_python(SHARDED_ATTENTION, devices=8).stdout.split("RESULT")[1])
    assert out["auto"] == "cpu_fused" and out["loss_auto"] == "cpu_fused"  # no mesh in force
    assert out["custom_call_in_hlo"]
    for error, scale in zip(out["max_error"], out["scale"], strict=True):
        assert error <= 1e-5 * max(1.0, scale)
    # 8 devices in one process share its cores: auto leaves the loss kernel to cpu_fused.
    assert out["loss_auto_fsdp"] == "xla" and out["loss_fused_fsdp"] == "cpu_fused"
    assert out["loss_custom_call_in_hlo"]
    assert out["loss_max_error"][0] <= 1e-4  # a sum over 48 tokens
    assert out["loss_max_error"][1] == 0.0  # the same first argmax everywhere
    assert out["loss_max_error"][2] <= 1e-6
    assert out["loss_auto_fsdp_tensor"] == "xla"
    assert out["loss_refusal"] == (
        "train.cross_entropy=cpu_fused cannot run: it needs whole rows of logits, and the mesh "
        "rules split the vocabulary over tensor (2 devices); use train.cross_entropy=auto or "
        "xla")


def test_build_is_shared_by_environments_with_the_same_headers(tmp_path):
    """The cache key holds the jaxlib headers' contents, not where a venv keeps them."""
    import shutil

    import jax.ffi

    from mtjax import kernels

    copy = tmp_path / "other_venv_include"
    shutil.copytree(jax.ffi.include_dir(), copy)
    args = ("c++", ("-O3",), "avx2")
    same = kernels._library_path(*args, jax.ffi.include_dir())
    assert kernels._library_path(*args, str(copy)) == same
    header = next(copy.rglob("ffi.h"))
    header.write_text(header.read_text() + "\n// changed\n")
    assert kernels._library_path(*args, str(copy)) != same


def test_a_compiler_that_does_not_run_is_named(tmp_path, monkeypatch):
    """A CXX on PATH that cannot start (a wrapper script whose interpreter is gone) came out as
    an OSError from the build, and the notice then said 'cannot load the built kernel ...;
    remove <the cache> to rebuild it', which cannot help."""
    compiler = tmp_path / "broken-c++"
    compiler.write_text("#!/no/such/interpreter\n")
    compiler.chmod(0o755)
    monkeypatch.setenv("MTJAX_KERNEL_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("MTJAX_CPU_KERNELS", raising=False)
    monkeypatch.setattr(kernels, "cpu_kernel_isa", lambda: ("avx2", ""))
    with pytest.raises(kernels.KernelUnavailable,
                       match=rf"the C\+\+ compiler '{re.escape(str(compiler))}' does not run "
                             r"\(.*\); set CXX to one that does"):
        kernels.build(str(compiler))
    assert [p.name for p in (tmp_path / "cache").iterdir()] == []  # no partial file left


@needs_kernel
def test_a_nan_score_makes_its_attention_row_nan_as_in_xla():
    """A NaN in one key (its value finite) got probability 0 in the kernel: its exp treated NaN
    as a very negative score, so the output stayed finite where XLA's is NaN, and a run that
    had gone non-finite went on without the loss showing it."""
    rng = np.random.default_rng(3)
    q = jnp.asarray(rng.normal(size=(2, 5, 2, 16)), jnp.float32)
    k, v = (jnp.asarray(rng.normal(size=(2, 40, 2, 16)), jnp.float32) for _ in "kv")
    # Batch row 0, head 1, key 3: in the first of the row's three vectors of scores, so the
    # row maximum (max_ps of NaN and a later vector) does not carry the NaN on its own.
    k = k.at[0, 3, 1, 7].set(jnp.nan)
    position = jnp.zeros((2, 5 + 40 - 1), jnp.float32)
    got = np.asarray(jax.jit(kernel_attention.cpu_attention)(q, k, v, position, None))
    want = np.asarray(jax.jit(_reference)(q, k, v, position, None))
    assert np.isnan(want[0, :, 1]).all() and np.isfinite(np.delete(want, 1, axis=2)).all()
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
    np.testing.assert_allclose(np.nan_to_num(got), np.nan_to_num(want), atol=2e-6, rtol=0)


def _an_avx512_machine_building_with(compiler, tmp_path, monkeypatch):
    """``compiler`` (a script) builds the kernels, into a cache of ``tmp_path``, for a CPU with
    both AVX-512 and AVX2, the instruction set left to mtjax."""
    compiler.chmod(0o755)
    monkeypatch.setenv("MTJAX_KERNEL_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("MTJAX_CPU_KERNELS", raising=False)
    monkeypatch.delenv("MTJAX_CPU_KERNEL_ISA", raising=False)
    monkeypatch.setattr(kernels, "_cpu_flags", lambda: {*kernels.ISAS["avx512"][0],
                                                        *kernels.ISAS["avx2"][0]})
    monkeypatch.setattr(kernels.platform, "machine", lambda: "x86_64")


def test_a_compiler_without_avx512_support_gets_the_avx2_build(tmp_path, monkeypatch, capsys):
    """GCC before 11 has no -march=x86-64-v4: on an AVX-512 CPU the kernels were lost (the XLA
    path ran) although the AVX2 build compiles there. The refusal is kept in the cache, so
    later starts go to the AVX2 build without trying again."""
    calls = tmp_path / "calls"
    compiler = tmp_path / "old-g++"
    compiler.write_text(textwrap.dedent(f"""\
        #!/bin/sh
        echo "$*" >> {calls}
        case "$*" in *x86-64-v4*)
            echo "cc1plus: error: bad value ('x86-64-v4') for '-march=' switch" >&2; exit 1;;
        esac
        while [ "$1" != "-o" ]; do shift; done
        echo built > "$2"
        """))
    _an_avx512_machine_building_with(compiler, tmp_path, monkeypatch)
    first = kernels.build(str(compiler))
    err = capsys.readouterr().err
    assert first.name.startswith("cpu_kernels-avx2-") and first.read_text() == "built\n"
    assert (f"mtjax: {compiler} cannot build the AVX-512 kernels (cc1plus: error: bad value "
            f"('x86-64-v4') for '-march=' switch); building the AVX2 ones instead") in err, err
    assert kernels.build(str(compiler)) == first
    assert capsys.readouterr().err == ""
    tried = calls.read_text().splitlines()
    assert ["x86-64-v4" in line for line in tried] == [True, False], tried
    # Asked for by name, AVX-512 is not replaced: the compiler's error is the answer.
    monkeypatch.setenv("MTJAX_CPU_KERNEL_ISA", "avx512")
    with pytest.raises(kernels.KernelUnavailable, match=r"bad value \('x86-64-v4'\)"):
        kernels.build(str(compiler))


def test_a_failed_avx512_build_for_another_reason_is_tried_again(tmp_path, monkeypatch, capsys):
    """Any failed AVX-512 compile (here the compiler killed for memory, once) was kept as the
    compiler's refusal of x86-64-v4: every later start took the AVX2 build without trying
    again, for the 30 days until the refusal was pruned."""
    calls, killed = tmp_path / "calls", tmp_path / "killed"
    compiler = tmp_path / "g++"
    compiler.write_text(textwrap.dedent(f"""\
        #!/bin/sh
        echo "$*" >> {calls}
        if [ ! -e {killed} ]; then
            touch {killed}
            echo "g++: fatal error: Killed signal terminated program cc1plus" >&2; exit 1
        fi
        while [ "$1" != "-o" ]; do shift; done
        echo built > "$2"
        """))
    _an_avx512_machine_building_with(compiler, tmp_path, monkeypatch)
    assert kernels.build(str(compiler)).name.startswith("cpu_kernels-avx2-")
    assert "Killed signal" in capsys.readouterr().err
    assert kernels.build(str(compiler)).name.startswith("cpu_kernels-avx512-")
    tried = calls.read_text().splitlines()
    assert ["x86-64-v4" in line for line in tried] == [True, False, True], tried
