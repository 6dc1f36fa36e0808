"""Checkpoint files in and out: Hugging Face and T5X in, mtjax and Hugging Face out.

``mtjax convert`` calls :func:`convert`. Reading and writing files lives here; the mapping of
names and layouts is pure and lives in :mod:`mtjax.model.convert`.

An mtjax checkpoint made here is what ``mtjax train`` writes, minus optimizer and data position:
``DST/checkpoints/0/{state,config}`` (Orbax; ``state`` = ``{"params": tree}``, ``config`` = a full
mtjax config whose ``model.name`` is the matching named size and ``data.vocabulary`` the
vocabulary), plus ``DST/model_config.json`` (the exact architecture, for sizes without a name) and
the vocabulary file copied into ``DST`` (recorded relative to ``DST``; :func:`checkpoint_vocabulary`
resolves it). So ``mtjax train --init-from DST`` takes its weights.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import shutil
import stat
import sys
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np

from mtjax import config as config_lib
from mtjax.model import convert as conv
from mtjax.model.sizes import MODEL_CONFIG_FILE, T5Config, get_config, read_architecture

Log = Callable[[str], None]


def _stderr(message: str) -> None:
    print(f"mtjax convert: {message}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# Hugging Face
# ---------------------------------------------------------------------------------------------

def _safetensors():
    try:
        import ml_dtypes  # noqa: F401 - lets numpy name bfloat16, so BF16 files load
        import safetensors.numpy
    except ImportError:
        raise conv.ConversionError(
            "reading or writing .safetensors needs the safetensors package: "
            "pip install safetensors") from None
    return safetensors


def _read_safetensors(path: pathlib.Path) -> dict[str, np.ndarray]:
    safetensors = _safetensors()
    with safetensors.safe_open(str(path), framework="np") as f:
        return {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118 - not a dict


def _read_torch(path: pathlib.Path) -> dict[str, np.ndarray]:
    try:
        import torch
    except ImportError:
        raise conv.ConversionError(
            f"{path.name} is a PyTorch pickle and reading it needs torch (install its CPU "
            f"build), or convert the model to model.safetensors first") from None
    state = torch.load(path, map_location="cpu", weights_only=True)
    return {k: (v.float() if v.dtype == torch.bfloat16 else v).numpy() for k, v in state.items()}


def read_hf(src: pathlib.Path) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """(config.json, state dict) of a Hugging Face model directory (sharded files too)."""
    if not (src / "config.json").is_file():
        raise conv.ConversionError(f"{src} has no config.json; give a Hugging Face model "
                                   f"directory (config.json + model.safetensors)")
    hf_config = _read_json(src / "config.json")
    for weights, reader in (("model.safetensors", _read_safetensors),
                            ("pytorch_model.bin", _read_torch)):
        index = src / f"{weights}.index.json"
        if index.is_file():
            weight_map = _read_json(index).get("weight_map")
            if not isinstance(weight_map, dict):
                raise conv.ConversionError(f"{index} has no weight_map (tensor -> file); "
                                           f"the download is incomplete, fetch it again")
            files = sorted(set(weight_map.values()))
        elif (src / weights).is_file():
            files = [weights]
        else:
            continue
        tensors = {}
        for name in files:
            if not (src / name).is_file():
                raise conv.ConversionError(
                    f"{src / name}, a shard {index.name} names, does not exist; the download "
                    f"is incomplete, fetch the missing file(s)")
            try:
                tensors.update(reader(src / name))
            except conv.ConversionError:
                raise
            except Exception as e:  # noqa: BLE001 - each reader's own error for a damaged file
                raise conv.ConversionError(
                    f"{src / name} cannot be read ({type(e).__name__}: {_first_line(e)}); the "
                    f"file is damaged or cut short, fetch it again") from e
        return hf_config, tensors
    raise conv.ConversionError(f"{src} has neither model.safetensors nor pytorch_model.bin "
                               f"(nor their .index.json)")


def _read_json(path: pathlib.Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise conv.ConversionError(f"{path} is not valid JSON ({_first_line(e)})") from e
    if not isinstance(data, dict):
        raise conv.ConversionError(f"{path} holds a JSON {type(data).__name__}, not an object")
    return data


def _first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [""])[0][:200]


def _without_spec(reason: str) -> str:
    """A TensorStore error's reason without the whole spec it appends."""
    return reason.split(" [tensorstore_spec=")[0]


def _hf_vocabulary(src: pathlib.Path) -> str | None:
    if (src / "spiece.model").is_file():
        return str(src / "spiece.model")
    tokenizer = src / "tokenizer_config.json"
    if tokenizer.is_file() and "ByT5" in _read_json(tokenizer).get(
            "tokenizer_class", ""):
        return "byte"
    return None


def write_hf(dst: pathlib.Path, cfg: T5Config, params: dict, vocabulary: str | None,
             model_type: str | None = None) -> list[str]:
    """Write config.json, model.safetensors and the tokenizer files; returns the file names."""
    safetensors = _safetensors()
    dst.mkdir(parents=True, exist_ok=True)
    tensors = conv.params_to_hf(params, cfg)
    # transformers refuses safetensors files without this metadata.
    safetensors.numpy.save_file(tensors, str(dst / "model.safetensors"),
                                metadata={"format": "pt"})
    (dst / "config.json").write_text(
        json.dumps(conv.t5_to_hf_config(cfg, model_type), indent=2) + "\n")
    # safetensors writes its file mode 0600 whatever the umask; give it config.json's mode, so
    # that whoever may read the model directory may read the weights too.
    (dst / "model.safetensors").chmod(stat.S_IMODE((dst / "config.json").stat().st_mode))
    files = ["config.json", "model.safetensors"]
    if vocabulary is not None:
        if vocabulary != "byte":
            shutil.copyfile(vocabulary, dst / "spiece.model")
            files.append("spiece.model")
        tokenizer = "ByT5Tokenizer" if vocabulary == "byte" else "T5Tokenizer"
        (dst / "tokenizer_config.json").write_text(
            json.dumps({"tokenizer_class": tokenizer}, indent=2) + "\n")
        files.append("tokenizer_config.json")
    return files


# ---------------------------------------------------------------------------------------------
# T5X: the native format (msgpack ``checkpoint`` file + TensorStore arrays) and Orbax trees.
# ---------------------------------------------------------------------------------------------

def _is_ts_spec(x: Any) -> bool:
    return isinstance(x, dict) and "driver" in x and ("kvstore" in x or "path" in x)


def _flatten_names(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict) and not _is_ts_spec(tree):
        flat = {}
        for key, value in tree.items():
            flat.update(_flatten_names(value, f"{prefix}{key}/"))
        return flat
    return {prefix[:-1]: tree}


def _read_ts(ckpt_dir: pathlib.Path, spec: dict) -> np.ndarray:
    """A TensorStore array written by T5X; its path is relative to the checkpoint directory."""
    import tensorstore as ts

    kvstore = spec.get("kvstore", {})
    relative = kvstore.get("path") or spec.get("path")
    local = {"driver": spec["driver"],
             "kvstore": {"driver": "file", "path": str(ckpt_dir / relative)}}
    try:
        return np.asarray(ts.open(local, open=True).result().read().result())
    except ValueError as e:  # TensorStore's error for a missing or damaged file
        why = _without_spec(_first_line(e))
        raise conv.ConversionError(
            f"T5X array {ckpt_dir / relative} cannot be read ({why}); the checkpoint is "
            f"damaged or cut short, copy it again") from e


def read_t5x(src: pathlib.Path, log: Log = _stderr) -> dict[str, np.ndarray]:
    """The parameters (``target``) of a T5X checkpoint as ``{"encoder/layers_0/...": array}``.

    ``src``: a ``checkpoint_<step>`` directory, the directory holding them (the latest
    complete one is taken), or an Orbax PyTree directory.
    """
    def complete(path: pathlib.Path) -> bool:
        return (path / "checkpoint").is_file() or (path / "_METADATA").is_file()

    if not complete(src):
        steps = sorted((int(p.name.split("_")[1]), p) for p in src.glob("checkpoint_*")
                       if p.name.split("_")[1].isdigit())
        if not steps:
            raise conv.ConversionError(
                f"{src} is not a T5X checkpoint (no 'checkpoint' file, no checkpoint_<step>/ "
                f"directories, no Orbax _METADATA)")
        done = [(step, p) for step, p in steps if complete(p)]
        newest = done[-1][0] if done else -1
        # Newer ones without either file: a save or a copy cut short.
        newer = [p.name for step, p in steps if step > newest]
        cut_short = (f"{', '.join(newer)} {'holds' if len(newer) == 1 else 'hold'} no "
                     f"'checkpoint' file or Orbax _METADATA")
        if not done:
            raise conv.ConversionError(f"{src} holds no complete T5X checkpoint: {cut_short}")
        if steps[-1][0] > newest:
            log(f"note: {cut_short} (incomplete): not read")
        src = done[-1][1]
        log(f"reading {src}")
    if (src / "checkpoint").is_file():
        from flax import serialization

        try:
            tree = serialization.msgpack_restore((src / "checkpoint").read_bytes())
        except Exception as e:  # noqa: BLE001 - msgpack's errors: a corrupt or foreign file
            raise conv.ConversionError(
                f"{src / 'checkpoint'} is not a readable T5X checkpoint ({type(e).__name__}: "
                f"{str(e)[:200]}); is the file complete?") from None
    else:
        import orbax.checkpoint as ocp

        from mtjax.checkpoint.failures import _short
        from mtjax.checkpoint.quiet import _note_failed_restore, _quiet_failed_reads

        _quiet_failed_reads()  # one line for a damaged tree, not one traceback per array
        with warnings.catch_warnings():
            # Without target shardings Orbax reads the saved ones, and says so in two lines
            # for every tree; conversion wants host arrays, so any layout does.
            warnings.filterwarnings("ignore", "Sharding info not provided", UserWarning)
            try:
                tree = ocp.PyTreeCheckpointer().restore(src)
            except Exception as e:  # noqa: BLE001 - Orbax's and TensorStore's, for damage
                _note_failed_restore()
                why = _without_spec(_short(e, 200))
                raise conv.ConversionError(
                    f"T5X checkpoint {src} cannot be read ({why}); it is damaged or cut "
                    f"short, copy it again") from None
    tree = tree.get("optimizer", tree)
    tree = tree.get("target", tree.get("params", tree))
    return {name: _read_ts(src, x) if _is_ts_spec(x) else np.asarray(x)
            for name, x in _flatten_names(tree).items()}


# ---------------------------------------------------------------------------------------------
# mtjax checkpoints
# ---------------------------------------------------------------------------------------------

def checkpoint_vocabulary(path: str | pathlib.Path) -> str | None:
    """The vocabulary of the checkpoint at ``path``: "byte", an absolute .model path, or None.

    The one its config records (a relative file resolved against the run directory); where it
    records none (``data.vocabulary`` unset: the run used its mixture's own vocabulary), the
    output vocabulary of the recorded mixture, where that mixture can still be found here.
    """
    from mtjax.checkpoint import find_state_dir, run_dir_of

    step_dir = find_state_dir(path).parent
    run_config = _read_json_item(step_dir / "config")
    vocabulary = run_config.get("data", {}).get("vocabulary")
    if vocabulary is None:
        return _mixture_vocabulary(run_config, step_dir)
    if vocabulary == "byte" or pathlib.Path(vocabulary).is_absolute():
        return vocabulary
    return str(run_dir_of(step_dir) / vocabulary)


def _mixture_vocabulary(run_config: dict[str, Any], step_dir: pathlib.Path) -> str | None:
    """The recorded mixture's output vocabulary: "byte" or its .model file; None where the
    config names no mixture, the mixture is not registered here, or its vocabulary is neither."""
    if not run_config.get("data", {}).get("mixture"):
        return None
    from mtjax.errors import UserError
    from mtjax.infer import load

    try:
        vocabulary = load.resolve_vocabulary(config_lib.from_dict(run_config), step_dir)
    except (UserError, ValueError, KeyError, ImportError, OSError) as e:
        # (convert then says how to pass one)
        _stderr(f"the run's mixture {run_config['data']['mixture']!r} cannot be looked up here "
                f"({str(e).split(' (the run')[0]}), so neither can its vocabulary")
        return None
    import seqio

    if isinstance(vocabulary, seqio.ByteVocabulary):
        return "byte"
    return getattr(vocabulary, "sentencepiece_model_file", None)


def _read_json_item(item_dir: pathlib.Path) -> dict[str, Any]:
    if not item_dir.is_dir():
        return {}
    from mtjax.checkpoint import read_json_item

    return read_json_item(item_dir)


def read_mtjax(src: pathlib.Path) -> tuple[T5Config, dict, dict[str, Any]]:
    """(model config, parameters as numpy, the run's config dict) of an mtjax checkpoint."""
    import jax

    from mtjax.checkpoint import find_state_dir, restore_params, run_dir_of, tree_metadata

    state_dir = find_state_dir(src)
    run_config = _read_json_item(state_dir.parent / "config")
    metadata = tree_metadata(state_dir)
    tree = getattr(metadata, "tree", metadata)
    cpu = jax.sharding.SingleDeviceSharding(jax.devices("cpu")[0])
    abstract = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=cpu),
                            tree["params"])
    params = conv.unflatten({p: np.asarray(x) for p, x in
                             conv.flatten(restore_params(state_dir.parent, abstract)).items()})
    model_file = run_dir_of(state_dir.parent) / MODEL_CONFIG_FILE
    model = run_config.get("model", {})
    if model_file.is_file():
        cfg = read_architecture(model_file)  # (the dropout as converted: the run's own wins)
        cfg = dataclasses.replace(cfg, dropout_rate=model.get("dropout_rate", cfg.dropout_rate))
    else:
        try:
            cfg = get_config(model.get("name", ""))
            cfg = dataclasses.replace(
                cfg, vocab_size=params["token_embedder"]["embedding"].shape[0],
                dropout_rate=model.get("dropout_rate", 0.0))
        except KeyError:
            cfg = conv.infer_config(params)
    conv.check_params(params, cfg, f"checkpoint {state_dir}")
    return cfg, params, run_config


def write_mtjax(dst: pathlib.Path, cfg: T5Config, params: dict, vocabulary: str,
                source: dict[str, str]) -> str | None:
    """Write an mtjax checkpoint of ``params`` into ``dst``; returns the named size (or None)."""
    import jax

    from mtjax.checkpoint import RunCheckpoints

    if (dst / "checkpoints").exists() and any((dst / "checkpoints").iterdir()):
        raise conv.ConversionError(f"{dst} already holds checkpoints; give a new directory")
    dst.mkdir(parents=True, exist_ok=True)
    if vocabulary != "byte":
        shutil.copyfile(vocabulary, dst / pathlib.Path(vocabulary).name)
        vocabulary = pathlib.Path(vocabulary).name  # relative to dst: the directory can move
    named = conv.match_named_size(cfg)
    base = config_lib.Config()
    run_config = dataclasses.replace(
        base, model=dataclasses.replace(base.model, name=named or "custom",
                                        dropout_rate=cfg.dropout_rate),
        data=dataclasses.replace(base.data, vocabulary=vocabulary))
    (dst / MODEL_CONFIG_FILE).write_text(json.dumps(
        {"t5_config": dataclasses.asdict(cfg), "named_size": named, "source": source},
        indent=2) + "\n")
    cpu = jax.devices("cpu")[0]
    state = {"params": jax.tree.map(lambda x: jax.device_put(x, cpu), params)}
    checkpoints = RunCheckpoints(dst, every_steps=1, keep=1, async_save=False)
    checkpoints.save(0, state, None, config_lib.to_dict(run_config), force=True)
    checkpoints.close()
    return named


# ---------------------------------------------------------------------------------------------
# mtjax convert
# ---------------------------------------------------------------------------------------------

def _saved_model_type(src: pathlib.Path, cfg: T5Config) -> str | None:
    """The Hugging Face model type to export as: the one imported from, else by named size."""
    from mtjax.checkpoint import find_state_dir, run_dir_of

    model_file = run_dir_of(find_state_dir(src).parent) / MODEL_CONFIG_FILE
    if model_file.is_file():
        saved = json.loads(model_file.read_text()).get("source", {}).get("model_type")
        if saved:
            return saved
    named = conv.match_named_size(cfg) or ""
    return "mt5" if named.startswith("mt5") else None


def detect_format(src: pathlib.Path) -> str:
    """"hf", "t5x" or "mtjax", from the files in ``src``."""
    weights = any(src.glob("*.safetensors*")) or any(src.glob("pytorch_model.bin*"))
    if (src / "config.json").is_file() and weights:
        return "hf"
    if (src / "checkpoints").is_dir() or (src / "state").is_dir():
        return "mtjax"
    from mtjax.checkpoint import is_state_item

    if is_state_item(src):
        return "mtjax"
    if (src / "checkpoint").is_file() or any(src.glob("checkpoint_*")) or (
            src / "_METADATA").is_file():
        return "t5x"
    if (src / "config.json").is_file():
        raise conv.ConversionError(
            f"{src} has a config.json but no weights (model.safetensors, pytorch_model.bin or "
            f"their sharded .index.json); copy the weight files next to it")
    raise conv.ConversionError(f"cannot tell the format of {src}; pass --from hf|t5x|mtjax")


# The sentinels <extra_id_0..99> mtjax adds on top of a SentencePiece model's pieces
# (mtjax.data.vocab.EXTRA_IDS; not imported: that package starts seqio and TensorFlow).
SENTINELS = 100


def vocabulary_size(vocabulary: str) -> int:
    """The size of the vocabulary `mtjax train` makes of this file: a SentencePiece model's
    pieces plus the 100 sentinels (T5's 32,000 + 100, in 32,128 embedding rows)."""
    if vocabulary == "byte":
        return 259  # seqio.ByteVocabulary: pad, eos, unk, then 256 bytes
    import sentencepiece

    pieces = sentencepiece.SentencePieceProcessor(model_file=vocabulary).get_piece_size()
    return pieces + SENTINELS


def _check_vocabulary(vocab: str | None) -> str | None:
    if vocab is None or vocab == "byte":
        return vocab
    if not pathlib.Path(vocab).is_file():
        raise conv.ConversionError(f"--vocab {vocab!r} is neither 'byte' nor an existing "
                                   f"SentencePiece .model file")
    import sentencepiece

    try:
        sentencepiece.SentencePieceProcessor(model_file=vocab)
    except Exception as e:  # noqa: BLE001 - sentencepiece raises RuntimeError/OSError
        raise conv.ConversionError(f"--vocab {vocab!r} is not a SentencePiece model "
                                   f"({str(e).splitlines()[0][:120]})") from None
    return str(pathlib.Path(vocab).absolute())


def convert(src: str | pathlib.Path, dst: str | pathlib.Path, *, from_format: str | None = None,
            to_format: str = "mtjax", vocab: str | None = None,
            log: Log = _stderr) -> dict[str, Any]:
    """Convert the checkpoint ``src`` into ``dst``; returns a summary (JSON-able).

    Args:
        src: Hugging Face model directory, T5X checkpoint, or mtjax run/checkpoint directory.
        dst: output directory.
        from_format: "hf", "t5x" or "mtjax"; None detects it.
        to_format: "mtjax" (a checkpoint for ``mtjax train --init-from``) or "hf".
        vocab: "byte" or a SentencePiece .model file; default: the one that comes with ``src``.
        log: progress messages.
    """
    src, dst = pathlib.Path(src).absolute(), pathlib.Path(dst).absolute()
    if not src.exists():
        raise conv.ConversionError(f"{src} does not exist")
    if not src.is_dir():
        raise conv.ConversionError(f"{src} is a file; give the directory of a Hugging Face "
                                   f"model, a T5X checkpoint or an mtjax run")
    if dst.exists() and not dst.is_dir():
        raise conv.ConversionError(f"{dst} is a file; give a new or empty directory")
    if dst.exists() and any(dst.iterdir()):
        raise conv.ConversionError(f"{dst} is not empty; give a new or empty directory")
    from_format = from_format or detect_format(src)
    vocab = _check_vocabulary(vocab)
    if from_format == "hf":
        vocab = vocab or _hf_vocabulary(src)
    if to_format == "mtjax" and vocab is None and from_format in ("hf", "t5x"):
        raise _no_vocabulary(src)  # now, not after reading the weights (minutes, when large)
    model_type = None
    log(f"reading {from_format} checkpoint {src}")
    if from_format == "hf":
        hf_config, tensors = read_hf(src)
        cfg = conv.hf_config_to_t5(hf_config)
        params = conv.hf_to_params(tensors, cfg)
        model_type = hf_config.get("model_type")
    elif from_format == "t5x":
        params = conv.t5x_to_params(read_t5x(src, log))
        cfg = conv.infer_config(params)
        conv.check_params(params, cfg, "T5X checkpoint")
    elif from_format == "mtjax":
        cfg, params, _ = read_mtjax(src)
        vocab = vocab or checkpoint_vocabulary(src)
        model_type = _saved_model_type(src, cfg)
    else:
        raise conv.ConversionError(f"--from {from_format!r}: choose hf, t5x or mtjax")
    summary: dict[str, Any] = {
        "source": str(src), "from": from_format, "destination": str(dst), "to": to_format,
        "parameters": int(sum(x.size for x in conv.flatten(params).values())),
        "model_config": dataclasses.asdict(cfg), "vocabulary": vocab,
    }
    if to_format == "hf":
        log(f"writing Hugging Face model to {dst}")
        summary["files"] = write_hf(dst, cfg, params, vocab, model_type)
        if vocab is None:
            log("no vocabulary known: wrote no tokenizer files (pass --vocab FILE|byte)")
        return summary
    if to_format != "mtjax":
        raise conv.ConversionError(f"--to {to_format!r}: choose mtjax or hf")
    if vocab is None:
        raise _no_vocabulary(src)
    padded = -(-vocabulary_size(vocab) // 128) * 128
    if padded != cfg.vocab_size:
        # mtjax train sizes the embedding from the data's vocabulary (rounded up to 128).
        log(f"note: the model has {cfg.vocab_size} embedding rows but mtjax train would make "
            f"{padded} for this vocabulary, so --init-from will not fit it")
    log(f"writing mtjax checkpoint to {dst}")
    source = {"format": from_format, "path": str(src)}
    if model_type:
        source["model_type"] = model_type  # "mt5" stays "mt5" when exported again
    summary["model"] = write_mtjax(dst, cfg, params, vocab, source)
    summary["checkpoint"] = str(dst / "checkpoints" / "0")
    return summary


def _no_vocabulary(src: pathlib.Path) -> conv.ConversionError:
    return conv.ConversionError(
        f"no vocabulary found with {src}; pass --vocab FILE (a SentencePiece .model) or "
        f"--vocab byte, so that the vocabulary travels with the checkpoint")
