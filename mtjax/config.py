"""The config schema: frozen, typed dataclasses; loading, dotted overrides, validation, dumping.

A config file in ``configs/`` is a Python file defining ``get_config() -> Config``. On the command
line, ``section.key=value`` overrides are parsed to the field's type; a misspelt key or a value of
the wrong type raises :class:`ConfigError` naming the key (and the closest valid key), which the
CLI turns into exit code 2.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.util
import json
import math
import pathlib
import types
import typing
from collections.abc import Sequence
from typing import Any

from mtjax.errors import UserError


class ConfigError(UserError, ValueError):
    """A user mistake in a config file or override; the message names the key and the fix."""


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    steps: int = 200
    batch_size: int = 16  # global, across all hosts
    seed: int = 0
    microbatches: int = 1  # gradient accumulation inside the compiled step
    z_loss: float = 1e-4
    # T5X's label smoothing: soft targets 1 - ls on the target, ls / (V - 1) elsewhere; 0: none.
    label_smoothing: float = 0.0
    # What the loss sum is divided by before differentiating: a positive number, that constant
    # (T5X's loss_normalizing_factor); 0, what loss_normalization names. Logged losses stay
    # per-token means either way.
    loss_normalizing_factor: float = 0.0
    # T5X's named factors: "tokens" (the batch's loss-weighted target tokens, a per-token mean:
    # NUM_REAL_TARGET_TOKENS), "total_tokens" (batch size x targets length, padding included:
    # NUM_TOTAL_TARGET_TOKENS), "per_sequence" (each sequence's mean loss, averaged over the
    # sequences, so short and long examples count alike: AVERAGE_PER_SEQUENCE).
    loss_normalization: str = "tokens"
    on_nonfinite: str = "stop"  # "stop" | "skip": what a NaN/Inf loss does
    # The loss over the logits: "xla", or "cpu_fused" (mtjax's in-place CPU kernel,
    # mtjax/kernels; AVX-512 or AVX2; needs a vocabulary the mesh rules do not split);
    # "auto": cpu_fused where it can run, else xla.
    # Same numbers (tested).
    cross_entropy: str = "auto"
    # JAX's persistent compilation cache, so a restarted run loads its compiled step instead of
    # compiling it again: "auto" (~/.cache/mtjax/jax on GPU and TPU, none on CPU, or JAX's own
    # JAX_COMPILATION_CACHE_DIR where set), "off", or a directory (any backend).
    compilation_cache: str = "auto"


@dataclasses.dataclass(frozen=True)
class DataConfig:
    mixture: str = "mtjax_demo"
    inputs_length: int = 128
    targets_length: int = 64
    pack: bool = True
    tasks_module: str | None = None  # module path or .py file registering the user's tasks
    # "byte" or a local SentencePiece .model file, for tasks built from files and for models
    # converted from other frameworks; None: the mixture's own output-feature vocabulary.
    vocabulary: str | None = None
    # T5 §3.5.2 mixing: "mixture" (the registered mixture's own rates), "examples_proportional"
    # (min(e_m, K)), "temperature" (proportional rates ** 1/T), "equal"; over the leaf tasks.
    mixing: str = "mixture"
    mixing_cap: int | None = None  # K for examples_proportional/temperature; None: no cap
    mixing_temperature: float = 2.0  # T for "temperature"
    on_malformed: str = "fail"  # "fail" | "skip": malformed lines in file tasks (helper default)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    name: str = "t5_1_1_tiny"
    dtype: str = "float32"  # activations; parameters stay float32
    dropout_rate: float = 0.0
    remat: str = "none"  # "none" | "dots_saveable" | "full"
    # Layers as one nnx.scan over stacked parameters (a leading "layers" axis): compile time no
    # longer grows with depth. Checkpoints and conversions keep the unrolled layout either way.
    scan_layers: bool = False
    # "xla": mtjax's einsum/softmax; "dot_product": jax.nn.dot_product_attention (cuDNN flash
    # attention on GPU in bf16 where the bias allows, else its XLA path). Same numbers (tested).
    # "cpu_fused": mtjax's fused CPU kernel (mtjax/kernels; AVX-512 or AVX2, float32; on a mesh
    # each device runs it on its own batch rows and heads).
    # "auto": dot_product on GPU with bfloat16 activations (1.35x on an H200), cpu_fused where
    # it can run, else xla.
    attention: str = "auto"
    # Kernel gradients of dense layers: "transposed" copies the activations' transpose out
    # first so XLA:CPU's matmul library takes the dot (1.20x on the CPU peer step); "auto":
    # transposed on CPU, plain autodiff ("xla") elsewhere. Same numbers (tested).
    weight_grad: str = "auto"


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    name: str = "adafactor"  # "adafactor" | "adamw"
    # "auto": T5's rsqrt for adafactor, warmup + cosine for adamw; or "rsqrt", "constant" (T5's
    # fine-tuning), "linear" (to 0 at train.steps), "cosine" (to a tenth at train.steps).
    schedule: str = "auto"
    learning_rate: float = 0.01
    warmup_steps: int = 100
    weight_decay: float = 0.0
    grad_clip_norm: float = 1.0  # 0 disables clipping
    # Storage dtype of the optimizer's first moments (AdamW's mu); the update itself is computed
    # in float32, and second moments stay float32. "bfloat16" cuts AdamW's state by a quarter.
    state_dtype: str = "float32"


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    every_steps: int = 100
    keep: int = 3  # the latest K are kept ...
    keep_best: int = 0  # ... plus the best M by best_metric (0: none)
    best_metric: str = "loss"  # a key of metrics.jsonl at the saved step, e.g. eval/<task>/...
    best_mode: str = "min"  # "min" | "max"
    async_save: bool = True


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    data: int = 1
    fsdp: int = -1  # -1: all remaining devices
    tensor: int = 1
    # A preset ("data" | "fsdp" | "fsdp_tensor") or a table "logical=axis[+axis],..."
    rules: str = "fsdp"
    # Across slices (TPU multi-slice) or hosts (GPU nodes): each axis's total size is ici * dcn.
    dcn_data: int = 1
    dcn_fsdp: int = 1
    dcn_tensor: int = 1


@dataclasses.dataclass(frozen=True)
class LogConfig:
    every_steps: int = 10
    tensorboard: bool = True
    # Every host also writes processes/process_<i>.jsonl (its loss, hashes of the examples it
    # read): for checking multi-host runs.
    all_processes: bool = False
    # Trace this many training steps with JAX's profiler into profile/ (TensorBoard, XProf,
    # Perfetto); 0: none. The first profile_skip_steps steps of the process are not traced.
    profile_steps: int = 0
    profile_skip_steps: int = 2


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    # Each task's seqio metric_fns on its eval split (seqio.Evaluator), decoded with the cache.
    # The task or mixture evaluated; None: data.mixture. Another one tracks held-out tasks
    # (zero-shot transfer) while training; its tasks must use the training vocabulary.
    mixture: str | None = None
    every_steps: int = 0  # evaluate every N steps during training; 0: never periodically
    at_end: bool = True  # also evaluate after the last step (per-task metrics in the summary)
    split: str = "validation"
    max_examples: int = 100  # first N examples of each task's split; 0: all
    batch_size: int = 32  # sequences per decoding/scoring batch (global)
    beam_size: int = 1  # 1: greedy
    alpha: float = 0.6  # beam search length penalty ((5 + len) / 6) ** alpha
    max_decode_length: int = 0  # 0: each task's longest target
    # Also each task's teacher-forced cross-entropy per target token and token accuracy
    # (T5X's train_eval) on the same examples cut at data.inputs_length/targets_length:
    # eval/<task>/loss and eval/<task>/token_accuracy, for every task with the split.
    loss: bool = True


@dataclasses.dataclass(frozen=True)
class Config:
    train: TrainConfig = TrainConfig()
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    optim: OptimConfig = OptimConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    mesh: MeshConfig = MeshConfig()
    log: LogConfig = LogConfig()
    eval: EvalConfig = EvalConfig()


_CHOICES = {
    "optim.name": ("adafactor", "adamw"),
    "optim.schedule": ("auto", "rsqrt", "constant", "linear", "cosine"),
    "model.dtype": ("float32", "bfloat16"),
    "model.remat": ("none", "dots_saveable", "full"),
    "model.attention": ("auto", "xla", "dot_product", "cpu_fused"),
    "model.weight_grad": ("auto", "xla", "transposed"),
    "optim.state_dtype": ("float32", "bfloat16"),
    "train.on_nonfinite": ("stop", "skip"),
    "train.cross_entropy": ("auto", "xla", "cpu_fused"),
    "train.loss_normalization": ("tokens", "total_tokens", "per_sequence"),
    "data.mixing": ("mixture", "examples_proportional", "temperature", "equal"),
    "data.on_malformed": ("fail", "skip"),
    "checkpoint.best_mode": ("min", "max"),
}
_MAX_INT = 2**63 - 1  # what numpy and JAX take for a seed or a count
_MAX_LENGTH = 2**20  # tokens: far past any T5 run, and short of the overflow in the position tables
# Longest decode (mtjax.infer.decode): the KV cache is allocated for the whole length up front,
# and far beyond this XLA aborts the process on the buffer's size instead of raising an error.
MAX_DECODE_LENGTH = 65536
_POSITIVE = ("train.steps", "train.batch_size", "train.microbatches", "data.inputs_length",
             "data.targets_length", "checkpoint.every_steps", "checkpoint.keep", "log.every_steps")


def all_keys(config: Config | None = None) -> list[str]:
    """Every dotted key, e.g. ``train.steps``."""
    config = config or Config()
    return [f"{s.name}.{f.name}" for s in dataclasses.fields(config)
            for f in dataclasses.fields(getattr(config, s.name))]


def keys_help(width: int = 100) -> str:
    """Every config key with its default, a paragraph per section (for ``--help``)."""
    import textwrap

    blocks, defaults = [], Config()
    for section in dataclasses.fields(Config):
        values = getattr(defaults, section.name)
        items = [f"{section.name}.{f.name}={getattr(values, f.name)}"
                 for f in dataclasses.fields(values)]
        blocks.append(textwrap.fill("  ".join(items), width=width, initial_indent="  ",
                                    subsequent_indent="  ", break_on_hyphens=False))
    return "config keys (KEY=VALUE; the defaults shown; the README's tables say what each " \
           "does):\n" + "\n".join(blocks)


def _field_type(section_cls: type, name: str) -> Any:
    return typing.get_type_hints(section_cls)[name]


def _unwrap_optional(annotation: Any) -> tuple[Any, bool]:
    """(the type inside ``X | None``, True), or (``annotation``, False)."""
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        return next(a for a in typing.get_args(annotation) if a is not type(None)), True
    return annotation, False


def _parse_value(key: str, text: str, annotation: Any) -> Any:
    """Parse ``text`` to ``annotation`` (int, float, bool, str or Optional of one)."""
    annotation, optional = _unwrap_optional(annotation)
    if optional and text.lower() in ("none", "null", ""):
        return None
    try:
        if annotation is bool:
            lowered = text.lower()
            if lowered in ("true", "1", "yes"):
                return True
            if lowered in ("false", "0", "no"):
                return False
            raise ValueError
        if annotation is int:
            return int(text)
        if annotation is float:
            return float(text)
        return str(text)
    except ValueError:
        raise ConfigError(
            f"config key {key!r} expects {annotation.__name__}, got {text!r}"
        ) from None


def _unknown_key(key: str) -> ConfigError:
    close = difflib.get_close_matches(key, all_keys(), n=1, cutoff=0.5)
    if close:
        return ConfigError(f"unknown config key {key!r}; did you mean {close[0]!r}?")
    sections = [f.name for f in dataclasses.fields(Config)]
    section, _, _ = key.partition(".")
    if section not in sections:
        return ConfigError(f"unknown config key {key!r}: there is no section {section!r} (the "
                           f"sections are {', '.join(sections)}; `mtjax train --help` lists "
                           f"every key)")
    keys = [k for k in all_keys() if k.startswith(section + ".")]
    return ConfigError(f"unknown config key {key!r}; the keys of {section!r} are "
                       f"{', '.join(keys)}")


def apply_overrides(config: Config, overrides: Sequence[str]) -> Config:
    """Apply ``section.key=value`` strings, type-checked, in order: a later value of a key wins
    (how launch scripts put the user's overrides after their defaults)."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form section.key=value")
        key, text = item.split("=", 1)
        key = key.strip()
        section_name, _, field_name = key.partition(".")
        section = getattr(config, section_name, None) if section_name else None
        if (section is None or not dataclasses.is_dataclass(section)
                or field_name not in {f.name for f in dataclasses.fields(section)}):
            raise _unknown_key(key)
        if key in _LOSS_NORMALIZATION_KEYS:  # before the float parser's "expects float"
            _refuse_t5x_factor_name(key, text.strip())
        value = _parse_value(key, text.strip(), _field_type(type(section), field_name))
        config = dataclasses.replace(
            config, **{section_name: dataclasses.replace(section, **{field_name: value})})
    return validate(config)


# The keys where T5X's users put its named factors (a gin habit).
_LOSS_NORMALIZATION_KEYS = ("train.loss_normalizing_factor", "train.loss_normalization")
# T5X's SpecialLossNormalizingFactor names, and the train.loss_normalization value of each.
_T5X_LOSS_NORMALIZATIONS = {"NUM_REAL_TARGET_TOKENS": "tokens",
                            "NUM_TOTAL_TARGET_TOKENS": "total_tokens",
                            "AVERAGE_PER_SEQUENCE": "per_sequence"}


def _refuse_t5x_factor_name(key: str, text: str) -> None:
    """A T5X gin habit (``loss_normalizing_factor='AVERAGE_PER_SEQUENCE'``) answered with the
    setting that does it here."""
    name = text.strip("'\"").upper()
    if name in _T5X_LOSS_NORMALIZATIONS:
        raise ConfigError(f"{key}={text}: T5X's {name} is "
                          f"train.loss_normalization={_T5X_LOSS_NORMALIZATIONS[name]} in mtjax "
                          f"(train.loss_normalizing_factor takes a constant)")


def repeated_keys(overrides: Sequence[str]) -> list[str]:
    """One note per key that ``overrides`` (a user's command line) sets more than once."""
    given: dict[str, list[str]] = {}
    for item in overrides:
        if "=" in item:
            given.setdefault(item.split("=", 1)[0].strip(), []).append(item)
    return [f"{key} is given {len(items)} times ({' '.join(items)}); the last one counts"
            for key, items in given.items() if len(items) > 1]


def unused_settings(config: Config) -> list[str]:
    """Notes on values set away from their defaults that the rest of the config makes moot."""
    data, default = config.data, DataConfig()
    notes = []
    if data.mixing_cap != default.mixing_cap and data.mixing not in (
            "examples_proportional", "temperature"):
        notes.append(f"data.mixing_cap={data.mixing_cap} is not used with "
                     f"data.mixing={data.mixing} (only examples_proportional and temperature)")
    if data.mixing_temperature != default.mixing_temperature and data.mixing != "temperature":
        notes.append(f"data.mixing_temperature={data.mixing_temperature} is not used with "
                     f"data.mixing={data.mixing} (only temperature)")
    return notes


def _check_types(config: Config) -> Config:
    """Each field's value against its annotation, for configs built in Python (``get_config()``,
    config.json), which the override parser never saw. An int where a float is expected is
    taken as that float; anything else of the wrong type is a :class:`ConfigError`."""
    for section_field in dataclasses.fields(Config):
        section = getattr(config, section_field.name)
        if not dataclasses.is_dataclass(section):
            raise ConfigError(f"config section {section_field.name!r} is a "
                              f"{type(section).__name__}, not mtjax's "
                              f"{section_field.name.capitalize()}Config")
        fixed = {}
        for field in dataclasses.fields(section):
            key = f"{section_field.name}.{field.name}"
            value = getattr(section, field.name)
            annotation, optional = _unwrap_optional(_field_type(type(section), field.name))
            if optional and value is None:
                continue
            if key in _LOSS_NORMALIZATION_KEYS and isinstance(value, str):
                _refuse_t5x_factor_name(key, value)  # as the command line answers it
            if annotation is float and type(value) is int:
                fixed[field.name] = float(value)
            elif not (type(value) is annotation
                      or (annotation is float and isinstance(value, float))):
                expected = annotation.__name__ + (" or None" if optional else "")
                raise ConfigError(f"config key {key!r} expects {expected}, got {value!r} "
                                  f"({type(value).__name__})")
        if fixed:
            config = dataclasses.replace(
                config, **{section_field.name: dataclasses.replace(section, **fixed)})
    return config


def validate(config: Config) -> Config:
    """Check types, choices and ranges; returns ``config`` (ints given for floats made floats)."""
    config = _check_types(config)
    for key, choices in _CHOICES.items():
        value = get(config, key)
        if value not in choices:
            raise ConfigError(f"config key {key!r} must be one of {choices}, got {value!r}")
    for key in _POSITIVE:
        if get(config, key) <= 0:
            raise ConfigError(f"config key {key!r} must be positive, got {get(config, key)}")
    for key in ("mesh.data", "mesh.fsdp", "mesh.tensor"):
        if get(config, key) == 0 or get(config, key) < -1:
            raise ConfigError(f"config key {key!r} must be positive or -1, got {get(config, key)}")
    for key in ("mesh.dcn_data", "mesh.dcn_fsdp", "mesh.dcn_tensor"):
        if get(config, key) < 1:
            raise ConfigError(f"config key {key!r} must be positive, got {get(config, key)}")
    if config.data.mixing_cap is not None and config.data.mixing_cap < 1:
        raise ConfigError(f"config key 'data.mixing_cap' must be positive (or None: no cap), "
                          f"got {config.data.mixing_cap}")
    if config.checkpoint.keep_best < 0:
        raise ConfigError("config key 'checkpoint.keep_best' must be >= 0")
    _check_ranges(config)
    _validate_rules(config.mesh.rules)
    for key in ("eval.every_steps", "eval.max_examples"):  # the others in _RANGES
        if get(config, key) < 0:
            raise ConfigError(f"config key {key!r} must be >= 0, got {get(config, key)}")
    for key in ("eval.batch_size", "eval.beam_size"):
        if get(config, key) < 1:
            raise ConfigError(f"config key {key!r} must be positive, got {get(config, key)}")
    cache = config.train.compilation_cache
    if not cache.strip() or (cache not in ("auto", "off") and "://" not in cache
                             and pathlib.Path(cache).expanduser().is_file()):
        raise ConfigError(f"config key 'train.compilation_cache' must be 'auto', 'off' or a "
                          f"directory, got {cache!r}")
    if config.optim.state_dtype != "float32" and config.optim.name == "adafactor":
        raise ConfigError(
            f"optim.state_dtype={config.optim.state_dtype} stores first moments (momentum) in "
            f"that dtype, and adafactor keeps none: its state is second-moment statistics, which "
            f"stay float32 (rounded to bfloat16 after every step they stop decaying); drop "
            f"optim.state_dtype, or use optim.name=adamw")
    if config.train.label_smoothing and config.train.cross_entropy == "cpu_fused":
        raise ConfigError(smoothing_without_kernel(config.train.label_smoothing))
    if config.train.loss_normalizing_factor and config.train.loss_normalization != "tokens":
        raise ConfigError(
            f"train.loss_normalizing_factor={config.train.loss_normalizing_factor} divides the "
            f"loss by that constant, and train.loss_normalization="
            f"{config.train.loss_normalization} by a count of the batch; set only one")
    if config.train.batch_size % config.train.microbatches:
        raise ConfigError(
            f"train.batch_size={config.train.batch_size} is not divisible by "
            f"train.microbatches={config.train.microbatches}"
        )
    return config


# key -> (least, whether least itself is allowed, most, whether most is); NaN and infinities are
# refused too.
_RANGES = {
    "optim.learning_rate": (0.0, True, math.inf, False),  # 0: weights stay (a check, a probe)
    "optim.weight_decay": (0.0, True, math.inf, False),
    "optim.grad_clip_norm": (0.0, True, math.inf, False),  # 0 disables clipping
    "optim.warmup_steps": (0, True, _MAX_INT, True),
    "train.z_loss": (0.0, True, math.inf, False),
    "train.label_smoothing": (0.0, True, 1.0, False),  # 1 would leave no weight on the target
    "train.loss_normalizing_factor": (0.0, True, math.inf, False),  # 0: the token count
    "train.seed": (-_MAX_INT, True, _MAX_INT, True),
    "model.dropout_rate": (0.0, True, 1.0, False),
    "data.inputs_length": (1, True, _MAX_LENGTH, True),
    "data.targets_length": (1, True, _MAX_LENGTH, True),
    "data.mixing_temperature": (0.0, False, math.inf, False),
    "eval.alpha": (0.0, True, math.inf, False),
    # Refused here, not at the first evaluation hours into the run.
    "eval.max_decode_length": (0, True, MAX_DECODE_LENGTH, True),
    "log.profile_steps": (0, True, _MAX_INT, True),
    "log.profile_skip_steps": (0, True, _MAX_INT, True),
}


def smoothing_without_kernel(label_smoothing: float) -> str:
    """Why train.cross_entropy=cpu_fused cannot run with label smoothing, and what to do."""
    return (f"train.cross_entropy=cpu_fused has no label smoothing "
            f"(train.label_smoothing={label_smoothing}); use train.cross_entropy=auto or xla, "
            f"or train.label_smoothing=0")


def _check_ranges(config: Config) -> None:
    for key, (least, least_ok, most, most_ok) in _RANGES.items():
        value = get(config, key)
        above = value >= least if least_ok else value > least
        below = value <= most if most_ok else value < most
        if not (above and below and math.isfinite(value)):
            upper = ("" if most == math.inf else
                     f" and at most {most}" if most_ok else f" and below {most:g}")
            raise ConfigError(f"config key {key!r} must be a finite number "
                              f"{'>=' if least_ok else '>'} {least}{upper}, got {value}")


def _validate_rules(rules: str) -> None:
    presets = ("data", "fsdp", "fsdp_tensor")
    if "=" not in rules:
        if rules not in presets:
            raise ConfigError(f"config key 'mesh.rules' must be a preset {presets} or a table "
                              f"'logical=axis,...' (e.g. 'batch=data+fsdp,embed=fsdp'), "
                              f"got {rules!r}")
        return
    from mtjax.parallel import mesh as mesh_lib  # imports JAX: only for user-written tables

    try:
        mesh_lib.get_rules(rules)
    except mesh_lib.MeshError as e:
        raise ConfigError(str(e)) from None


def get(config: Config, key: str) -> Any:
    section, _, name = key.partition(".")
    return getattr(getattr(config, section), name)


def load(path: str | pathlib.Path | None = None, overrides: Sequence[str] = ()) -> Config:
    """Load a config file (``get_config()``; default: the demo) and apply overrides."""
    config = Config()
    if path is not None:
        path = pathlib.Path(path)
        if path.is_dir():
            raise ConfigError(f"config file {str(path)!r} is a directory; give a .py file "
                              f"defining get_config()")
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} does not exist")
        if path.suffix != ".py":
            # A run's config.json is a record of what ran, not an input.
            raise ConfigError(f"config file {str(path)!r} is not a .py file; give a Python "
                              f"file defining get_config() (a run's config.json records what "
                              f"ran: re-run the run's command to resume it)")
        spec = importlib.util.spec_from_file_location(f"mtjax_config_{path.stem}", path)
        module = importlib.util.module_from_spec(spec)
        try:
            spec.loader.exec_module(module)
        except Exception as e:  # noqa: BLE001 - a broken user file is a config error
            raise ConfigError(f"config file {str(path)!r} failed to load: {e}") from e
        if not hasattr(module, "get_config"):
            raise ConfigError(f"config file {str(path)!r} defines no get_config()")
        try:
            config = module.get_config()
        except Exception as e:  # noqa: BLE001 - the user's function failed
            # T5X and ml_collections configs are assigned to; these are frozen dataclasses.
            fix = ("; the config is frozen: build it, e.g. Config(train=TrainConfig(steps=1000)), "
                   "or copy it with dataclasses.replace"
                   if isinstance(e, dataclasses.FrozenInstanceError) else "")
            raise ConfigError(f"get_config() in {str(path)!r} failed: "
                              f"{type(e).__name__}: {e}{fix}") from e
        if not isinstance(config, Config):
            raise ConfigError(
                f"get_config() in {str(path)!r} returned {type(config).__name__}, not mtjax Config"
            )
    return _absolute_paths(apply_overrides(validate(config), overrides))


def _absolute_paths(config: Config) -> Config:
    """A ``data.tasks_module`` ``.py`` file or a ``data.vocabulary`` file given relative to the
    current directory, made absolute: the run records them in config.json and its checkpoints,
    and ``mtjax eval`` of the run may start in another directory. Names that are not files here
    are left as given (the import or the vocabulary lookup says what is wrong)."""
    data = config.data
    files = {"tasks_module": data.tasks_module if (data.tasks_module or "").endswith(".py")
             else None,
             "vocabulary": data.vocabulary if data.vocabulary != "byte" else None}
    paths = {key: pathlib.Path(value).expanduser() for key, value in files.items() if value}
    changes = {key: str(path.resolve()) for key, path in paths.items()
               if not path.is_absolute() and path.is_file()}
    if not changes:
        return config
    return dataclasses.replace(config, data=dataclasses.replace(data, **changes))


def to_dict(config: Config) -> dict[str, Any]:
    return dataclasses.asdict(config)


def from_dict(data: dict[str, Any]) -> Config:
    """Inverse of :func:`to_dict`; unknown keys are an error."""
    sections = {}
    for f in dataclasses.fields(Config):
        cls = f.type if isinstance(f.type, type) else typing.get_type_hints(Config)[f.name]
        values = dict(data.get(f.name, {}))
        known = {g.name for g in dataclasses.fields(cls)}
        for key in values:
            if key not in known:
                raise _unknown_key(f"{f.name}.{key}")
        sections[f.name] = cls(**values)
    return validate(_upgrade_record(Config(**sections)))


def _upgrade_record(config: Config) -> Config:
    """A config recorded by an older mtjax, read as this version reads its settings.

    Before 2026-12-06, ``optim.state_dtype=bfloat16`` with Adafactor was accepted (it rounded
    the second moments); now the setting stores first moments only, which Adafactor has none
    of, and :func:`validate` refuses the pair. A record is not the user's to change, so it reads
    as float32, which is what that state restores to (eval, infer, score, convert, resume)."""
    if config.optim.name == "adafactor" and config.optim.state_dtype != "float32":
        config = dataclasses.replace(
            config, optim=dataclasses.replace(config.optim, state_dtype="float32"))
    return config


def dump(config: Config, path: str | pathlib.Path, resolved: dict | None = None) -> None:
    """Write ``config`` as JSON; ``resolved``: what its ``auto`` settings became, as a section
    of its own."""
    record = to_dict(config) | ({"resolved": resolved} if resolved else {})
    pathlib.Path(path).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
