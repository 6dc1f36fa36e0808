"""The training loop, top to bottom in named sections.

Start-up order (a decision, numbered): 1. resume from the run's latest checkpoint, 2. else warm
start from ``--init-from`` (weights only), 3. else initialise from scratch.
"""

from __future__ import annotations

import dataclasses
import math
import os
import pathlib
import shutil
import sys
import time
from typing import Any

import jax
import numpy as np

from mtjax import compile_cache, outputs
from mtjax import config as config_lib
from mtjax.checkpoint import RunCheckpoints
from mtjax.errors import TrainingError, UserError
from mtjax.parallel import distributed
from mtjax.parallel import mesh as mesh_lib
from mtjax.parallel.distributed import log
from mtjax.train import metrics as metrics_lib
from mtjax.train import optim as optim_lib
from mtjax.train import preemption as preemption_lib
from mtjax.train import profiling, resume, rundir
from mtjax.train import setup as setup_lib
from mtjax.train import throughput as throughput_lib
from mtjax.train.setup import model_config  # noqa: F401 - re-exported


@dataclasses.dataclass
class TrainResult:
    workdir: pathlib.Path
    start_step: int
    step: int
    metrics: dict[str, float]
    wall_s: float
    task_names: list[str]
    compilation_cache: compile_cache.CacheUse | None = None
    skipped_steps: list[int] = dataclasses.field(default_factory=list)  # on_nonfinite=skip
    # tokens_per_s, model_flops_per_s and (with a known chip) mfu of all logged windows
    throughput: dict[str, float] = dataclasses.field(default_factory=dict)
    metrics_step: int | None = None  # the step ``metrics`` were logged at

    @property
    def tokens_per_s(self) -> float | None:
        """None: only the compiling first step ran (nothing timed)."""
        return self.throughput.get("tokens_per_s")


def make_pipeline(config: config_lib.Config, per_host_batch: int, split: str = "train",
                  seed_offset: int = 0):
    """The host's input pipeline (imports seqio/TF lazily: the model path does not need them).

    ``seed_offset`` reshuffles the stream (a resumed run whose host count changed)."""
    from mtjax.data import pipeline as pipeline_lib

    if seed_offset:
        config = dataclasses.replace(
            config, train=dataclasses.replace(config.train, seed=config.train.seed + seed_offset))
    return pipeline_lib.from_config(config, per_host_batch, split=split,
                                    shard_index=jax.process_index(),
                                    num_shards=jax.process_count())


def _log_above(bar, msg: str) -> None:
    """A line above the progress bar (a plain print would run on from the bar's own line)."""
    if jax.process_index() == 0:
        bar.write(msg, file=sys.stderr)


def _warn_from_any_host(bar, msg: str) -> None:
    """A warning about this host alone: host 0's above the progress bar, another host's on its
    own stderr with its number (only host 0 shows a bar and the run's own messages)."""
    if jax.process_index() == 0:
        bar.write(msg, file=sys.stderr)
    else:
        print(f"[host {jax.process_index()}] {msg}", file=sys.stderr, flush=True)


def train(config: config_lib.Config, workdir: str | pathlib.Path, *,
          init_from: str | None = None, progress: bool = True) -> TrainResult:
    """Train ``config`` in ``workdir``; resumes from the workdir's latest checkpoint.

    Raises:
        Preempted: SIGTERM or Ctrl-C arrived (from the start: a job preempted while it builds
            its input pipeline, restores or compiles exits 42 too, and its launcher resumes it).
    """
    preemption, lock = preemption_lib.Preemption(), rundir.RunLock(pathlib.Path(workdir))
    created = not pathlib.Path(workdir).exists()
    try:
        return _train(config, workdir, init_from, progress, preemption, lock)
    except UserError:
        # A mistake found during set-up (a parameter the mesh cannot split, say) leaves no
        # empty run directory behind when this run made it.
        if created and lock.handle is not None:
            lock.release()
            rundir.remove_if_only_lock(pathlib.Path(workdir))
        raise
    finally:
        lock.release()
        preemption.restore()


def _train(config: config_lib.Config, workdir: str | pathlib.Path, init_from: str | None,
           progress: bool, preemption: preemption_lib.Preemption,
           lock: rundir.RunLock) -> TrainResult:
    t_start = time.time()
    given, workdir = str(workdir), pathlib.Path(workdir)

    # --- A misspelt model, tasks module or mixture: one line, before anything is printed ----
    from mtjax.data import pipeline as pipeline_lib
    from mtjax.model import sizes

    failure: UserError | None = None
    custom_architecture: pathlib.Path | None = None
    try:
        if "://" in given:
            raise config_lib.ConfigError(
                f"--workdir {given}: mtjax writes the run directory through the local "
                f"filesystem; mount the bucket (e.g. gcsfuse) and give the mounted path")
        if workdir.exists() and not workdir.is_dir():
            raise config_lib.ConfigError(
                f"--workdir {given} is a file; give a directory (the run's own, or a new one)")
        _check_workdir_writable(workdir, given)
        if config.model.name == sizes.CUSTOM:
            custom_architecture = _use_custom_architecture(workdir, init_from)
        sizes.get_config(config.model.name)
        pipeline_lib.prepare(config)
        pipeline_lib.resolve_task_names(config.data.mixture)
        pipeline_lib.check_eval_mixture(config)  # (without evaluation too: `mtjax eval` takes it)
        pipeline_lib.check_eval_split(config)
        if init_from and not _has_checkpoint(workdir):
            from mtjax.checkpoint import find_state_dir

            find_state_dir(init_from)  # (a run that resumes does not use it: see below)
        # A mesh that does not fit the devices or the batch: also before anything is written.
        mesh, rules = setup_lib.mesh_and_rules(config)
    except UserError as e:
        failure = e
    preemption.stop_at_start(distributed.agree_on_set_up(failure, preemption.at_start))
    try:
        workdir.mkdir(parents=True, exist_ok=True)
    except OSError as e:  # what the check above cannot foresee (a path under /proc, say)
        raise config_lib.ConfigError(
            f"--workdir {given} cannot be made ({e.strerror}); give a directory you can "
            f"write") from None
    lock.acquire()
    log(f"mtjax: workdir {workdir.absolute()}")
    kept = workdir / sizes.MODEL_CONFIG_FILE
    if custom_architecture not in (None, kept) and jax.process_index() == 0:
        # The run's own copy: it resumes, evaluates and exports without the --init-from one.
        shutil.copyfile(custom_architecture, kept)

    # --- Mesh ---------------------------------------------------------------------------------
    log(mesh_lib.describe(mesh))
    cache_use = compile_cache.enable(config.train.compilation_cache)

    # --- Data ---------------------------------------------------------------------------------
    per_host_batch = config.train.batch_size // jax.process_count()
    pipeline = make_pipeline(config, per_host_batch)
    preemption.stop_during_set_up()
    task_names = list(pipeline.task_names)
    log(pipeline.describe())
    for note in config_lib.unused_settings(config):
        log(f"mtjax: note: {note}")
    _warn_truncation(config)
    # The embedding rounds the mixture's vocabulary up to a multiple of 128 (accelerator tiles).
    vocab_size = -(-pipeline.vocab_size // 128) * 128

    # --- Model, optimizer, state shapes, the jitted step -----------------------------------------
    setup = setup_lib.build(config, vocab_size=vocab_size, num_tasks=len(task_names),
                            mesh=mesh, rules=rules)
    preemption.stop_during_set_up()
    abstract_state = setup.abstract_state
    num_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(abstract_state.params))
    log(f"model {config.model.name}: {num_params / 1e6:.2f}M parameters, vocab {vocab_size}; "
         f"mixture {config.data.mixture}: {', '.join(task_names)}")
    log(_describe_training(config))

    config_dict = config_lib.to_dict(config)

    # --- State: 1. resume > 2. warm start > 3. scratch -----------------------------------------
    ck = config.checkpoint
    checkpoints = RunCheckpoints(workdir, every_steps=ck.every_steps, keep=ck.keep,
                                 async_save=ck.async_save, keep_best=ck.keep_best,
                                 best_metric=ck.best_metric, best_mode=ck.best_mode)
    # Until the loop's own `finally` takes over, whatever raises (a refused resume, damaged
    # --init-from weights, the evaluator's set-up, a SIGTERM) closes the manager first.
    try:
        state, pipeline, start_step, resumed_window = _initial_state(
            config, setup, checkpoints, pipeline, init_from, workdir, config_dict, per_host_batch)
        if start_step >= config.train.steps:
            # A finished run asked again: nothing to train, and its summary and config stay as
            # they are (rewriting them would erase the final metrics).
            checkpoints.close()
            log(f"nothing to train: the run is at step {start_step} and train.steps is "
                 f"{config.train.steps}; raise train.steps to continue it")
            records = metrics_lib.read_jsonl(workdir / "metrics.jsonl") if (
                workdir / "metrics.jsonl").exists() else []
            return TrainResult(workdir=workdir, start_step=start_step, step=start_step,
                               metrics=records[-1] if records else {},
                               wall_s=time.time() - t_start, task_names=task_names,
                               compilation_cache=cache_use)
        # Written once the checkpoint (if any) has been accepted: a refused resume changes nothing.
        if jax.process_index() == 0:
            config_lib.dump(config, workdir / "config.json", resolved=_resolved(config, setup))

        jitted, batch_sharding = setup.step, setup.batch_sharding
        evaluator = _make_evaluator(config, mesh, rules, setup)
        if evaluator is not None:
            # A SIGTERM or Ctrl-C abandons an evaluation at its next batch (several hosts: the
            # flag is set at a step, so that they finish an evaluation together).
            evaluator.stop = lambda: preemption.raised

        def to_global(host_batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
            return {k: jax.make_array_from_process_local_data(batch_sharding, v)
                    for k, v in host_batch.items()}

        preemption.stop_during_set_up(start_step)
    except BaseException:
        checkpoints.close()
        raise

    # --- Loop ---------------------------------------------------------------------------------
    # TensorBoard drops the events of steps after start_step that an earlier run (cut short, or
    # set aside) wrote, as metrics.jsonl was truncated to start_step.
    writer = metrics_lib.MetricsWriter(workdir, tensorboard=config.log.tensorboard,
                                       purge_from=start_step + 1)
    host_log = rundir.HostLog(workdir) if config.log.all_processes else None
    bar = _progress_bar(start_step, config.train.steps, progress)
    window, pending = resumed_window, None
    last_summary: dict[str, float] = {}
    window_start = time.time()
    first_step_done = False
    devices = list(setup.mesh.devices.flat)
    speed = throughput_lib.Throughput(
        flops_per_step=sizes.train_flops_per_step(
            setup.model_cfg, config.train.batch_size, config.data.inputs_length,
            config.data.targets_length),
        peak_flops_per_s=throughput_lib.job_peak_flops(
            devices[0].device_kind, devices[0].platform, config.model.dtype, len(devices)),
        # The first step of this process compiles: it is out of every window.
        first_timed_step=start_step + 2)
    skipped: list[int] = []
    profiler = profiling.StepProfiler(workdir / "profile", skip=config.log.profile_skip_steps,
                                      steps=config.log.profile_steps,
                                      log=lambda msg: _log_above(bar, msg),
                                      warn=lambda msg: _warn_from_any_host(bar, msg))
    last_summary_step = None
    best_metric_unchecked = config.checkpoint.keep_best > 0
    step = start_step
    try:
        with mesh_lib.activate(mesh, rules):
            while step < config.train.steps:
                with profiler.step(step + 1):  # the batch's wait too, as T5X traces a step
                    host_batch = next(pipeline)
                    if host_log is not None:
                        host_log.add_batch(host_batch)
                    state, step_metrics = jitted(state, to_global(host_batch))
                step += 1
                bar.update(1)  # before any evaluation: the bar reads the step being evaluated
                # Fetch the previous step's metrics now: the device runs step `step` meanwhile.
                if pending is not None:
                    window = _absorb(window, pending, config, skipped, speed)
                pending = (step, step_metrics)
                if not first_step_done:
                    # The first step includes compilation: keep it out of tokens/s.
                    jax.block_until_ready(step_metrics)
                    first_step_done = True
                    window_start = time.time()
                is_last = step == config.train.steps
                preempted = preemption.reached(step)
                must_save = checkpoints.save_due(step) or is_last or preempted
                # The trace ends with the run's last step, before its evaluation and save.
                profiler.stepped(step_metrics, final=is_last or preempted)
                eval_results = {}
                if evaluator is not None and (
                        (config.eval.every_steps and step % config.eval.every_steps == 0)
                        or (is_last and config.eval.at_end)):
                    from mtjax.infer import evaluate as evaluate_lib

                    # The step is still running behind dispatch: let it finish in training time,
                    # or its compute is taken out of tokens/s as evaluation time.
                    jax.block_until_ready(step_metrics)
                    eval_start = time.time()
                    try:
                        eval_results = evaluate_lib.flatten(evaluator(state.params, step))
                    except evaluate_lib.Interrupted:
                        # Save now: the rest of the evaluation (minutes with a large model)
                        # and another step would outlast a scheduler's grace period.
                        preempted = must_save = True
                        _log_above(bar, f"{preemption.signal_name}: the step {step} evaluation "
                                        f"is left out (`mtjax eval` runs it on the checkpoint)")
                    # Evaluation time is not training time: keep it out of tokens/s.
                    eval_s = time.time() - eval_start
                    window_start += eval_s
                    _log_above(bar, f"step {step} eval: " + ", ".join(
                        f"{k.removeprefix('eval/')} {v:.3g}"
                        for k, v in sorted(eval_results.items())))
                # A save between logging steps (a checkpoint interval or a stop that is not one
                # of log.every_steps) saves the steps since the last row with the checkpoint
                # instead of logging them early: rows stay log.every_steps apart, and a resumed
                # run logs the same rows.
                log_due = step % config.log.every_steps == 0 or is_last or bool(eval_results)
                carry_window = must_save and not log_due
                if log_due or must_save:
                    window = _absorb(window, pending, config, skipped, speed)
                    pending = None
                if log_due:
                    # Writing the row counts in the next window, so that the windows add up
                    # to the loop's time, which summary.json's tokens/s divides by.
                    now = time.time()
                    # (Empty for a window of the compiling first step alone.)
                    figures = speed.close_window(now - window_start)
                    # A window whose updates were all skipped (train.on_nonfinite=skip) has
                    # no training figures; its step's evaluation is still a row.
                    if window is not None or eval_results:
                        last_summary = ({} if window is None
                                        else metrics_lib.summarize(window, task_names))
                        last_summary.update(figures)
                        last_summary.update(eval_results)
                        last_summary_step = step
                        writer.write(step, last_summary)
                        if host_log is not None:
                            host_log.write(step, last_summary)
                        if "loss" in last_summary:
                            bar.set_postfix(loss=f"{last_summary['loss']:.3f}",
                                            **_speed_postfix(last_summary))
                    window, window_start = None, now
                if must_save:
                    if (best_metric_unchecked and "loss" in last_summary
                            and _best_metric_known(config, last_summary, bar)):
                        best_metric_unchecked = False
                    carried = window if carry_window else None
                    # The metrics of this step: an earlier row's are not (all updates since
                    # were skipped), and the step then ranks worst rather than as that one.
                    saved_metrics = ((last_summary if last_summary_step == step else {})
                                     if carried is None
                                     else metrics_lib.summarize(carried, task_names))
                    save_start = time.time()
                    checkpoints.save(step, state, pipeline, config_dict,
                                     metrics=_finite_only(saved_metrics), force=True,
                                     log_window=None if carried is None
                                     else metrics_lib.window_to_json(carried))
                    # The save's blocking part (a copy of the state off the device, and the
                    # wait for the previous save) is not training time: out of tokens/s too.
                    save_s = time.time() - save_start
                    window_start += save_s
                if preempted and not is_last:
                    checkpoints.wait()
                    _log_above(bar, f"{preemption.signal_name}: saved step {step}; exiting "
                                    f"with code {preemption.exit_code}")
                    raise preemption_lib.Preempted(step, preemption.exit_code)
    finally:
        profiler.close()  # a run that ended before the last traced step
        bar.close()
        checkpoints.close()
        writer.close()

    result = TrainResult(
        workdir=workdir, start_step=start_step, step=step, metrics=last_summary,
        throughput=speed.overall(),
        wall_s=time.time() - t_start, task_names=task_names, compilation_cache=cache_use,
        skipped_steps=skipped, metrics_step=last_summary_step)
    _write_summary(result)
    return result


def _check_workdir_writable(workdir: pathlib.Path, given: str) -> None:
    """A run directory under a file, or on a read-only filesystem or directory, stops in one
    line with the set-up checks (mkdir and the lock raised OSError's traceback)."""
    existing = workdir.absolute()
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise config_lib.ConfigError(
            f"--workdir {given}: {existing} is a file, so no directory can be made under it; "
            f"give another path")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise config_lib.ConfigError(
            f"--workdir {given}: {existing} is not writable (a read-only filesystem, or no "
            f"permission); give a directory you can write")


def _has_checkpoint(workdir: pathlib.Path) -> bool:
    """Whether the run directory holds a saved step (it resumes rather than starts)."""
    return any(p.name.isdigit() for p in workdir.glob("checkpoints/*"))


def _use_custom_architecture(workdir: pathlib.Path, init_from: str | None) -> pathlib.Path:
    """model.name=custom: the architecture in the run's model_config.json, else in the
    --init-from checkpoint's (a converted size without a name); returns the file read.

    A run without a checkpoint yet takes --init-from's first: its own copy is then left from
    an attempt that stopped in set-up, maybe with another --init-from, whose architecture the
    weights now given would not fit. A run that resumes with its own copy does not look at
    --init-from (its original command line resumes after the converted checkpoint is gone)."""
    from mtjax.model import sizes

    candidates = [workdir / sizes.MODEL_CONFIG_FILE]
    resumes = _has_checkpoint(workdir)
    if init_from and not (resumes and candidates[0].is_file()):
        from mtjax.checkpoint import find_state_dir, run_dir_of

        given = run_dir_of(find_state_dir(init_from).parent) / sizes.MODEL_CONFIG_FILE
        candidates.insert(1 if resumes else 0, given)
    for path in candidates:
        if path.is_file():
            try:
                sizes.use_custom(sizes.read_architecture(path))
            except (ValueError, KeyError, TypeError) as e:
                raise config_lib.ConfigError(
                    f"{path} does not describe a T5 architecture ({e}); convert the "
                    f"checkpoint again") from e
            return path
    raise config_lib.ConfigError(
        f"model.name=custom takes the architecture from model_config.json, and neither the run "
        f"directory nor the --init-from checkpoint has one ({', '.join(map(str, candidates))}); "
        f"give --init-from a checkpoint `mtjax convert` wrote, or a named model.name")


def _resolved(config: config_lib.Config, setup: setup_lib.TrainSetup) -> dict[str, Any]:
    """What the ``auto`` settings and the mesh became on this machine (config.json's
    ``resolved`` section): the config alone does not say what ran."""
    devices = setup.mesh.devices.flat
    return {"model.attention": setup.attention_kernel,
            "train.cross_entropy": setup.cross_entropy_kernel,
            "optim.schedule": optim_lib.schedule_name(config.optim),
            "mesh": {name: int(size) for name, size in setup.mesh.shape.items()},
            "devices": int(setup.mesh.devices.size), "processes": jax.process_count(),
            "device_kind": sorted({d.device_kind for d in devices}),
            "vocab_size": int(setup.model_cfg.vocab_size), "jax": jax.__version__}


def _exact(value: float) -> str:
    """``value`` as it was given, as short as reads back the same (``:g`` keeps 6 digits: a
    loss_normalizing_factor of 2097152 read 2.09715e+06, a learning rate of 0.0012345678
    0.00123457)."""
    return repr(value).removesuffix(".0")


def _describe_training(config: config_lib.Config) -> str:
    """One start-up line with the settings that decide speed and numerics, so that a log says
    what ran without config.json beside it."""
    t, m, o, d = config.train, config.model, config.optim, config.data
    tokens = f"{d.inputs_length}/{d.targets_length} tokens" + (", packed" if d.pack else "")
    micro = f" in {t.microbatches} microbatches" if t.microbatches > 1 else ""
    name = optim_lib.schedule_name(o)
    warmup = f"warmup {o.warmup_steps} steps, " if o.warmup_steps else ""
    schedule = f"learning rate {_exact(o.learning_rate)}, " + {
        "rsqrt": f"rsqrt decay after {o.warmup_steps} steps",
        "constant": f"{warmup}constant",
        "linear": f"{warmup}linear decay to 0",
        "cosine": f"{warmup}cosine decay"}[name]
    state = f", state {o.state_dtype}" if o.state_dtype != "float32" else ""
    steps = f"{t.steps} step" + ("s" if t.steps != 1 else "")
    loss = [f"label smoothing {_exact(t.label_smoothing)}"] if t.label_smoothing else []
    if t.loss_normalizing_factor:
        loss.append(f"sum over {_exact(t.loss_normalizing_factor)}")
    elif t.loss_normalization != "tokens":
        loss.append({"total_tokens": "sum over batch x targets length",
                     "per_sequence": "mean per sequence"}[t.loss_normalization])
    return (f"training {steps} of batch {t.batch_size}{micro} ({tokens}); "
            f"{o.name} ({schedule}{state}); activations {m.dtype}, remat {m.remat}"
            + (", scanned layers" if m.scan_layers else "")
            + (f"; loss: {', '.join(loss)}" if loss else ""))


def _initial_state(config, setup, checkpoints, pipeline, init_from, workdir, config_dict,
                   per_host_batch):
    """The state to start from, in the start-up order: 1. the run's latest checkpoint (with the
    pipeline's position), 2. ``--init-from``'s weights, 3. scratch. Returns
    ``(state, pipeline, start_step, logging window)``: the window holds the steps a stop
    between logging steps saved with the checkpoint (None: nothing to carry on)."""
    target = setup.target()
    saved_configs = {}

    def check(step, saved):
        resume.check_resumable(saved, config_dict, checkpoints, step)
        saved_configs[step] = saved

    resumed = checkpoints.restore_latest(target, pipeline, check=check)
    if resumed is not None:
        latest, state, data_restored = resumed
        if not data_restored:
            pipeline = make_pipeline(config, per_host_batch, seed_offset=latest)
        log(f"resuming from {checkpoints.directory / str(latest)}")
        changed = resume.changed_settings(saved_configs[latest], config_dict, latest)
        if changed and latest < config.train.steps:  # (a finished run trains nothing more)
            log(f"mtjax: note: steps after {latest} train with settings changed since the "
                f"checkpoint's run: {'; '.join(changed)}")
        if init_from:
            # Resume wins, so that a job restarted after preemption with its original command
            # line does not start over; but say so, in case a fine-tune was meant.
            log(f"mtjax: note: --init-from {init_from} is not used: {workdir} already has "
                 f"checkpoints, and a run resumes from its latest; give a new --workdir to "
                 f"start from {init_from}'s weights")
        rundir.truncate_metrics(workdir / "metrics.jsonl", latest)
        rundir.truncate_metrics(rundir.HostLog.path(workdir), latest, writer=None)
        window = metrics_lib.window_from_json(checkpoints.log_window(latest))
        if window is not None and np.shape(window["task_weight_sum"]) != (
                len(pipeline.task_names),):
            # Saved with another mixture's tasks: its per-task sums do not add to this run's.
            log(f"mtjax: note: the metrics of the steps before {latest} since the last logged "
                f"row were summed over another mixture's tasks; they are left out of the "
                f"next row")
            window = None
    else:
        window = None
        state = setup.init_state(config.train.seed)
        if init_from:
            from mtjax.checkpoint import find_state_dir, restore_params

            state = state.replace(params=restore_params(init_from, target.params))
            log(f"initialised weights from {find_state_dir(init_from).parent}")
        # A run that stopped before its first save, or whose checkpoints were all set aside,
        # starts over: its records begin again rather than repeating the steps (once the
        # start can no longer fail on a bad --init-from).
        records = workdir / "metrics.jsonl"
        if jax.process_index() == 0 and records.exists() and records.stat().st_size:
            log(f"mtjax: note: starting from step 0 in {workdir}, which has no checkpoint to "
                 f"resume: the records of an earlier start in metrics.jsonl are dropped")
        rundir.truncate_metrics(records, 0)
        rundir.truncate_metrics(rundir.HostLog.path(workdir), 0, writer=None)
    return state, pipeline, int(jax.device_get(state.step)), window


def _make_evaluator(config: config_lib.Config, mesh, rules, setup):
    """The evaluator the run uses, or None (no evaluation asked, or nothing to evaluate)."""
    evaluator = None
    if config.eval.every_steps or config.eval.at_end:
        from mtjax.data import pipeline as pipeline_lib
        from mtjax.infer import evaluate as evaluate_lib

        evaluator = evaluate_lib.make_evaluator(config, mesh, rules, setup.model_def,
                                                progress=False)
        if not evaluator.task_names:
            which = "" if config.eval.loss else "metric_fns and "
            log(f"mtjax: note: no task of {pipeline_lib.eval_mixture(config)} has {which}a "
                 f"{config.eval.split!r} split, so nothing is evaluated "
                 f"(eval.at_end=false says that this is meant)")
            evaluator = None
        elif pipeline_lib.eval_mixture(config) != config.data.mixture:
            log(f"evaluating eval.mixture {config.eval.mixture}: "
                f"{', '.join(evaluator.task_names)}")
    if (config.checkpoint.keep_best and config.checkpoint.best_metric.startswith("eval/")
            and evaluator is None):
        log(f"mtjax: warning: checkpoint.best_metric={config.checkpoint.best_metric} is an "
             f"evaluation metric, and this run evaluates nothing (set eval.every_steps): no "
             f"checkpoint is kept as the best by it")
    elif (config.checkpoint.keep_best and config.checkpoint.best_metric.startswith("eval/")
          and config.checkpoint.every_steps < config.train.steps):
        # A checkpoint saved at a step without an evaluation has no value of the metric and
        # ranks worst by it (one saved at the end alone has nothing to rank against).
        every, save_every = config.eval.every_steps, config.checkpoint.every_steps
        if not every:
            log(f"mtjax: warning: checkpoint.best_metric={config.checkpoint.best_metric} is "
                f"measured only by the evaluation at the end (eval.every_steps=0): no "
                f"checkpoint before the last can be kept as the best by it; set "
                f"eval.every_steps to checkpoint.every_steps={save_every}")
        elif save_every % every:
            log(f"mtjax: warning: checkpoint.best_metric={config.checkpoint.best_metric} is "
                f"measured at evaluations only (eval.every_steps={every}), and checkpoints "
                f"saved between them (checkpoint.every_steps={save_every}) rank worst by it; "
                f"make checkpoint.every_steps a multiple of eval.every_steps")
    return evaluator


def _best_metric_known(config: config_lib.Config, summary: dict[str, float], bar) -> bool:
    """Whether ``summary`` can tell if ``checkpoint.best_metric`` exists (an eval metric: once
    an evaluation ran); warns once where it does not: every checkpoint would rank worst by it,
    and only the latest ``checkpoint.keep`` would stay."""
    import difflib

    name = config.checkpoint.best_metric
    if name.startswith("eval/") and not any(k.startswith("eval/") for k in summary):
        return False
    if name not in summary:
        close = difflib.get_close_matches(name, list(summary), n=1)
        _log_above(bar, f"mtjax: warning: checkpoint.best_metric={name} is not among the logged "
                        f"metrics" + (f" (did you mean {close[0]}?)" if close else "")
                   + "; no checkpoint is kept as the best by it")
    return True


def _absorb(window, pending, config: config_lib.Config, skipped: list[int],
            speed: throughput_lib.Throughput):
    """Add a fetched step's metrics to the window and its tokens to ``speed``; stop, or note
    the step in ``skipped``, where its loss, gradients or updated weights are not finite."""
    if pending is None:
        return window
    step, device_metrics = pending
    host = jax.device_get(device_metrics)
    speed.add(step, host.pop("tokens"))  # a skipped update's tokens took their time too
    if not bool(host["finite"]):
        what = ", ".join(name for name, value in (
            ("loss", host["loss_sum"]), ("gradients", host["grad_norm"]),
            ("updated weights", host["param_norm"])) if not np.isfinite(value)) or "update"
        if config.train.on_nonfinite == "stop":
            raise TrainingError(
                f"non-finite {what} at step {step}; the last good checkpoint stays the latest. "
                f"Lower optim.learning_rate, or set train.on_nonfinite=skip to skip such updates")
        log(f"mtjax: step {step}: non-finite {what}, update skipped")
        skipped.append(step)
        return window
    return metrics_lib.accumulate(window, {k: v for k, v in host.items() if k != "finite"})


def _warn_truncation(config: config_lib.Config) -> None:
    """Warn (process 0) when the configured lengths cut most examples of a task."""
    if jax.process_index() != 0:
        return
    from mtjax.data import preview

    lengths = {"inputs": config.data.inputs_length, "targets": config.data.targets_length}
    _, warnings = preview.mixture_length_report(config.data.mixture, lengths, n=256,
                                                seed=config.train.seed)
    for warning in warnings:
        log(f"mtjax: {warning}")  # it starts "warning: ", as `mtjax tasks preview` prints it


def _finite_only(values: dict[str, float]) -> dict[str, float]:
    return {k: v for k, v in values.items() if math.isfinite(v)}


def _progress_bar(start: int, total: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, initial=start, unit="step", dynamic_ncols=True,
                disable=not enabled or jax.process_index() != 0, file=sys.stderr)


def _speed_postfix(row: dict[str, float]) -> dict[str, str]:
    """The progress bar's throughput: tokens/s, and MFU where the chip's peak is known."""
    postfix = {}
    if "tokens_per_s" in row:
        postfix["tok_s"] = f"{row['tokens_per_s']:.0f}"
    if "mfu" in row:
        postfix["mfu"] = f"{100 * row['mfu']:.1f}%"
    return postfix


def _write_summary(result: TrainResult) -> None:
    if jax.process_index() != 0:
        return
    summary = {
        "step": result.step, "start_step": result.start_step,
        # A run that timed no step (only the compiling first one ran) says so in the keys
        # scripts read, as null; mfu stays left out where no peak is known, as in the rows.
        "tokens_per_s": None, "model_flops_per_s": None, **result.throughput,
        "wall_s": result.wall_s,
        "metrics": result.metrics, "metrics_step": result.metrics_step,
        "skipped_steps": result.skipped_steps, "tasks": result.task_names,
        "checkpoints": str(result.workdir.absolute() / "checkpoints"),
        "metrics_jsonl": str(result.workdir.absolute() / "metrics.jsonl"),
    }
    if result.compilation_cache is not None:
        summary["compilation_cache"] = result.compilation_cache.to_json()
    (result.workdir / "summary.json").write_text(outputs.dumps(summary, indent=2) + "\n")
