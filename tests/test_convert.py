"""Checkpoint conversion: conformance with Hugging Face transformers, round trips, errors, T5X,
and a converted checkpoint used by ``mtjax train --init-from``.

The references in tests/fixtures/hf_t5/ were made by tests/fixtures/make_hf_t5_fixtures.py with
transformers 4.57.6 and torch 2.13.0 (CPU); these tests need neither.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import shutil
import stat
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file

from mtjax import cli, interop
from mtjax.model import convert, sizes
from mtjax.model.position_bias import relative_position_bucket
from mtjax.model.t5 import T5
from mtjax.parallel import mesh as mesh_lib
from mtjax.train import state as state_lib

FIXTURES = pathlib.Path(__file__).parent / "fixtures" / "hf_t5"
VARIANTS = ("t5_1_0", "t5_1_1", "mt5", "byt5", "umt5")
TOLERANCE = 1e-4  # max |mtjax - hf| / max |hf|, float32


def mesh_and_rules():
    return mesh_lib.make_mesh(mesh_lib.MeshShape()), mesh_lib.get_rules("fsdp")


def hf_fixture(variant: str):
    directory = FIXTURES / variant
    hf_config = json.loads((directory / "config.json").read_text())
    return hf_config, load_file(directory / "model.safetensors")


def fixture_config(variant: str) -> sizes.T5Config:
    return convert.hf_config_to_t5(hf_fixture(variant)[0])


def relative_difference(got, want) -> float:
    return float(np.max(np.abs(np.asarray(got) - want)) / np.max(np.abs(want)))


def run_model(cfg: sizes.T5Config, params, reference, case: str):
    """Encoder output, logits and mean token loss of mtjax on a fixture batch."""
    mesh, rules = mesh_and_rules()
    with mesh_lib.activate(mesh, rules):
        abstract = nnx.eval_shape(lambda: T5(cfg, rngs=nnx.Rngs(0)))
    graphdef, _, rest = nnx.split(abstract, nnx.Param, ...)

    @jax.jit
    def forward(params, enc, dec, targets):
        model = nnx.merge(graphdef, nnx.State(params), rest)
        encoded = model.encode(enc)
        logits = model.decode(encoded, enc, dec)
        token_loss = (jax.nn.logsumexp(logits, axis=-1)
                      - jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0])
        weights = (targets > 0).astype(jnp.float32)
        return encoded, logits, jnp.sum(token_loss * weights) / jnp.sum(weights)

    with mesh_lib.activate(mesh, rules):
        return forward(jax.tree.map(jnp.asarray, params),
                       *(jnp.asarray(reference[f"{case}_{k}"]) for k in (
                           "encoder_input_tokens", "decoder_input_tokens",
                           "decoder_target_tokens")))


# ---------------------------------------------------------------------------------------------
# Conformance with transformers (4.57.6, PyTorch, float32)
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("variant", VARIANTS)
def test_matches_transformers_with_and_without_padding(variant):
    hf_config, tensors = hf_fixture(variant)
    cfg = dataclasses.replace(convert.hf_config_to_t5(hf_config), dropout_rate=0.0)
    params = convert.hf_to_params(tensors, cfg)
    reference = np.load(FIXTURES / variant / "reference.npz")
    for case in ("nopad", "pad"):
        encoded, logits, loss = run_model(cfg, params, reference, case)
        diffs = {"encoder output": relative_difference(encoded, reference[f"{case}_encoded"]),
                 "logits": relative_difference(logits, reference[f"{case}_logits"]),
                 "loss": relative_difference(loss, reference[f"{case}_loss"])}
        assert max(diffs.values()) <= TOLERANCE, (variant, case, diffs)


def test_relative_position_buckets_match_transformers():
    reference = np.load(FIXTURES / "buckets.npz")
    relative = jnp.asarray(reference["relative_position"])
    for key in reference.files:
        if key == "relative_position":
            continue
        direction, buckets, distance = key.split("_")
        got = relative_position_bucket(relative, bidirectional=direction == "bi",
                                       num_buckets=int(buckets), max_distance=int(distance))
        np.testing.assert_array_equal(np.asarray(got), reference[key], err_msg=key)


@pytest.mark.parametrize("variant", VARIANTS)
def test_table_matches_the_model_tree(variant):
    cfg = fixture_config(variant)
    abstract = state_lib.abstract_params(cfg, *mesh_and_rules())
    table = {e.path: e.shape for e in convert.param_table(cfg)}
    assert {p: tuple(x.shape) for p, x in convert.flatten(abstract).items()} == table
    assert sum(np.prod(s) for s in table.values()) == sizes.count_params(cfg)


# ---------------------------------------------------------------------------------------------
# Hugging Face round trips and errors
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("variant", VARIANTS)
def test_hf_round_trip_is_bit_exact(variant):
    hf_config, tensors = hf_fixture(variant)
    cfg = convert.hf_config_to_t5(hf_config)
    back = convert.params_to_hf(convert.hf_to_params(tensors, cfg), cfg)
    assert sorted(back) == sorted(tensors)  # exactly the names save_pretrained writes
    for name, x in tensors.items():
        assert back[name].dtype == x.dtype and np.array_equal(back[name], x), name
    again = convert.t5_to_hf_config(cfg, hf_config["model_type"])
    assert convert.hf_config_to_t5(again) == cfg
    for key, value in again.items():  # transformers leaves out values equal to its defaults
        assert hf_config.get(key, value) == value, key


@pytest.mark.parametrize("variant, flags", [("byt5", []), ("mt5", ["--vocab", "byte"])])
def test_cli_hf_to_mtjax_to_hf_round_trip(tmp_path, capsys, variant, flags):
    src = FIXTURES / variant  # byt5's tokenizer_config.json names the byte vocabulary
    assert cli.main(["convert", str(src), str(tmp_path / "ckpt"), *flags]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["vocabulary"] == "byte" and summary["model"] is None
    run_config = interop._read_json_item(tmp_path / "ckpt" / "checkpoints" / "0" / "config")
    assert run_config["data"]["vocabulary"] == "byte"
    assert interop.checkpoint_vocabulary(tmp_path / "ckpt") == "byte"
    assert cli.main(["convert", str(tmp_path / "ckpt"), str(tmp_path / "hf"), "--to", "hf"]) == 0
    back, original = (load_file(d / "model.safetensors") for d in (tmp_path / "hf", src))
    assert sorted(back) == sorted(original)
    assert all(np.array_equal(back[k], original[k]) for k in original)
    assert json.loads((tmp_path / "hf" / "tokenizer_config.json").read_text()) == {
        "tokenizer_class": "ByT5Tokenizer"}
    # The weights are as readable as the other files (safetensors itself writes mode 0600).
    modes = {f.name: stat.S_IMODE(f.stat().st_mode) for f in (tmp_path / "hf").iterdir()}
    assert len(set(modes.values())) == 1, modes
    exported = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert exported["model_type"] == hf_fixture(variant)[0]["model_type"]
    # A second conversion into the same directory would mix two models.
    assert cli.main(["convert", str(src), str(tmp_path / "ckpt"), *flags]) == 2
    assert "is not empty" in capsys.readouterr().err
    # Files where directories belong, either side.
    a_file = tmp_path / "hf" / "config.json"
    assert cli.main(["convert", str(src), str(a_file), *flags]) == 2
    assert f"{a_file} is a file; give a new or empty directory" in capsys.readouterr().err
    assert cli.main(["convert", str(a_file), str(tmp_path / "new"), *flags]) == 2
    assert f"{a_file} is a file; give the directory of" in capsys.readouterr().err


def test_spm_vocabulary_is_copied_and_recorded_relative(tmp_path):
    import sentencepiece

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(f"word{i} text{i % 7} sample" for i in range(200)))
    sentencepiece.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(tmp_path / "sp"),
                                             vocab_size=30, pad_id=0, eos_id=1, unk_id=2,
                                             bos_id=-1, minloglevel=2)
    hf = tmp_path / "hf"
    hf.mkdir()
    for name in ("config.json", "model.safetensors"):
        (hf / name).write_bytes((FIXTURES / "t5_1_0" / name).read_bytes())
    (hf / "spiece.model").write_bytes((tmp_path / "sp.model").read_bytes())
    notes = []
    summary = interop.convert(hf, tmp_path / "ckpt", log=notes.append)
    assert (tmp_path / "ckpt" / "spiece.model").read_bytes() == (hf / "spiece.model").read_bytes()
    # The size train makes of the file: its pieces and the 100 sentinels (T5's 32,000 pieces
    # in 32,128 rows were told they would not fit).
    from mtjax.data import get_vocabulary

    made = get_vocabulary(str(hf / "spiece.model")).vocab_size
    assert interop.vocabulary_size(str(hf / "spiece.model")) == made == 30 + 100
    rows = summary["model_config"]["vocab_size"]
    assert any("will not fit" in n for n in notes) == (-(-made // 128) * 128 != rows), notes
    run_config = interop._read_json_item(tmp_path / "ckpt" / "checkpoints" / "0" / "config")
    assert run_config["data"]["vocabulary"] == "spiece.model"  # relative: the dir can move
    moved = tmp_path / "moved"
    (tmp_path / "ckpt").rename(moved)
    assert interop.checkpoint_vocabulary(moved) == str(moved / "spiece.model")
    assert summary["model_config"]["tie_embeddings"] is True


def test_errors_name_missing_misshaped_and_unknown_tensors(tmp_path, capsys):
    hf_config, tensors = hf_fixture("t5_1_1")
    cfg = convert.hf_config_to_t5(hf_config)
    broken = dict(tensors)
    del broken["encoder.block.1.layer.0.SelfAttention.k.weight"]
    broken["lm_head.weight"] = broken["lm_head.weight"][:, :-1]
    broken["encoder.block.0.layer.0.SelfAttention.bias"] = np.zeros(3, np.float32)
    with pytest.raises(convert.ConversionError) as info:
        convert.hf_to_params(broken, cfg)
    message = str(info.value)
    assert "1 missing: encoder.block.1.layer.0.SelfAttention.k.weight" in message
    assert "1 mis-shaped: lm_head.weight (72, 23) (want (72, 24))" in message
    assert "1 unknown: encoder.block.0.layer.0.SelfAttention.bias" in message
    # Through the CLI: exit 2, one line.
    src = tmp_path / "broken"
    src.mkdir()
    (src / "config.json").write_text(json.dumps(hf_config))
    save_file(broken, str(src / "model.safetensors"), metadata={"format": "pt"})
    assert cli.main(["convert", str(src), str(tmp_path / "out"), "--vocab", "byte"]) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]  # after the progress lines
    assert error.startswith("mtjax: error: ") and "mis-shaped: lm_head.weight" in error


@pytest.mark.parametrize("damage, needle", [
    ("cut_short", "model.safetensors cannot be read (SafetensorError"),
    ("bad_config", "config.json is not valid JSON"),
    ("index_without_map", "model.safetensors.index.json has no weight_map"),
    ("missing_shard", "model-00002-of-00002.safetensors, a shard model.safetensors.index.json "
                      "names, does not exist"),
    ("no_weights", "has a config.json but no weights"),
])
def test_a_damaged_download_is_one_line(tmp_path, capsys, damage, needle):
    """Files a download left damaged or incomplete: one line naming the file, exit 2 (they
    were a SafetensorError, JSONDecodeError, KeyError or FileNotFoundError traceback)."""
    src = tmp_path / "hf"
    src.mkdir()
    config = (FIXTURES / "t5_1_0" / "config.json").read_bytes()
    weights = (FIXTURES / "t5_1_0" / "model.safetensors").read_bytes()
    (src / "config.json").write_bytes(b"{oops" if damage == "bad_config" else config)
    if damage == "cut_short":
        (src / "model.safetensors").write_bytes(weights[:100])
    elif damage in ("index_without_map", "missing_shard"):
        (src / "model-00001-of-00002.safetensors").write_bytes(weights)
        index = {"metadata": {}} if damage == "index_without_map" else {"weight_map": {
            "shared.weight": "model-00001-of-00002.safetensors",
            "lm_head.weight": "model-00002-of-00002.safetensors"}}
        (src / "model.safetensors.index.json").write_text(json.dumps(index))
    elif damage == "bad_config":
        (src / "model.safetensors").write_bytes(weights)
    assert cli.main(["convert", str(src), str(tmp_path / "out"), "--vocab", "byte"]) == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err, err
    assert not (tmp_path / "out" / "checkpoints").exists()


def test_embedding_copies_and_legacy_keys():
    hf_config, tensors = hf_fixture("t5_1_0")
    cfg = convert.hf_config_to_t5(hf_config)
    shared = tensors["shared.weight"]
    legacy = {**tensors, "encoder.embed_tokens.weight": shared,
              "decoder.embed_tokens.weight": shared, "lm_head.weight": shared,
              "decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.weight":
                  np.zeros((8, 2), np.float32)}
    params = convert.hf_to_params(legacy, cfg)
    assert np.array_equal(params["token_embedder"]["embedding"], shared)
    with pytest.raises(convert.ConversionError, match="lm_head.weight differs"):
        convert.hf_to_params({**tensors, "lm_head.weight": shared + 1}, cfg)


def test_config_errors_and_torch_pickles(tmp_path, monkeypatch):
    with pytest.raises(convert.ConversionError, match="model_type 'bart'"):
        convert.hf_config_to_t5({"model_type": "bart"})
    with pytest.raises(convert.ConversionError, match="feed_forward_proj 'gelu'"):
        convert.hf_config_to_t5({"model_type": "t5", "feed_forward_proj": "gelu"})
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "pytorch_model.bin").write_bytes(b"not read")
    monkeypatch.setitem(sys.modules, "torch", None)  # as on a machine without torch
    with pytest.raises(convert.ConversionError, match="needs torch"):
        interop.read_hf(tmp_path)


@pytest.mark.parametrize("hf_name, mtjax_name, model_type", [
    ("t5-small", "t5_1_0_small", "t5"), ("t5-v1_1-base", "t5_1_1_base", "t5"),
    ("mt5-base", "mt5_base", "mt5"), ("byt5-small", "byt5_small", "t5"),
])
def test_published_configs_match_named_sizes(hf_name, mtjax_name, model_type):
    # The published config.json fields of these checkpoints.
    published = {
        "t5-small": dict(d_model=512, d_ff=2048, num_heads=8, d_kv=64, num_layers=6,
                         vocab_size=32128, feed_forward_proj="relu"),
        "t5-v1_1-base": dict(d_model=768, d_ff=2048, num_heads=12, d_kv=64, num_layers=12,
                             vocab_size=32128, feed_forward_proj="gated-gelu",
                             tie_word_embeddings=False),
        "mt5-base": dict(d_model=768, d_ff=2048, num_heads=12, d_kv=64, num_layers=12,
                         vocab_size=250112, feed_forward_proj="gated-gelu",
                         tie_word_embeddings=False),
        "byt5-small": dict(d_model=1472, d_ff=3584, num_heads=6, d_kv=64, num_layers=12,
                           num_decoder_layers=4, vocab_size=384,
                           feed_forward_proj="gated-gelu", tie_word_embeddings=False),
    }[hf_name]
    cfg = convert.hf_config_to_t5({"model_type": model_type, **published})
    assert convert.match_named_size(cfg) == mtjax_name
    named = sizes.get_config(mtjax_name)
    assert convert.hf_config_to_t5(convert.t5_to_hf_config(named)) == named


# ---------------------------------------------------------------------------------------------
# T5X
# ---------------------------------------------------------------------------------------------

def to_t5x(params, *, scanned: bool, kernels_3d: bool, heads: int) -> dict[str, np.ndarray]:
    """An mtjax tree in T5X's names (the inverse of what the converter must do)."""
    flat = {}
    layers: dict[tuple[str, str], dict[int, np.ndarray]] = {}
    for path, x in convert.flatten(params).items():
        x = np.asarray(x)
        if path == ("lm_head", "kernel"):
            flat["decoder/logits_dense/kernel"] = x
        elif len(path) > 2 and path[1] == "layers":
            stack, i, rest = path[0], path[2], "/".join(path[3:])
            if kernels_3d and path[3] in ("attention", "self_attention",
                                          "encoder_decoder_attention"):
                x = (x.reshape(heads, -1, x.shape[1]) if path[4] == "out"
                     else x.reshape(x.shape[0], heads, -1))
            if scanned:
                layers.setdefault((stack, rest), {})[i] = x
            else:
                flat[f"{stack}/layers_{i}/{rest}"] = x
        else:
            flat["/".join(path)] = x
    for (stack, rest), by_layer in layers.items():
        flat[f"{stack}/{stack}/{rest}"] = np.stack([by_layer[i] for i in sorted(by_layer)], 1)
    return {f"target/{k}": v for k, v in flat.items()}


@pytest.mark.parametrize("variant, scanned, kernels_3d", [
    ("t5_1_0", False, False), ("t5_1_1", False, True), ("umt5", True, True)])
def test_t5x_trees(variant, scanned, kernels_3d):
    hf_config, tensors = hf_fixture(variant)
    cfg = convert.hf_config_to_t5(hf_config)
    params = convert.hf_to_params(tensors, cfg)
    t5x = to_t5x(params, scanned=scanned, kernels_3d=kernels_3d, heads=cfg.num_heads)
    got = convert.t5x_to_params(t5x)
    inferred = convert.infer_config(
        got, relative_attention_max_distance=cfg.relative_attention_max_distance,
        dropout_rate=cfg.dropout_rate)
    assert inferred == cfg
    convert.check_params(got, inferred)
    flat_got, flat_want = convert.flatten(got), convert.flatten(params)
    assert flat_got.keys() == flat_want.keys()
    assert all(np.array_equal(flat_got[k], flat_want[k]) for k in flat_want)
    with pytest.raises(convert.ConversionError, match="1 unknown: decoder/extra"):
        convert.t5x_to_params({**t5x, "target/decoder/extra": np.zeros(1)})
    with pytest.raises(convert.ConversionError, match="1 unknown: encoder.layers.0.mlp.extra"):
        convert.check_params(convert.t5x_to_params(
            {**t5x, "encoder/layers_0/mlp/extra": np.zeros(1)}), cfg)


def test_t5x_native_checkpoint_directory(tmp_path, capsys):
    """The msgpack ``checkpoint`` file with TensorStore arrays that T5X's Checkpointer writes."""
    import tensorstore as ts
    from flax import serialization

    hf_config, tensors = hf_fixture("t5_1_1")
    cfg = convert.hf_config_to_t5(hf_config)
    params = convert.hf_to_params(tensors, cfg)
    ckpt = tmp_path / "t5x" / "checkpoint_1000"
    ckpt.mkdir(parents=True)
    target: dict = {}
    for name, x in to_t5x(params, scanned=False, kernels_3d=False, heads=3).items():
        name = name.removeprefix("target/")
        node = target
        for key in name.split("/")[:-1]:
            node = node.setdefault(key, {})
        if x.ndim == 2:  # big arrays go to TensorStore, small ones into the msgpack file
            relative = "target." + name.replace("/", ".")
            spec = {"driver": "zarr", "kvstore": {"driver": "file", "path": relative}}
            store = ts.open({**spec, "kvstore": {"driver": "file", "path": str(ckpt / relative)}},
                            create=True, dtype=ts.float32, shape=x.shape).result()
            store.write(x).result()
            node[name.split("/")[-1]] = {**spec, "metadata": {"shape": list(x.shape)}}
        else:
            node[name.split("/")[-1]] = x
    state = {"version": 3, "optimizer": {"target": target, "state": {"step": np.int32(1000)}}}
    (ckpt / "checkpoint").write_bytes(serialization.msgpack_serialize(state))
    assert cli.main(["convert", str(tmp_path / "t5x"), str(tmp_path / "out"),
                     "--vocab", "byte"]) == 0
    assert json.loads(capsys.readouterr().out)["from"] == "t5x"
    cfg_back, params_back, _ = interop.read_mtjax(tmp_path / "out")
    assert cfg_back == dataclasses.replace(cfg, dropout_rate=0.0)
    flat_back = convert.flatten(params_back)
    assert all(np.array_equal(flat_back[k], v) for k, v in convert.flatten(params).items())
    # An array file damaged or missing (a copy cut short): one line naming it, no traceback.
    array = ckpt / "target.decoder.logits_dense.kernel"
    (array / "0.0").write_bytes(b"cut")
    for out in ("cut_short", "missing"):
        if out == "missing":
            (array / ".zarray").unlink()
        assert cli.main(["convert", str(ckpt), str(tmp_path / out), "--vocab", "byte"]) == 2
        err = capsys.readouterr().err
        assert f"mtjax: error: T5X array {array} cannot be read" in err, err
        assert "Traceback" not in err and "tensorstore_spec" not in err, err


def test_a_t5x_directory_whose_latest_step_is_incomplete(tmp_path, capsys):
    """The directory of a T5X run whose newest checkpoint_<step> holds no checkpoint file (a
    save or a copy cut short) ended in a traceback ("No structure could be identified"): the
    newest complete step is taken, naming the one passed over; with none, one line."""
    from flax import serialization

    hf_config, tensors = hf_fixture("t5_1_1")
    cfg = convert.hf_config_to_t5(hf_config)
    target: dict = {}
    for name, x in to_t5x(convert.hf_to_params(tensors, cfg), scanned=False, kernels_3d=False,
                          heads=cfg.num_heads).items():
        *parents, leaf = name.removeprefix("target/").split("/")
        node = target
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = x
    (tmp_path / "empty" / "checkpoint_2000").mkdir(parents=True)
    assert cli.main(["convert", str(tmp_path / "empty"), str(tmp_path / "none"), "--from", "t5x",
                     "--vocab", "byte"]) == 2
    err = capsys.readouterr().err
    assert "checkpoint_2000 holds no 'checkpoint' file" in err and "Traceback" not in err, err
    shutil.copytree(tmp_path / "empty", tmp_path / "t5x")
    (tmp_path / "t5x" / "checkpoint_1000").mkdir()
    (tmp_path / "t5x" / "checkpoint_1000" / "checkpoint").write_bytes(
        serialization.msgpack_serialize({"optimizer": {"target": target}}))
    assert cli.main(["convert", str(tmp_path / "t5x"), str(tmp_path / "out"),
                     "--vocab", "byte"]) == 0
    err = capsys.readouterr().err
    assert "checkpoint_2000 holds no 'checkpoint' file" in err, err
    assert f"reading {tmp_path / 't5x' / 'checkpoint_1000'}" in err, err


def _save_orbax_t5x_tree(path) -> None:
    """The t5_1_1 fixture as T5X's parameter tree, saved by Orbax at ``path``."""
    import orbax.checkpoint as ocp

    hf_config, tensors = hf_fixture("t5_1_1")
    cfg = convert.hf_config_to_t5(hf_config)
    t5x = to_t5x(convert.hf_to_params(tensors, cfg), scanned=False, kernels_3d=False, heads=3)
    tree: dict = {}
    for name, x in t5x.items():
        *parents, leaf = name.split("/")
        node = tree
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = jnp.asarray(x)
    ocp.PyTreeCheckpointer().save(path, tree)


def test_an_orbax_tree_is_read_without_orbax_sharding_warning(tmp_path, capsys, recwarn):
    """Orbax warned "Sharding info not provided when restoring..." (two lines on stderr) for
    every Orbax tree read as T5X: before a converted T5X tree's summary, and before the one-line
    error for an mtjax step's state item given with --from t5x."""
    _save_orbax_t5x_tree(tmp_path / "orbax_t5x")
    assert cli.main(["convert", str(tmp_path / "orbax_t5x"), str(tmp_path / "from_orbax"),
                     "--vocab", "byte"]) == 0
    assert json.loads(capsys.readouterr().out)["from"] == "t5x"
    state = tmp_path / "from_orbax" / "checkpoints" / "0" / "state"
    assert cli.main(["convert", str(state), str(tmp_path / "again"), "--from", "t5x",
                     "--vocab", "byte"]) == 2
    assert capsys.readouterr().err.count("mtjax: error: T5X checkpoint:") == 1
    assert not [w for w in recwarn if "Sharding info" in str(w.message)]


@pytest.mark.parametrize("damage", ["cut_short", "no_manifest", "bad_metadata"])
def test_a_damaged_orbax_t5x_tree_is_one_line(tmp_path, capfd, damage):
    """An Orbax tree read as T5X with an array file cut short, its manifest gone or its
    _METADATA not JSON ended in tracebacks (dozens of lines, "Event loop is closed")."""
    src = tmp_path / "orbax_t5x"
    _save_orbax_t5x_tree(src)
    if damage == "cut_short":
        biggest = max((src / "ocdbt.process_0" / "d").iterdir(), key=lambda p: p.stat().st_size)
        biggest.write_bytes(biggest.read_bytes()[:100])
    elif damage == "no_manifest":
        (src / "manifest.ocdbt").unlink()
    else:
        (src / "_METADATA").write_text("{")
    capfd.readouterr()
    assert cli.main(["convert", str(src), str(tmp_path / "out"), "--vocab", "byte"]) == 2
    err = capfd.readouterr().err
    assert f"mtjax: error: T5X checkpoint {src} cannot be read" in err, err
    assert "Traceback" not in err, err


# ---------------------------------------------------------------------------------------------
# A converted checkpoint starts a training run
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["t5_1_1_test", "custom"])
def test_converted_checkpoint_initialises_training(tmp_path, capsys, name):
    """HF directory -> `mtjax convert` -> `mtjax train --init-from`; with learning rate 0 the
    run's checkpoint holds exactly the converted weights, and exports back to the same file.
    A size without a name (model.name=custom) trains from the architecture the conversion
    recorded, and resumes from the run's own copy of it (it was "unknown model size")."""
    # The t5_1_1_test network with the byte vocabulary of the built-in mixture (259 -> 384);
    # "custom": with a d_ff no named size has.
    cfg = dataclasses.replace(sizes.get_config("t5_1_1_test"), vocab_size=384)
    if name == "custom":
        cfg = dataclasses.replace(cfg, d_ff=40)
    rng = np.random.default_rng(0)
    params = convert.unflatten({e.path: rng.normal(size=e.shape).astype(np.float32)
                                for e in convert.param_table(cfg)})
    interop.write_hf(tmp_path / "hf", cfg, params, "byte")
    assert cli.main(["convert", str(tmp_path / "hf"), str(tmp_path / "ckpt")]) == 0
    assert json.loads(capsys.readouterr().out)["model"] == (None if name == "custom" else name)
    args = ["train", "--workdir", str(tmp_path / "run"), "--no-progress", f"model.name={name}",
            "eval.at_end=false", "train.batch_size=2", "data.inputs_length=32",
            "data.targets_length=16", "optim.learning_rate=0", "log.tensorboard=false",
            "checkpoint.async_save=false"]
    assert cli.main([*args, "--init-from", str(tmp_path / "ckpt"), "train.steps=1"]) == 0
    _, trained, run_config = interop.read_mtjax(tmp_path / "run")
    assert run_config["model"]["name"] == name
    if name == "custom":
        assert (tmp_path / "run" / "model_config.json").is_file()
        shutil.rmtree(tmp_path / "ckpt")  # the run resumes on its own
        assert cli.main([*args, "train.steps=2"]) == 0
        assert "resuming from" in capsys.readouterr().err
        _, trained, _ = interop.read_mtjax(tmp_path / "run")  # lr 0: the weights stay
    flat = convert.flatten(trained)
    assert all(np.array_equal(flat[k], v) for k, v in convert.flatten(params).items())
    # A trained run (no model_config.json, no recorded vocabulary) exports to Hugging Face, with
    # the tokenizer of its mixture's byte vocabulary.
    assert cli.main(["convert", str(tmp_path / "run"), str(tmp_path / "out"), "--to", "hf"]) == 0
    assert json.loads(capsys.readouterr().out)["vocabulary"] == "byte"
    assert json.loads((tmp_path / "out" / "tokenizer_config.json").read_text()) == {
        "tokenizer_class": "ByT5Tokenizer"}
    back, original = (load_file(d / "model.safetensors") for d in (tmp_path / "out",
                                                                     tmp_path / "hf"))
    assert all(np.array_equal(back[k], original[k]) for k in original)


def test_a_custom_size_run_exports_the_dropout_it_trained_with(tmp_path, capsys):
    """A run of a converted size (model.name=custom) keeps the architecture the conversion
    recorded, dropout 0.1 from Hugging Face's config.json; fine-tuned with model.dropout_rate=0,
    its export said 0.1, where a named size's export says the run's own rate."""
    cfg = dataclasses.replace(sizes.get_config("t5_1_1_test"), vocab_size=384, d_ff=40)
    rng = np.random.default_rng(0)
    params = convert.unflatten({e.path: rng.normal(size=e.shape).astype(np.float32)
                                for e in convert.param_table(cfg)})
    run = tmp_path / "run"
    interop.write_mtjax(run, cfg, params, "byte", source={})  # model.dropout_rate=0.0
    recorded = json.loads((run / "model_config.json").read_text())
    recorded["t5_config"]["dropout_rate"] = 0.1  # the converted checkpoint's, copied by the run
    (run / "model_config.json").write_text(json.dumps(recorded))
    assert cli.main(["convert", str(run), str(tmp_path / "hf"), "--to", "hf"]) == 0
    capsys.readouterr()
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["dropout_rate"] == 0.0


def test_init_from_a_converted_size_without_model_name_custom_says_to_give_it(tmp_path,
                                                                             capsys):
    """`mtjax train --init-from` a converted checkpoint of a size without a name, forgetting
    model.name=custom, said only "needs a checkpoint of the same model size and vocabulary (it
    holds custom)": not which setting takes it."""
    from mtjax.checkpoint import CheckpointError, restore_params
    from mtjax.infer import load as load_lib

    assert cli.main(["convert", str(FIXTURES / "byt5"), str(tmp_path / "ckpt")]) == 0
    capsys.readouterr()
    mesh, rules = mesh_and_rules()
    demo = dataclasses.replace(sizes.get_config("t5_1_1_tiny"), vocab_size=384)
    _, target = load_lib.abstract_model(demo, mesh, rules)
    with pytest.raises(CheckpointError, match=r"\(it holds a converted size without a name: "
                                              r"give model\.name=custom\)"):
        restore_params(tmp_path / "ckpt", target)


def test_training_in_a_converted_checkpoint_says_to_start_from_it_instead(tmp_path, capsys):
    """`mtjax train --workdir` a converted checkpoint (for --init-from) took its step 0 for a
    run to resume: "written by 0 host(s)", then a refusal naming config differences or Orbax's
    "tree structures do not match: opt_state ...", none of which says what the directory is."""
    ckpt = tmp_path / "ckpt"
    assert cli.main(["convert", str(FIXTURES / "byt5"), str(ckpt)]) == 0
    capsys.readouterr()
    assert cli.main(["train", "--workdir", str(ckpt), "--no-progress", "model.name=custom",
                     "train.steps=1", "train.batch_size=2", "data.inputs_length=32",
                     "data.targets_length=16", "eval.at_end=false",
                     "log.tensorboard=false"]) == 2
    err = capsys.readouterr().err
    assert f"{ckpt / 'checkpoints' / '0'} holds weights only" in err, err
    assert f"--init-from {ckpt} and a new --workdir" in err and "host(s)" not in err, err


def test_an_export_whose_mixture_cannot_be_found_says_why_it_has_no_tokenizer(tmp_path,
                                                                              capsys,
                                                                              monkeypatch):
    """A run that used its mixture's vocabulary, exported where its tasks module is gone,
    said "no vocabulary recorded", which reads as a run that had none."""
    assert cli.main(["convert", str(FIXTURES / "byt5"), str(tmp_path / "ckpt")]) == 0
    read = interop._read_json_item

    def recorded_by_a_run(item_dir):
        config = read(item_dir)
        if config:
            config["data"].update(vocabulary=None, mixture="capitals_mix",
                                  tasks_module=str(tmp_path / "gone" / "my_tasks.py"))
        return config

    monkeypatch.setattr(interop, "_read_json_item", recorded_by_a_run)
    capsys.readouterr()
    assert cli.main(["convert", str(tmp_path / "ckpt"), str(tmp_path / "hf"), "--to", "hf"]) == 0
    err = capsys.readouterr().err
    assert "no vocabulary recorded" not in err, err
    assert ("the run's mixture 'capitals_mix' cannot be looked up here (tasks module file "
            f"'{tmp_path / 'gone' / 'my_tasks.py'}' does not exist") in err, err
    assert "wrote no tokenizer files (pass --vocab FILE|byte)" in err, err


def test_a_corrupt_t5x_file_or_a_vocab_that_is_no_model_is_one_line(tmp_path, capsys):
    not_spm = tmp_path / "notes.txt"
    not_spm.write_text("not a sentencepiece model\n")
    t5x = tmp_path / "t5x"
    t5x.mkdir()
    (t5x / "checkpoint").write_bytes(b"\x81\xa6target\x80" + b"garbage")  # msgpack, then junk
    for argv, needle in (
            ([str(FIXTURES / "t5_1_0"), str(tmp_path / "a"), "--vocab", str(not_spm)],
             "is not a SentencePiece model"),
            ([str(t5x), str(tmp_path / "b"), "--from", "t5x", "--vocab", "byte"],
             "is not a readable T5X checkpoint")):
        assert cli.main(["convert", *argv]) == 2
        err = capsys.readouterr().err
        assert needle in err and "Traceback" not in err, err


def test_inference_refuses_a_vocabulary_larger_than_the_embedding(tmp_path, capsys):
    """mt5's 80-row fixture converted with the byte vocabulary (259 ids): byte ids past row 80
    read no row, and `mtjax score` wrote null for every record without a word."""
    assert cli.main(["convert", str(FIXTURES / "mt5"), str(tmp_path / "ckpt"),
                     "--vocab", "byte"]) == 0
    capsys.readouterr()
    records = tmp_path / "in.jsonl"
    records.write_text('{"inputs": "translate: hello", "targets": "bonjour"}\n')
    for command in (["score", "--input", str(records)], ["infer", "--input", str(records)]):
        assert cli.main([*command, "--checkpoint", str(tmp_path / "ckpt")]) == 2
        err = capsys.readouterr().err
        assert "byte(259) has 259 ids, and the model's embedding only 80 rows" in err, err
        assert "mtjax convert --vocab" in err and "Traceback" not in err


def test_the_state_item_of_an_mtjax_step_is_taken_for_mtjax(tmp_path):
    """`<run>/checkpoints/<step>/state` holds Orbax's _METADATA, which alone means an Orbax T5X
    tree: convert read it as T5X and listed every mtjax name as unknown."""
    step = tmp_path / "run" / "checkpoints" / "7"
    (step / "state").mkdir(parents=True)
    (step / "state" / "_METADATA").write_text("{}")
    (step / "config").mkdir()
    assert interop.detect_format(step / "state") == "mtjax"
    assert interop.detect_format(step) == "mtjax"
    (tmp_path / "orbax_t5x").mkdir()
    (tmp_path / "orbax_t5x" / "_METADATA").write_text("{}")
    assert interop.detect_format(tmp_path / "orbax_t5x") == "t5x"


@pytest.mark.parametrize("flags", [[], ["--from", "t5x"]])
def test_a_conversion_with_no_vocabulary_fails_before_reading_the_weights(
        tmp_path, capsys, monkeypatch, flags):
    """A Hugging Face model without tokenizer files, or a T5X checkpoint, converted without
    --vocab: the weights were read whole (many minutes for an 11B model) before the missing
    vocabulary was named."""
    def no_reading(*args, **kwargs):
        raise AssertionError("the weights were read")

    monkeypatch.setattr(interop, "read_hf", no_reading)
    monkeypatch.setattr(interop, "read_t5x", no_reading)
    src = FIXTURES / "t5_1_1"  # config.json and model.safetensors only
    assert cli.main(["convert", str(src), str(tmp_path / "out"), *flags]) == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1] == (
        f"mtjax: error: no vocabulary found with {src}; pass --vocab FILE (a SentencePiece "
        f".model) or --vocab byte, so that the vocabulary travels with the checkpoint"), err
    assert not (tmp_path / "out").exists()
