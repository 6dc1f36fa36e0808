"""mtjax bench: the smoke run's JSON, the FLOP formula against counted matmuls, the peak table."""

from __future__ import annotations

import dataclasses
import gzip
import json
import math
import mmap
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mtjax import bench, kernels
from mtjax.bench import peak as peak_lib
from mtjax.bench import report
from mtjax.bench import train as train_bench
from mtjax.model import sizes, t5
from mtjax.parallel import mesh as mesh_lib


def _positive(value) -> bool:
    return isinstance(value, int | float) and math.isfinite(value) and value > 0


def test_smoke_train_prints_complete_json(capsys, tmp_path):
    out, profile = tmp_path / "bench.json", tmp_path / "made" / "profile"
    assert bench.main(["train", "--smoke", "--output", str(out), "--profile", str(profile),
                       "log.profile_steps=2"]) == 0
    result = json.loads(capsys.readouterr().out)
    # --profile: 2 steps after the timed ones, each a step in the trace.
    assert result["profile_dir"] == str(profile)
    (trace,) = profile.glob("plugins/profile/*/perfetto_trace.json.gz")
    events = json.loads(gzip.decompress(trace.read_bytes()))["traceEvents"]
    assert [e["args"]["step_num"] for e in events if e.get("name") == "train"] == ["1", "2"]
    assert json.loads(out.read_text()) == result
    for key in ("compile_s", "lower_s", "step_s_median", "tokens_per_s", "model_flops_per_step",
                "achieved_flops_per_s", "peak_flops_per_s", "mfu", "host_peak_memory_bytes",
                "num_params", "loss"):
        assert _positive(result[key]), (key, result[key])
    assert result["steps"] == bench.SMOKE_STEPS
    step = result["step_s"]
    assert 0 < step["min"] <= step["median"] <= step["max"]
    assert result["tokens_per_step"] == 2 * (32 + 16)
    assert (result["mesh"], result["mesh_rules"]) == ({"data": 1, "fsdp": 1, "tensor": 1},
                                                      result["config"]["mesh"]["rules"])
    assert result["peak_source"] == "measured_matmul"  # CPU in tests
    assert "device_peak_memory_bytes" in result  # None on CPU
    kernel = result["host_kernel_per_step"]
    assert kernel["page_faults"] >= 0 and kernel["kernel_cpu_s"] >= 0
    assert set(result["environment"]["versions"]) >= {"jax", "jaxlib", "flax", "optax"}
    assert result["environment"]["device_kind"]
    # What was in force for the allocator and XLA, so a figure can be reproduced.
    assert {"xla_flags", "glibc_tunables", "transparent_hugepage"} <= set(result["environment"])
    assert result["config"]["model"]["name"] == "t5_1_1_test"
    assert result["config"]["optim"]["name"] == "adamw"
    # The implementations the step ran: the CPU kernels where they build, else XLA's.
    ready = kernels.cpu_kernel_status()[0]
    assert result["attention_kernel"] == ("cpu_fused" if ready else "xla")
    assert result["cross_entropy_kernel"] == ("cpu_fused" if ready else "xla")
    assert result["cpu_kernel_isa"] == (kernels.cpu_kernel_isa()[0] if ready else None)
    assert result["cpu_kernel_isa"] in (("avx512", "avx2") if ready else (None,))


WITHOUT_TENSORFLOW = """
import importlib.abc, json, sys

class Absent(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("seqio", "tensorflow", "tensorflow_datasets", "tensorflow_text"):
            raise ImportError(f"{name} is not installed here")

sys.meta_path.insert(0, Absent())
try:
    import seqio
    raise SystemExit("the blocker let seqio through")
except ImportError:
    pass
from mtjax import cli
code = cli.main(["bench", "train", "--smoke"])
assert not [m for m in sys.modules if m.split(".")[0] in ("seqio", "tensorflow")]
print("EXIT", code)
"""


def test_bench_train_runs_without_seqio_or_tensorflow(subprocess_python):
    """The GPU machines carry jax, flax, optax and orbax but no SeqIO or TensorFlow: the model,
    the train step and `mtjax bench train` must not need them."""
    out = subprocess_python(WITHOUT_TENSORFLOW).stdout
    result = json.loads(out[:out.rindex("EXIT")])
    assert out.rstrip().endswith("EXIT 0") and _positive(result["tokens_per_s"])


def test_kernel_cost_per_step_divides_the_difference():
    assert report.kernel_cost_per_step((100, 1.5), (700, 2.7), 4) == pytest.approx(
        {"page_faults": 150.0, "kernel_cpu_s": 0.3})
    # 64 MiB of a fresh anonymous mapping, written: every page faults in. (np.ones could
    # reuse heap memory an earlier test had freed and faulted in already, and fault nothing.)
    fresh = mmap.mmap(-1, 64 * 2**20)
    faults, kernel_s = report.kernel_counters()
    np.frombuffer(fresh, dtype=np.uint8)[:] = 1
    later = report.kernel_counters()
    assert later[0] > faults, (faults, later)  # (fewer faults with transparent huge pages)
    assert later[1] >= kernel_s


def test_all_runs_every_registered_benchmark(monkeypatch, capsys):
    calls = []

    def fake(name):
        def run(config, options):
            calls.append((name, config.model.name, options.steps))
            return {"benchmark": name, "value": 1.0}
        return run

    monkeypatch.setattr(bench, "BENCHMARKS", {"train": fake("train"), "data": fake("data")})
    assert bench.main(["all", "--smoke", "--steps", "4"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert list(result["benchmarks"]) == ["train", "data"]
    assert calls == [("train", "t5_1_1_test", 4), ("data", "t5_1_1_test", 4)]


@pytest.mark.parametrize("value", ["0", "-5", "nan", "inf"])
def test_a_peak_that_is_not_a_positive_number_is_refused(value, capsys):
    """0 was ignored silently, -5 gave an MFU of -2.4e9, nan a null one."""
    assert bench.main(["train", "--smoke", f"--peak-flops={value}"]) == 2
    assert "--peak-flops must be a positive number of FLOP/s" in capsys.readouterr().err


def test_an_output_that_fails_to_write_after_the_run_is_one_line(monkeypatch, tmp_path, capsys):
    """The check before the run cannot see a full disk: the write after it fails in one line
    (it was a traceback), and the result is on stdout all the same."""
    monkeypatch.setattr(bench, "BENCHMARKS", {"train": lambda config, options: {"x": 1.0}})

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(bench.outputs, "write_text", disk_full)
    assert bench.main(["train", "--smoke", "--output", str(tmp_path / "b.json")]) == 2
    out, err = capsys.readouterr()
    assert json.loads(out) == {"x": 1.0}
    assert err.strip().splitlines()[-1] == (
        f"mtjax bench: error: --output {tmp_path / 'b.json'}: cannot write it ([Errno 28] No "
        "space left on device); the result is on stdout above")


def test_defaults_are_the_peer_shape_and_overrides_win():
    args = bench.build_parser().parse_intermixed_args(
        ["train", "--warmup", "0", "train.batch_size=4", "--steps", "10", "data.pack=true"])
    config, options = bench.resolve(args)
    assert (config.model.name, config.train.batch_size) == ("t5_1_1_peer", 4)
    assert (config.data.inputs_length, config.data.targets_length) == (512, 128)
    assert config.optim.name == "adamw"
    assert (options.steps, options.warmup) == (10, 0)


@pytest.mark.parametrize("argv", [["train", "modl.name=x"], ["train", "model.name=t5_nope"],
                                  ["train", "--steps", "0"],
                                  ["train", "--smoke", "model.attention=cpu_fused",
                                   "model.dtype=bfloat16"],
                                  ["train", "--smoke", "--output", "/nonexistent/b.json"],
                                  ["train", "--smoke", "--profile", "/proc/mtjax_profile"]])
def test_user_mistakes_exit_2(argv, capsys):
    assert bench.main(argv) == 2
    assert "mtjax bench: error:" in capsys.readouterr().err


def test_synthetic_batch_is_full_length_and_teacher_forced():
    batch = train_bench.synthetic_batch(3, 8, 5, vocab_size=100)
    assert batch["encoder_input_tokens"].shape == (3, 8)
    assert (batch["encoder_input_tokens"] > 0).all() and (batch["decoder_loss_weights"] == 1).all()
    np.testing.assert_array_equal(batch["decoder_input_tokens"][:, 1:],
                                  batch["decoder_target_tokens"][:, :-1])
    assert all(v.dtype == np.int32 for v in batch.values())


@pytest.mark.parametrize("kind,dtype,expected", [
    ("NVIDIA H100 80GB HBM3", "bfloat16", 989e12),
    ("NVIDIA H100 PCIe", "bfloat16", 756e12),
    ("NVIDIA H100 NVL", "bfloat16", 835e12),  # not the SXM's 989e12
    ("NVIDIA H200", "bfloat16", 989e12),
    ("NVIDIA A100-SXM4-80GB", "bfloat16", 312e12),
    ("NVIDIA A100-SXM4-40GB", "float32", 156e12),
    ("TPU v4", "bfloat16", 275e12),
    ("TPU v5 lite", "bfloat16", 197e12),
    ("TPU v5", "bfloat16", 459e12),
    ("TPU v5p", "float32", 459e12),
    ("TPU v6 lite", "bfloat16", 918e12),
    ("cpu", "float32", None),
    ("NVIDIA GeForce RTX 4090", "bfloat16", None),
])
def test_peak_table_lookup(kind, dtype, expected):
    assert peak_lib.lookup_peak(kind, dtype) == expected


def test_a_peak_is_one_chips_on_accelerators_and_one_hosts_on_cpu(monkeypatch):
    """--peak-flops 989e12 on 8 GPUs meant 8x that for MFU only when it came from the table;
    given by hand it was taken as the total (MFU 8x too high)."""
    monkeypatch.setattr(jax, "device_count", lambda: 8)
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    assert peak_lib.peak_units("gpu") == 8
    assert peak_lib.peak_units("tpu") == 8
    assert peak_lib.peak_units("cpu") == 2  # a host's measured matmul uses all its cores


def test_a_step_above_its_peak_is_noted(capsys):
    """--peak-flops set too low gave an MFU above 100% without a word."""
    assert peak_lib.above_peak_note(9e14, 1e15, "table") is None
    note = peak_lib.above_peak_note(2e12, 1e12, "override")
    assert note.startswith("mtjax: note: the step ran at 2 TFLOP/s, above the peak it is "
                           "divided by (1 TFLOP/s, override): MFU 200%") and "--peak-flops" in note
    assert "busy" in peak_lib.above_peak_note(2e12, 1e12, "measured_matmul")
    assert bench.main(["train", "--smoke", "--peak-flops=1"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["mfu"] > 1
    assert "above the peak it is divided by" in captured.err


def test_bench_all_reports_each_benchmarks_own_memory_peak(monkeypatch, capsys):
    """ru_maxrss and a device's peak_bytes_in_use cover the whole process: in `bench all` every
    benchmark reported at least the peak of the ones before it."""
    ballast = []
    device_peaks = iter([0, 500, 500])  # before train, decode and data

    def fake(name, allocate_mb, device_after):
        def run(config, options):
            if allocate_mb:
                ballast.append(np.ones(allocate_mb * 2**20, np.uint8))
                ballast.clear()  # freed again: only the peak remembers it
            return {"benchmark": name, "host_peak_memory_bytes": report.host_peak_memory_bytes(),
                    "device_peak_memory_bytes": device_after}
        return run

    monkeypatch.setattr(report, "device_peak_memory_bytes", lambda: next(device_peaks))
    monkeypatch.setattr(bench, "BENCHMARKS", {"train": fake("train", 400, 500),
                                              "decode": fake("decode", 0, 500),
                                              "data": fake("data", 0, 900)})
    assert bench.main(["all", "--smoke"]) == 0
    result = json.loads(capsys.readouterr().out)["benchmarks"]
    if report.reset_host_peak_memory():
        assert (result["decode"]["host_peak_memory_bytes"]
                < result["train"]["host_peak_memory_bytes"] - 300 * 2**20)
    assert result["train"]["device_peak_memory_bytes"] == 500
    assert result["decode"]["device_peak_memory_bytes"] is None  # train's, not its own
    assert "run `mtjax bench decode` alone" in result["decode"]["device_peak_memory_note"]
    assert result["data"]["device_peak_memory_bytes"] == 900


def test_resolve_peak_order():
    assert peak_lib.resolve_peak("NVIDIA H200", "gpu", "bfloat16", 1e15) == (1e15, "override")
    assert peak_lib.resolve_peak("NVIDIA H200", "gpu", "bfloat16") == (989e12, "table")
    flops, source = peak_lib.resolve_peak("cpu", "cpu", "float32", matmul_size=256)
    assert source == "measured_matmul" and _positive(flops)


def test_peak_timing_gives_up_on_a_slow_variant(monkeypatch):
    clock = iter(range(100))  # each perf_counter() call is one "second" later
    monkeypatch.setattr(peak_lib.time, "perf_counter", lambda: next(clock))
    calls = []
    assert peak_lib._best_seconds(lambda: calls.append(1), trials=5) == 1
    assert len(calls) == 6  # warm-up + 5 trials
    calls.clear()
    assert peak_lib._best_seconds(lambda: calls.append(1), trials=5, give_up_after=0.5) == 1
    assert len(calls) == 2  # warm-up + the one trial that was already too slow


# --- The FLOP formula against an independent count ----------------------------------------------

def _dot_flops(jaxpr) -> float:
    """2*m*n*k summed over every dot_general in a jaxpr and its sub-jaxprs (scans times length)."""
    total = 0.0
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            lhs, rhs = (v.aval.shape for v in eqn.invars)
            (_, rhs_contract), (_, rhs_batch) = eqn.params["dimension_numbers"]
            free_rhs = [d for i, d in enumerate(rhs) if i not in rhs_contract + rhs_batch]
            total += 2.0 * np.prod(lhs) * np.prod(free_rhs)
        times = eqn.params.get("length", 1) if eqn.primitive.name == "scan" else 1
        for param in eqn.params.values():
            for sub in param if isinstance(param, tuple | list) else (param,):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    total += times * _dot_flops(inner)
    return total


def _grad_jaxpr_and_params(cfg: sizes.T5Config, b: int, s: int, t: int):
    mesh = mesh_lib.make_mesh(mesh_lib.MeshShape(1, 1, 1), jax.devices()[:1])
    with mesh_lib.activate(mesh, mesh_lib.get_rules("data")):
        model = t5.T5(cfg, rngs=nnx.Rngs(0))
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)
        enc = jnp.ones((b, s), jnp.int32)
        dec = jnp.ones((b, t), jnp.int32)

        def loss(p):
            return jnp.sum(nnx.merge(graphdef, p, rest)(enc, dec))

        return jax.make_jaxpr(jax.grad(loss))(params), loss, params


@pytest.mark.parametrize("variant", [{}, {"mlp_activation": "relu", "tie_embeddings": True},
                                     # heads x head width 24, not d_model's 32
                                     {"num_encoder_layers": 3, "num_decoder_layers": 1,
                                      "num_heads": 3, "d_kv": 8}])
def test_flop_formula_equals_counted_matmuls(variant):
    cfg = dataclasses.replace(sizes.get_config("t5_1_1_test"), vocab_size=512, **variant)
    b, s, t = 2, 24, 8
    jaxpr, _, _ = _grad_jaxpr_and_params(cfg, b, s, t)
    counted = _dot_flops(jaxpr.jaxpr)
    formula = sizes.train_flops_per_step(cfg, b, s, t)
    # Forward + backward matmuls are exactly what the formula counts; 1% allows for rounding.
    assert formula == pytest.approx(counted, rel=0.01), (formula, counted)


def test_flop_formula_near_xla_cost_analysis():
    cfg = dataclasses.replace(sizes.get_config("t5_1_1_test"), vocab_size=512)
    b, s, t = 2, 24, 8
    _, loss, params = _grad_jaxpr_and_params(cfg, b, s, t)
    cost = jax.jit(jax.grad(loss)).lower(params).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, list | tuple) else cost
    xla_flops = cost.get("flops") if cost else None
    if not xla_flops:
        pytest.skip("this backend reports no cost analysis")
    # XLA also counts elementwise work (softmax, norms, GELU): a loose factor only.
    formula = sizes.train_flops_per_step(cfg, b, s, t)
    assert 0.5 < xla_flops / formula < 3.0, (xla_flops, formula)


def test_gpu_attention_variants_ragged_layout_means_the_segment_mask():
    """benchmarks/gpu/attention_variants.py hands cuDNN packed rows as per-row segment offsets
    and lengths; they must mean mtjax's segment mask (the GPU run only times and compares)."""
    import importlib.util
    import pathlib

    path = pathlib.Path(__file__).parents[1] / "benchmarks" / "gpu" / "attention_variants.py"
    spec = importlib.util.spec_from_file_location("attention_variants", path)
    variants = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(variants)
    ids = np.array([[1, 1, 2, 2, 2, 0], [1, 2, 3, 3, 0, 0]], np.int32)
    offsets, lengths = variants.offsets_and_lengths(ids, 4)
    np.testing.assert_array_equal(offsets, [[0, 2, -1, -1, -1], [0, 1, 2, -1, -1]])
    np.testing.assert_array_equal(lengths, [[2, 3, -1, -1], [1, 1, 2, -1]])
    for causal in (False, True):
        np.testing.assert_array_equal(
            variants.mask_from_ragged(offsets, lengths, offsets, lengths, 6, 6, causal),
            variants.segment_mask(ids, ids, causal))
    variants.check_offsets()  # random packed rows, self- and cross-attention, causal or not


def test_peer_compare_refuses_an_unknown_order_name(capsys):
    """benchmarks/peers/compare.py skipped a misspelt --order name (torch_compiled) as it skips a
    peer without an interpreter: the sitting ended with exit 0 and that row missing."""
    import importlib.util
    import pathlib

    path = pathlib.Path(__file__).parents[1] / "benchmarks" / "peers" / "compare.py"
    spec = importlib.util.spec_from_file_location("compare", path)
    compare = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(compare)
    with pytest.raises(SystemExit) as exit_info:
        compare.main(["--mtjax", "", "--order", "mtjax,torch_compiled,flax_t5+hugepages"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "'torch_compiled'" in err and "torch_compile" in err and "flax_t5+" not in err


@pytest.mark.parametrize("script", ["sweep.py", "attention_variants.py"])
def test_gpu_scripts_help_says_their_whole_first_sentence(script):
    """sweep.py's --help described it as "... bf16, 512/114, over" and attention_variants.py's
    as "... in the ways mtjax could": the docstring's first line, cut mid-sentence."""
    import pathlib
    import subprocess
    import sys

    path = pathlib.Path(__file__).parents[1] / "benchmarks" / "gpu" / script
    proc = subprocess.run([sys.executable, str(path), "--help"], capture_output=True, text=True,
                          env={**os.environ, "COLUMNS": "100"}, timeout=300)
    assert proc.returncode == 0, proc.stderr
    description = proc.stdout.split("\n\n")[1]
    assert description.rstrip().endswith("."), description


@pytest.mark.parametrize("script,package", [("hf_torch_t5.py", "torch"),
                                            ("hf_flax_t5.py", "transformers")])
def test_a_peer_without_its_packages_says_so_in_one_line(script, package):
    """A peer run with mtjax's interpreter (no torch or transformers) ended in a
    ModuleNotFoundError traceback, exit 1."""
    import importlib.util
    import pathlib
    import subprocess
    import sys

    if importlib.util.find_spec(package) is not None:
        pytest.skip(f"{package} is installed here")
    path = pathlib.Path(__file__).parents[1] / "benchmarks" / "peers" / script
    proc = subprocess.run([sys.executable, str(path), "--help"], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stderr.count("\n") == 1 and package in proc.stderr and "Peers" in proc.stderr


@pytest.mark.parametrize("argv,message", [
    (["", "model.remat=bogus"], "config key 'model.remat' must be one of"),
    (["--rounds", "0", ""], "--rounds must be at least 1"),
])
def test_ab_step_refuses_a_mistake_before_compiling(argv, message):
    """benchmarks/ab_step.py compiled the peer-shape baseline (a minute or more) before it read
    a later variant's bad override, then ended in a ConfigError traceback (exit 1); --rounds 0
    compiled every variant and failed on the median of no steps."""
    import pathlib
    import subprocess
    import sys

    path = pathlib.Path(__file__).parents[1] / "benchmarks" / "ab_step.py"
    proc = subprocess.run([sys.executable, str(path), *argv], capture_output=True, text=True,
                          env={**os.environ, "MTJAX_HUGEPAGES": "0"}, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and message in proc.stderr


DECODE_ON_A_BAD_MESH = """
from mtjax import bench
for overrides in (["mesh.fsdp=2", "mesh.tensor=4", "mesh.rules=fsdp_tensor"],
                  ["mesh.fsdp=8", "mesh.rules=batch=data,embed=fsdp,mlp=fsdp"]):
    print("EXIT", bench.main(["decode", "--smoke", *overrides]), flush=True)
"""


def test_bench_decode_on_a_mesh_that_cannot_hold_the_model_is_one_line(subprocess_python):
    """`bench train` refuses these meshes in one line before compiling; `bench decode` ended in
    JAX's IndivisibleError (2 heads over tensor=4) and DuplicateSpecError tracebacks."""
    proc = subprocess_python(DECODE_ON_A_BAD_MESH, devices=8)
    assert proc.stdout.split() == ["EXIT", "2", "EXIT", "2"], proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("mtjax bench: error")]
    assert len(errors) == 2, proc.stderr[-3000:]
    assert "cannot be split over mesh.tensor = 4" in errors[0]
    assert "both embed and mlp map to mesh axis 'fsdp'" in errors[1]


@pytest.mark.parametrize("dtype,expected", [("bfloat16", 835e12), ("float32", 417.5e12)])
def test_h200_nvl_has_its_own_peak(dtype, expected):
    """NVIDIA's H200 NVL (PCIe, 600 W) runs at 1,671 sparse / 835 dense BF16 TFLOP/s, as the
    H100 NVL; its device_kind "NVIDIA H200 NVL" matched "h200" and got the SXM's 989e12, so
    every MFU there read 16% low."""
    assert peak_lib.lookup_peak("NVIDIA H200 NVL", dtype) == expected
    assert peak_lib.lookup_peak("NVIDIA H200", dtype) == {"bfloat16": 989e12,
                                                           "float32": 494.7e12}[dtype]


def test_a_negative_seed_makes_a_synthetic_batch():
    """`mtjax bench train train.seed=-1` stopped in numpy ("expected non-negative integer")."""
    tokens = train_bench.synthetic_batch(2, 8, 4, 384, -1)["encoder_input_tokens"]
    assert tokens.shape == (2, 8) and tokens.min() >= 1
    other = train_bench.synthetic_batch(2, 8, 4, 384, 1)["encoder_input_tokens"]
    assert not np.array_equal(tokens, other)
