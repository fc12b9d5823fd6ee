"""The training loop: build, prepare, loop, log, evaluate, checkpoint, save. One loop for every kind.

Read top to bottom. What is the same for every kind of model lives here: the output folder, the
Accelerator, the training state, the data position, the update step, logging, evaluation, best
checkpoint and save scheduling, signals, the final save (always from the gathered state dict),
plots, the model card and the Hub push. What differs (text encoders and decoders with their MoE and
NV-Embed pieces, CLIP and VLM2Vec, metric learning) is a :class:`~embedtrain.train.task.Task`;
callbacks (:class:`Callback`) are the one extension point for benchmarks, profilers and diagnostics.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
import yaml

from embedtrain.config import to_dict
from embedtrain.errors import ConfigError, EmbedtrainError
from embedtrain.train import checkpoint as ckpt
from embedtrain.train.accelerator import build_accelerator, engine_of, engine_problems
from embedtrain.train.averaging import averaging_callbacks
from embedtrain.train.callbacks import Callback
from embedtrain.train.diagnostics import diagnostics_callbacks
from embedtrain.train.optim import LossOptimizer, build_optimizer, build_scheduler, layerwise_lr_decay
from embedtrain.train.signals import StopRequest, any_process
from embedtrain.train.step import apply_update, to_device


@dataclass
class TrainState:
    """Everything the loop needs to continue a run exactly; written as ``trainer_state.json`` into
    every checkpoint (model, optimizer, scheduler and random states are accelerate's files beside it)."""

    step: int = 0
    best_metric: Optional[float] = None
    best_step: Optional[int] = None
    baseline: dict = field(default_factory=dict)
    consecutive_nonfinite: int = 0
    metrics_lines: int = 0
    """Lines of metrics.jsonl that belong to this state (a resume drops the ones after it)."""
    final_step: Optional[int] = None
    """Set in the last checkpoint, so that resuming from it does not evaluate again."""
    final: dict = field(default_factory=dict)
    train_seconds: float = 0.0
    """Time spent in the loop itself (evaluations and checkpoints included, start-up not)."""
    skipped_steps: int = 0
    """Steps whose update was skipped (a non-finite loss or gradient; an fp16 overflow)."""
    task: dict = field(default_factory=dict)
    """The task's own counters (images replaced during training, ...)."""
    diagnostics: dict = field(default_factory=dict)
    """The probe's diagnostics at step 0: the reference of the collapse warnings."""

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, saved: dict) -> None:
        names = {f.name for f in fields(self)}
        for key, value in saved.items():
            if key in names:
                setattr(self, key, value)
            else:  # checkpoints written before the task's counters had their own place
                self.task[key] = value

    def update_best(self, scores: dict, key: str, step: int) -> None:
        value = scores.get(key)
        if value is not None and (self.best_metric is None or value > self.best_metric):
            self.best_metric, self.best_step = value, step


@dataclass
class TrainResult:
    """What a run produced; scores are on a 0-1 scale."""

    output_dir: Path
    model_dir: Path
    steps: int
    baseline: dict[str, float] = field(default_factory=dict)
    final: dict[str, float] = field(default_factory=dict)
    best_step: Optional[int] = None
    seconds: float = 0.0
    train_seconds: float = 0.0
    trainable_parameters: int = 0
    total_parameters: int = 0
    stopped: bool = False
    """Stopped early by a signal; resume with --resume auto."""
    summary: list[str] = field(default_factory=list)
    """Each task's selection metric before and after, as printed at the end."""
    details: dict[str, Any] = field(default_factory=dict)
    """The task's own entries of results.json."""


class Trainer:
    """Runs one recipe with the task of its kind. ``resume`` is None, ``'auto'`` or a checkpoint path."""

    def __init__(self, recipe, resume: Optional[str] = None, log=print, callbacks: Sequence[Callback] = (),
                 chain: tuple[str, ...] = ()):
        from embedtrain.train.tasks import task_for

        self.recipe, self.resume = recipe, resume
        self.callbacks = list(callbacks) + diagnostics_callbacks(recipe)
        self.out = Path(recipe.output.dir)
        self.log = log
        self.task = task_for(recipe, log=self._say, chain=chain, run_stage=self._run_stage)
        self.state = TrainState()
        self.accelerator = self.model = self.loss_fn = self.optimizer = self.scheduler = self.loss_optimizer = None
        self.data_seconds = 0.0
        self.final_weights = "the last step's weights"
        """What the final model is; a callback that replaces the weights by an average says so here."""

    def _say(self, *parts) -> None:  # the task speaks through the trainer: one voice per run
        self.log(*parts)

    def _run_stage(self, recipe, resume, chain):  # NV-Embed: train a previous stage first
        return Trainer(recipe, resume, self.log, (), chain).run()

    def _emit(self, hook: str, *args) -> None:
        for callback in self.callbacks:
            getattr(callback, hook)(self, *args)

    # -- the run, top to bottom ----------------------------------------------------------------
    def run(self) -> TrainResult:
        from accelerate.utils import set_seed
        from tqdm.auto import tqdm

        t0 = time.time()
        r, out, task, state = self.recipe, self.out, self.task, self.state
        if r.train.torch_threads:
            torch.set_num_threads(r.train.torch_threads)

        # -- build: data first (cheap, and its errors should come before the model loads) ------
        _check_output_dir(out, r.output.overwrite, resuming=self.resume is not None)
        task.read_data()
        task.startup.lap("reading data")
        self.accelerator = accelerator = build_accelerator(
            r.train.mixed_precision, r.output.report_to or None, str(out),
            find_unused_parameters=task.find_unused_parameters)
        world_size, rank = accelerator.num_processes, accelerator.process_index
        if task.max_processes is not None and world_size > task.max_processes:
            raise EmbedtrainError(f"kind {r.kind}: runs in one process; launch it without accelerate launch / torchrun")
        if not accelerator.is_main_process:
            self.log = lambda *_: None  # noqa: E731  (one voice per run)
        elif self.log is print:
            self.log = lambda *a: tqdm.write(" ".join(map(str, a)))  # noqa: E731  (not inside the bar)
        self.engine = engine_of(accelerator)
        self.log(f"engine: {self.engine.describe()}")
        if self.engine.launcher_mixed_precision:
            self.log(f"mixed precision: the accelerate config asks for {self.engine.launcher_mixed_precision}; "
                     f"train.mixed_precision ({self.engine.mixed_precision}) is used")
        task.check_data(world_size)
        problems = engine_problems(self.engine.distributed_type, r.train, task.loss_parameters)
        if problems:  # before the model loads
            raise ConfigError(problems)
        resume_from = self._resume_point()
        task.startup.lap("accelerator")

        set_seed(r.train.seed)
        task.resuming = resume_from is not None
        model, loss_fn = task.build(accelerator.device)
        task.startup.lap("building the model")
        self.data_accounts = task.check_accounts()  # no dataset is dropped or cut without an error
        task.startup.lap("epoch plan")
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        total = sum(p.numel() for p in model.parameters())
        steps_per_epoch = task.batches_in_epoch(0)
        self.total_steps = total_steps = r.train.max_steps or r.train.epochs * steps_per_epoch
        groups = layerwise_lr_decay(task.parameter_groups(model), model.named_parameters(), r.train.lr,
                                    r.train.layerwise_lr_decay)
        optimizer = build_optimizer(groups, r.train.lr, r.train.optimizer, r.train.momentum)
        scheduler = build_scheduler(optimizer, r.train.scheduler, total_steps, r.train.warmup_ratio)
        model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
        loss_fn.to(accelerator.device)
        loss_optimizer = LossOptimizer(loss_fn, r.train.optimizer, r.train.lr, r.train.momentum)
        self.model, self.loss_fn, self.optimizer, self.scheduler = model, loss_fn, optimizer, scheduler
        self.loss_optimizer = loss_optimizer

        # -- output directory: only now, after every input check -------------------------------
        _prepare_output_dir(accelerator, out, r.output.overwrite, resuming=self.resume is not None)
        self.recipe_text = yaml.safe_dump(to_dict(r), sort_keys=False)
        if accelerator.is_main_process:
            if self.resume:
                ckpt.remove_incomplete(out)
            ckpt.atomic_write_text(out / "recipe.yaml", self.recipe_text)
        if r.output.report_to:
            accelerator.init_trackers("embedtrain", config=ckpt.flatten(to_dict(r)))

        # -- resume --------------------------------------------------------------------------------
        self.metrics_path = out / "metrics.jsonl"
        if resume_from is not None:
            state.load_state_dict(ckpt.load_checkpoint(accelerator, resume_from, loss_fn, loss_optimizer))
            task.load_files(resume_from)
            self.log(f"resumed from {resume_from} at step {state.step}")
            if accelerator.is_main_process:
                state.metrics_lines = ckpt.truncate_metrics(self.metrics_path, state.step, state.metrics_lines)
        elif self.resume and accelerator.is_main_process:
            state.metrics_lines = ckpt.truncate_metrics(self.metrics_path, 0, 0)  # starting again from step 0
        task.counters = state.task
        self.resumed_from = resume_from
        self.callbacks = averaging_callbacks(r.train, self.log) + self.callbacks
        self.record({"step": state.step, "engine": self.engine.to_dict()}, track=False)  # each start says what it ran on

        task.startup.lap("preparing the run")
        if state.step == 0 and task.has_evaluation and r.eval.before_training:
            state.baseline = self.evaluate(0)
            if state.baseline:
                self.log(f"before training: {task.format_scores(state.baseline)}")
            task.startup.lap("evaluation before training")
        self._emit("on_train_begin")
        task.startup.lap("callbacks at train begin")
        self.log(task.startup.line())
        self.record({"step": state.step, "startup_seconds": task.startup.to_dict()}, track=False)

        # -- loop ----------------------------------------------------------------------------------
        params = list(model.parameters())  # all of them: see apply_update
        step = state.step
        epoch, offset = _position(task.batches_in_epoch, step)
        model.train()
        loss_fn.train()
        examples = task.examples_per_step(world_size)
        progress = tqdm(total=total_steps, initial=step, desc="training", disable=not accelerator.is_local_main_process,
                        dynamic_ncols=True)
        window: list[dict] = []
        skipped, last_log, loop_start, stopped = 0, time.time(), time.time(), False
        with StopRequest() as stop, progress:
            while step < total_steps and not stopped:
                # a loader holds the data as it is: a new one after each refresh (mined negatives)
                refresh_at, first = self._refresh(step), step
                for batch in self._timed(task.loader(epoch, offset, rank, world_size, accelerator.device.type == "cuda")):
                    if step >= total_steps or (refresh_at is not None and step >= refresh_at):
                        break
                    problem = task.check_batch(batch, step)
                    if any_process(accelerator, problem is not None):
                        # something that passed the checks before training broke since: leave a checkpoint first
                        if step > 0:
                            self.save(step)
                        raise EmbedtrainError(f"training stopped at step {step + 1}: "
                                              f"{problem or 'another process stopped'}; {ckpt.last_good(out)}")
                    batch = to_device(batch, accelerator.device)
                    self._emit("on_step_begin", batch)
                    figures = task.step(model, loss_fn, batch, accelerator)
                    finite, grad_norm, loss_value = apply_update(
                        accelerator, optimizer, scheduler, figures["loss"], params, loss_optimizer, r.train.max_grad_norm,
                        state, r.train.max_consecutive_nonfinite, step, ckpt.last_good(out), self.log)
                    optimizer.zero_grad(set_to_none=True)
                    loss_optimizer.zero_grad()
                    step += 1
                    skipped += not finite
                    state.skipped_steps += not finite
                    progress.update(1)
                    if finite:
                        window.append({**{k: float(v) for k, v in figures.items()}, "loss": float(loss_value),
                                       "grad_norm": float(grad_norm)})
                    self._emit("on_step_end", {"step": step, "finite": finite, **(window[-1] if finite else {})})
                    if step % r.train.log_every == 0 or step == total_steps:
                        now = time.time()
                        entry = self._log_entry(step, epoch, window, skipped, examples / max(now - last_log, 1e-9))
                        self.record(entry)
                        self._emit("on_log", entry)
                        if window:
                            progress.set_postfix(loss=f"{entry['loss']:.4f}", acc=f"{entry.get('accuracy', 0):.3f}")
                        window, skipped, last_log = [], 0, now
                    scores = {}
                    if task.has_evaluation and r.train.eval_every and step % r.train.eval_every == 0 and step < total_steps:
                        scores = self.evaluate(step)
                        state.update_best(scores, task.selection_key, step)
                        if scores:
                            self.log(f"step {step}: {task.format_scores(scores)}")
                    should_save = bool(r.train.save_every and step % r.train.save_every == 0) or bool(
                        scores and state.best_step == step)
                    if should_save and not finite:
                        # checkpoints follow applied updates only; the next save point writes one
                        self.log(f"step {step}: no checkpoint after a skipped step")
                        should_save = False
                    if any_process(accelerator, stop.requested) and step < total_steps:
                        self.log(f"stop requested: checkpointing at step {step}")
                        should_save, stopped = True, True
                    if should_save and step < total_steps:
                        state.train_seconds += time.time() - loop_start
                        loop_start = time.time()
                        self.save(step)
                    if stopped:
                        break
                offset += step - first  # the loader ended with the epoch, or stopped for a refresh inside it
                if offset >= task.batches_in_epoch(epoch):
                    epoch, offset = epoch + 1, 0
        state.train_seconds += time.time() - loop_start

        def result(**kw) -> TrainResult:
            res = TrainResult(out, out / "model", step, state.baseline, best_step=state.best_step,
                              seconds=time.time() - t0, train_seconds=state.train_seconds,
                              trainable_parameters=trainable, total_parameters=total, **kw)
            self._emit("on_train_end", res)
            return res

        if stopped:
            accelerator.end_training()
            return result(stopped=True)

        # -- finish: evaluate, save the final model -------------------------------------------------
        if state.final_step != step:  # else resumed from the last checkpoint: evaluated and saved already
            self._emit("on_train_loop_end", step)
            state.final = self.evaluate(step) if task.has_evaluation else {}
            state.update_best(state.final, task.selection_key, step)
            state.final_step = step
            self.save(step)
        if state.final:
            self.log(f"after {step} steps: {task.format_scores(state.final)}")
        model_dir = self._save_final(time.time() - t0, step, trainable, total)
        if accelerator.is_main_process and r.output.plot:
            from embedtrain.train.plot import plot_metrics

            plot_metrics(self.metrics_path, out / "training_curves.png", task.selection_key.split("/")[-1])
        accelerator.wait_for_everyone()
        accelerator.end_training()
        if accelerator.is_main_process:
            self._publish(model_dir, time.time() - t0, step)
        return result(final=state.final, summary=task.summary(state.baseline, state.final), details=task.results())

    # -- pieces of the run ---------------------------------------------------------------------------
    def _resume_point(self) -> Optional[Path]:
        out, resume = self.out, self.resume
        resume_from = ckpt.resolve_resume(out, resume) if resume else None
        if resume == "auto" and resume_from is None:
            self.log(f"resume: no complete checkpoint in {out}; starting from the beginning")
        for bad in ckpt.incomplete_checkpoints(out) if resume else []:
            self.log(f"resume: skipping incomplete checkpoint {bad} (killed while writing); removing it")
        if resume_from is not None:
            changed = ckpt.recipe_changes(resume_from / "recipe.yaml", to_dict(self.recipe))
            if changed:
                self.log(f"resume: the recipe differs from the checkpoint's in {', '.join(changed)}; "
                         "the run continues with the new values")
        return resume_from

    def _refresh(self, step: int) -> Optional[int]:
        """The task's data work due at ``step`` (:meth:`Task.refresh`); the step it is due next."""
        refresh_at = self.task.refresh(step, self.accelerator.unwrap_model(self.model), self.accelerator)
        _reshard(self.model)  # FSDP keeps the root's parameters gathered after a forward with no backward
        return refresh_at

    def _timed(self, loader):
        """The loader's batches; ``self.data_seconds`` is how long the last one took to arrive (for callbacks)."""
        batches = iter(loader)
        while True:
            start = time.perf_counter()
            batch = next(batches, None)
            if batch is None:
                return
            self.data_seconds = time.perf_counter() - start
            yield batch

    def _log_entry(self, step: int, epoch: int, window: list[dict], skipped: int, per_step: float) -> dict:
        entry: dict[str, Any] = {"step": step, "epoch": epoch}
        for key in dict.fromkeys(k for w in window for k in w):
            values = [w[key] for w in window if key in w]
            last = key in self.task.last_value_keys or key == "grad_norm"
            entry[key] = values[-1] if last else sum(values) / len(values)
        if not window:
            entry["loss"] = None
        lrs = self.scheduler.get_last_lr()
        entry["lr"] = lrs[0]
        entry[self.task.throughput_key] = (len(window) + skipped) * per_step
        if skipped:
            entry["skipped_steps"] = skipped  # non-finite steps in this window (not in the averages)
        if self.accelerator.scaler is not None:
            entry["loss_scale"] = self.accelerator.scaler.get_scale()
        entry.update(self.task.log_extras(lrs))
        return entry

    def record(self, entry: dict, track: bool = True) -> None:
        """Append a line to metrics.jsonl (main process) and to the trackers."""
        if self.accelerator.is_main_process:
            with self.metrics_path.open("a", encoding="utf-8") as f:
                f.write(json.dumps(entry) + "\n")
            self.state.metrics_lines += 1
        if track and self.recipe.output.report_to:
            self.accelerator.log({k: v for k, v in entry.items() if k != "step"}, step=entry["step"])

    def evaluate(self, step: int) -> dict[str, float]:
        """The task's scores, computed on the main process and shared with the others (every process
        must agree on the best step, which decides who saves)."""
        accelerator, scores = self.accelerator, {}
        # a sharded model's forward needs every process: then all evaluate (the same texts), the main one records
        if accelerator.is_main_process or self.engine.sharding:
            scores = self.task.evaluate(accelerator.unwrap_model(self.model), accelerator)
            _reshard(self.model)  # FSDP keeps the root's parameters gathered after a forward with no backward
        if accelerator.is_main_process:
            if scores:
                self.record({"step": step, **{f"eval/{k}": v for k, v in scores.items()}})
        if accelerator.num_processes > 1:
            from accelerate.utils import broadcast_object_list

            scores = broadcast_object_list([scores])[0]
        self._emit("on_evaluate", scores)
        return scores

    def probe_embeddings(self) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
        """The task's probe (query, positive) embeddings on the main process (None elsewhere, or without a
        probe); like :meth:`evaluate`, a sharded model's forward runs on every process."""
        accelerator, embeddings = self.accelerator, None
        if accelerator.is_main_process or self.engine.sharding:
            embeddings = self.task.probe_embeddings(accelerator.unwrap_model(self.model))
            _reshard(self.model)
        return embeddings if accelerator.is_main_process else None

    def save(self, step: int) -> None:
        """A complete checkpoint of the run at ``step`` (every process takes part)."""
        accelerator, loss_fn = self.accelerator, self.loss_fn
        named = [(n, p) for n, p in accelerator.unwrap_model(self.model).named_parameters() if p.requires_grad] \
            + [(f"loss.{n}", p) for n, p in loss_fn.named_parameters()]
        bad = _nonfinite_parameters(named)
        if bad:
            raise EmbedtrainError(
                f"training stopped at step {step}: non-finite weights ({', '.join(bad[:3])}"
                f"{', ...' if len(bad) > 3 else ''}); lower train.lr or check the data; {ckpt.last_good(self.out)}"
            )

        def write_files(path: Path) -> None:
            self._emit("on_checkpoint_files", path)
            self.task.save_files(path)
            ckpt.save_loss(path, loss_fn, self.loss_optimizer)

        self.task.sync(accelerator)  # e.g. every process's stream positions, into the task's counters
        saved_state = {**self.state.state_dict(), "step": step}
        needed = ckpt.estimate_bytes([accelerator.unwrap_model(self.model), loss_fn],
                                     [o for o in (self.optimizer, self.loss_optimizer.optimizer) if o is not None])
        path = ckpt.save_checkpoint(accelerator, self.out, step, saved_state, {"recipe.yaml": self.recipe_text},
                                    write_files, needed_bytes=needed)
        if accelerator.is_main_process:
            ckpt.prune_checkpoints(self.out, self.recipe.train.keep_last, self.state.best_step)
        self._emit("on_save", path)

    def _save_final(self, seconds: float, step: int, trainable: int, total: int) -> Path:
        """model/ and results.json, each written aside and renamed: whole or not at all."""
        accelerator, out, state = self.accelerator, self.out, self.state
        model_dir, problem = out / "model", None
        # every process takes part: under FSDP / ZeRO-3 this gathers the shards into one full state dict
        full_state = accelerator.get_state_dict(self.model)
        self.task.sync(accelerator)
        if accelerator.is_main_process:
            tmp = out / ".model.tmp"
            needed = int(ckpt.estimate_bytes([accelerator.unwrap_model(self.model)]) * ckpt.SAFETY_FACTOR)
            try:
                problem = ckpt.free_space_problem(out, needed)
                if problem is None:
                    with ckpt.cleaned_on_failure(tmp, "final model", out):
                        if tmp.exists():
                            shutil.rmtree(tmp)
                        tmp.mkdir(parents=True)
                        self.task.export(accelerator.unwrap_model(self.model), self.loss_fn, tmp, full_state)
                    ckpt.replace_dir(tmp, model_dir)
                    summary = {"kind": self.recipe.kind, "steps": step, "baseline": state.baseline, "final": state.final,
                               "best_step": state.best_step, "seconds": seconds, "train_seconds": state.train_seconds,
                               "skipped_steps": state.skipped_steps, "final_weights": self.final_weights,
                               "trainable_parameters": trainable, "total_parameters": total,
                               "processes": accelerator.num_processes, "engine": self.engine.to_dict(),
                               "data": [a.to_dict() for a in self.data_accounts], **self.task.results()}
                    ckpt.atomic_write_text(out / "results.json", json.dumps(summary, indent=2))
            except EmbedtrainError as err:
                problem = str(err).replace("checkpoint: ", "final model: ", 1)
        ckpt.raise_if_any(accelerator, problem)
        return model_dir

    def _publish(self, model_dir: Path, seconds: float, step: int) -> None:
        """The model card, and the Hub push when the recipe asks for it (main process only)."""
        card = self.task.card(model_dir, self.state.baseline, self.state.final, seconds, step, self.engine)
        if card is not None:
            from embedtrain.hub.model_card import write_model_card

            write_model_card(model_dir, card)
        repo = self.recipe.output.push_to_hub
        if repo:
            from embedtrain.hub.push import push_model

            url = push_model(model_dir, repo, private=self.recipe.output.hub_private)
            self.log(f"pushed to {url}")


def train(recipe, resume: Optional[str] = None, log=print, callbacks: Sequence[Callback] = (),
          chain: tuple[str, ...] = ()) -> TrainResult:
    """Run a recipe of any kind (see :class:`Trainer`)."""
    return Trainer(recipe, resume, log, callbacks, chain).run()


# -- small helpers ---------------------------------------------------------------------------------


def _check_output_dir(out: Path, overwrite: bool, resuming: bool) -> None:
    if out.exists() and not out.is_dir():
        raise EmbedtrainError(f"output.dir: {out} is a file; choose a folder")
    if out.exists() and any(out.iterdir()) and not (overwrite or resuming):
        raise EmbedtrainError(
            f"output.dir: {out} already exists and is not empty; choose another output.dir, "
            "pass --overwrite to replace it, or --resume auto to continue it"
        )


def _prepare_output_dir(accelerator, out: Path, overwrite: bool, resuming: bool) -> None:
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if overwrite and not resuming and out.exists():
            shutil.rmtree(out)
        out.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()


def _position(batches_in_epoch, step: int) -> tuple[int, int]:
    """(epoch, batch index in that epoch) after ``step`` completed steps; epochs may differ in length
    (a class-balanced plan), so they are counted one by one."""
    epoch, left = 0, step
    while left >= batches_in_epoch(epoch):
        left -= batches_in_epoch(epoch)
        epoch += 1
    return epoch, left


def _reshard(model) -> None:
    """Free the gathered parameters of every FSDP module (no-op for other engines)."""
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def _nonfinite_parameters(named_params) -> list[str]:
    """Names of parameters holding a NaN or inf on this process (a sharded parameter: in its own shard)."""
    with torch.no_grad():
        return [name for name, p in named_params
                if not bool(torch.isfinite(p.to_local() if hasattr(p, "to_local") else p).all())]
