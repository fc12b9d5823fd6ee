"""The training function: build, prepare, loop, log, evaluate, checkpoint, save.

Read top to bottom; everything a run does is here or one call away.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
import yaml

from embedtrain.config import Recipe, task_name, to_dict
from embedtrain.data import BatchCollator, PlannedBatches, plan_epoch, pretokenize, token_lengths
from embedtrain.errors import EmbedtrainError
from embedtrain.eval.retrieval import evaluate_retrieval, load_beir
from embedtrain.losses import LOSSES
from embedtrain.models import load_text_encoder
from embedtrain.train import checkpoint as ckpt
from embedtrain.train import experts
from embedtrain.train.accelerator import build_accelerator
from embedtrain.train.nv_embed import (load_recipe_decoder, load_training_dataset, previous_stage_model,
                                       prompt_lengths, query_prompt_of)
from embedtrain.train.optim import build_optimizer, build_scheduler
from embedtrain.train.step import grad_cache_step, plain_step


@dataclass
class TrainResult:
    """What a run produced; figures are on a 0-1 scale."""

    output_dir: Path
    model_dir: Path
    steps: int
    baseline: dict[str, float] = field(default_factory=dict)
    final: dict[str, float] = field(default_factory=dict)
    best_step: Optional[int] = None
    seconds: float = 0.0
    stopped: bool = False  # stopped early by a signal; resume with --resume auto


class _StopRequest:
    """SIGINT/SIGTERM ask the loop to finish the current step, checkpoint and exit.

    A second signal at least ``repeat_after`` seconds after the first stops at once (no checkpoint);
    one arriving sooner is taken for the same request (a launcher such as torchrun forwards the
    signal it received to processes that got it already).
    """

    repeat_after = 2.0

    def __init__(self):
        self.requested = False
        self._first = 0.0
        self._previous = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread
                pass
        return self

    def _handle(self, signum, frame):
        if self.requested:
            if time.monotonic() - self._first >= self.repeat_after:  # a second request stops at once
                raise KeyboardInterrupt
            return
        self.requested, self._first = True, time.monotonic()

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


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


def _load_data(recipe: Recipe):
    return [load_training_dataset(ds, i, recipe.train.seed) for i, ds in enumerate(recipe.data.train)]


def _evaluate(encoder, tasks, batch_size: int) -> dict[str, float]:
    """Metrics per task as ``<task>/<metric>`` plus the mean over tasks as ``mean/<metric>``."""
    out: dict[str, float] = {}
    for cfg, data in tasks:
        with experts.routed_task(encoder, cfg.domain):  # MoE models: the task's domain, or the router
            scores = evaluate_retrieval(encoder, data, query_prompt_of(cfg) or None, cfg.document_prompt or None,
                                        batch_size=batch_size, show_progress=True)
        out.update({f"{data.name}/{k}": v for k, v in scores.items()})
    if tasks:
        for metric in ("ndcg@10", "mrr@10", "recall@10"):
            out[f"mean/{metric}"] = sum(out[f"{d.name}/{metric}"] for _, d in tasks) / len(tasks)
    return out


def _steps_from(plans_len, start_step: int) -> tuple[int, int]:
    """(epoch, batch index in that epoch) after ``start_step`` completed steps."""
    epoch, left = 0, start_step
    while left >= plans_len(epoch):
        left -= plans_len(epoch)
        epoch += 1
    return epoch, left


def train(recipe: Recipe, resume: Optional[str] = None, log=print, chain: tuple[str, ...] = ()) -> TrainResult:
    """Run a recipe. ``resume`` is None, ``'auto'`` or a checkpoint path.

    With ``model.previous_stage`` the previous stage's recipe is trained first if its model is missing
    (``chain``: the stages already on the way, to catch cycles)."""
    from accelerate.utils import set_seed
    from tqdm.auto import tqdm

    t0 = time.time()
    r = recipe
    out = Path(r.output.dir)
    if r.train.torch_threads:
        torch.set_num_threads(r.train.torch_threads)

    # -- build: data first (cheap, and its errors should come before the model loads) ----------
    _check_output_dir(out, r.output.overwrite, resuming=resume is not None)
    datasets = _load_data(r)
    model_source = r.model.name_or_path
    if r.model.previous_stage:  # stage 2 starts from stage 1's output model
        model_source = previous_stage_model(r, lambda rr, resume, chain: train(rr, resume, log, chain), log, chain)
    # an MoE step leaves the other domains' experts without gradient, which DDP must be told
    accelerator = build_accelerator(r.train.mixed_precision, r.output.report_to or None, str(out),
                                    find_unused_parameters=experts.uses_experts(r))
    world_size, rank = accelerator.num_processes, accelerator.process_index
    if not accelerator.is_main_process:
        log = lambda *_: None  # noqa: E731  (one voice per run)
    elif log is print:
        log = lambda *a: tqdm.write(" ".join(map(str, a)))  # noqa: E731  (a line of its own, not inside the bar)
    global_batch = r.data.batch_size * world_size
    for i, ds in enumerate(datasets):
        if len(ds) < global_batch:
            raise EmbedtrainError(
                f"data.train[{i}]: {ds.name} has {len(ds)} rows, fewer than one batch "
                f"({r.data.batch_size} x {world_size} processes); lower data.batch_size or add rows"
            )
    eval_tasks = [(t, load_beir(t.path, task_name(t))) for t in r.eval.tasks]
    resume_from = ckpt.resolve_resume(out, resume) if resume else None
    if resume == "auto" and resume_from is None:
        log(f"resume: no complete checkpoint in {out}; starting from the beginning")
    for bad in ckpt.incomplete_checkpoints(out) if resume else []:
        log(f"resume: skipping incomplete checkpoint {bad} (killed while writing); removing it")
    if resume_from is not None:
        changed = _recipe_changes(resume_from / "recipe.yaml", to_dict(r))
        if changed:
            log(f"resume: the recipe differs from the checkpoint's in {', '.join(changed)}; "
                "the run continues with the new values")

    set_seed(r.train.seed)
    if r.model.bidirectional:
        encoder = load_recipe_decoder(r, model_source, accelerator.device)
    else:
        encoder = load_text_encoder(
            model_source, pooling=r.model.pooling, normalize=r.model.normalize, max_length=r.model.max_length,
            query_max_length=r.model.query_max_length, document_max_length=r.model.document_max_length,
            query_prompt=query_prompt_of(r.data.train[0]), document_prompt=r.data.train[0].document_prompt,
            attn_implementation=r.model.attn_implementation, trust_remote_code=r.model.trust_remote_code,
            revision=r.model.revision, gradient_checkpointing=r.model.gradient_checkpointing,
        )
    encoder = experts.prepare_encoder(encoder, r, log)  # model.moe: upcycled into one expert per domain
    batch_domains = experts.dataset_domains(encoder, r)
    experts.check_eval_tasks(encoder, r)
    _check_position_limit(encoder, r)
    loss_fn = LOSSES.get(r.loss.name)(
        temperature=r.loss.temperature, learnable_temperature=r.loss.learnable_temperature,
        symmetric=r.loss.symmetric, in_batch_negatives=r.loss.in_batch_negatives,
        mask_false_negatives=r.loss.mask_false_negatives, gather_across_processes=r.train.gather_across_processes,
    )

    # Tokenize once; the main process fills the datasets cache, the others read it.
    with accelerator.main_process_first():
        for ds in datasets:
            if r.data.pretokenize:
                pretokenize(ds, encoder.tokenizer, encoder.max_length_for)
    lengths = [token_lengths(ds) for ds in datasets] if r.data.length_grouping else None
    collator = BatchCollator(datasets, encoder.tokenizer, encoder.max_length_for, prompt_lengths(encoder, datasets))

    plans: dict[int, list] = {}

    def plan(epoch: int):
        if epoch not in plans:
            plans.clear()  # keep one epoch in memory
            plans[epoch] = plan_epoch(
                [len(d) for d in datasets], [d.row_keys for d in datasets], global_batch, r.train.seed, epoch,
                lengths=lengths, weights=[d.weight for d in datasets], mixing=r.data.mixing,
                no_duplicates=r.data.no_duplicates, window=r.data.length_grouping_window,
            )
        return plans[epoch]

    steps_per_epoch = len(plan(0))
    if steps_per_epoch == 0:
        raise EmbedtrainError(
            "data.train: no full batch can be formed without repeating a text; lower data.batch_size or add rows"
        )
    total_steps = r.train.max_steps or r.train.epochs * steps_per_epoch

    frozen = encoder.freeze_unused_parameters()
    if frozen:
        log(f"not trained (no influence on the embedding): {', '.join(frozen)}")
    optimizer = build_optimizer(encoder, loss_fn, r.train.lr, r.train.weight_decay, experts.learning_rates(r))
    scheduler = build_scheduler(optimizer, r.train.scheduler, total_steps, r.train.warmup_ratio)
    if r.train.compile:
        # compiled in place: parameter names (checkpoints, the saved model) stay those of the backbone
        encoder.backbone.compile(dynamic=True)
    model, optimizer, scheduler = accelerator.prepare(encoder, optimizer, scheduler)
    loss_fn.to(accelerator.device)

    # -- output directory: only now, after every input check ---------------------------------
    _prepare_output_dir(accelerator, out, r.output.overwrite, resuming=resume is not None)
    recipe_text = yaml.safe_dump(to_dict(r), sort_keys=False)
    if accelerator.is_main_process:
        if resume:
            ckpt.remove_incomplete(out)
        ckpt.atomic_write_text(out / "recipe.yaml", recipe_text)
    if r.output.report_to:
        accelerator.init_trackers("embedtrain", config=_flat(to_dict(r)))

    # -- resume ----------------------------------------------------------------------------
    # metrics_lines: lines of metrics.jsonl that belong to the state (a resume drops the ones after it);
    # final_step/final: set in the last checkpoint, so that resuming from it does not evaluate again
    state = {"step": 0, "best_metric": None, "best_step": None, "baseline": {}, "consecutive_nonfinite": 0,
             "metrics_lines": 0, "final_step": None, "final": {}}
    if resume_from is not None:
        saved_state = ckpt.load_checkpoint(accelerator, resume_from, loss_fn)
        state.update(saved_state)
        log(f"resumed from {resume_from} at step {state['step']}")
        if accelerator.is_main_process:
            state["metrics_lines"] = _truncate_metrics(out / "metrics.jsonl", state["step"],
                                                       saved_state.get("metrics_lines"))
    elif resume and accelerator.is_main_process:
        state["metrics_lines"] = _truncate_metrics(out / "metrics.jsonl", 0, 0)  # starting again from step 0

    metrics_path = out / "metrics.jsonl"

    def record(entry: dict) -> None:
        if accelerator.is_main_process:
            with metrics_path.open("a", encoding="utf-8") as f:
                f.write(json.dumps(entry) + "\n")
            state["metrics_lines"] += 1
        if r.output.report_to:
            accelerator.log({k: v for k, v in entry.items() if k != "step"}, step=entry["step"])

    def evaluate(step: int) -> dict[str, float]:
        scores = {}
        if accelerator.is_main_process and eval_tasks:
            scores = _evaluate(accelerator.unwrap_model(model), eval_tasks, r.eval.batch_size)
            record({"step": step, **{f"eval/{k}": v for k, v in scores.items()}})
        if world_size > 1:  # every process must agree on the best step (it decides who saves)
            from accelerate.utils import broadcast_object_list

            scores = broadcast_object_list([scores])[0]
        return scores

    def save(step: int) -> None:
        def write_loss(path: Path) -> None:
            params = dict(loss_fn.state_dict())
            if params:
                from safetensors.torch import save_file

                save_file({k: v.detach().cpu().contiguous() for k, v in params.items()}, str(path / "loss.safetensors"))

        bad = _nonfinite_parameters(all_params_named)
        if bad:
            raise EmbedtrainError(
                f"training stopped at step {step}: non-finite weights ({', '.join(bad[:3])}"
                f"{', ...' if len(bad) > 3 else ''}); lower train.lr or check the data; {_last_good(out)}"
            )
        needed = ckpt.estimate_bytes([accelerator.unwrap_model(model), loss_fn], [optimizer])
        ckpt.save_checkpoint(accelerator, out, step, {**state, "step": step}, {"recipe.yaml": recipe_text}, write_loss,
                             needed_bytes=needed)
        if accelerator.is_main_process:
            ckpt.prune_checkpoints(out, r.train.keep_last, state["best_step"])

    if state["step"] == 0 and eval_tasks and r.eval.before_training:
        state["baseline"] = evaluate(0)
        if state["baseline"]:
            log(f"before training: {_fmt(state['baseline'])}")

    # -- loop --------------------------------------------------------------------------------
    def backward(loss: torch.Tensor) -> None:
        accelerator.backward(loss)

    def run_step(batch: dict) -> dict:
        batch = _to_device(batch, accelerator.device)
        with experts.routed_batch(encoder, batch_domains, batch["dataset"]):  # MoE: the dataset's expert
            if r.train.gradient_cache_chunk_size:
                return grad_cache_step(model, loss_fn, batch, r.train.gradient_cache_chunk_size, backward,
                                       lambda: accelerator.no_sync(model))
            return plain_step(model, loss_fn, batch, backward)

    loss_params = [p for p in loss_fn.parameters() if p.requires_grad]
    all_params = [p for p in model.parameters() if p.requires_grad] + loss_params
    all_params_named = list(accelerator.unwrap_model(model).named_parameters()) + [
        (f"loss.{n}", p) for n, p in loss_fn.named_parameters()]
    step = state["step"]
    epoch, offset = _steps_from(lambda e: len(plan(e)), step)
    model.train()
    progress = tqdm(total=total_steps, initial=step, desc="training", disable=not accelerator.is_local_main_process,
                    dynamic_ncols=True)
    window: list[dict] = []
    skipped = 0
    last_log = time.time()
    stopped = False
    with _StopRequest() as stop, _closing(progress):
        while step < total_steps and not stopped:
            batches = PlannedBatches(plan(epoch), collator, rank, world_size)
            sampler = list(range(offset, len(batches)))
            loader = torch.utils.data.DataLoader(
                batches, batch_size=None, sampler=sampler, num_workers=r.data.num_workers,
                pin_memory=accelerator.device.type == "cuda",
                # its own generator: creating the iterator must not draw from the global random state
                # (that would shift dropout after a resume)
                generator=torch.Generator().manual_seed(r.train.seed + epoch),
            )
            for batch in loader:
                if step >= total_steps:
                    break
                out_step = run_step(batch)
                finite, grad_norm, loss_value = apply_update(
                    accelerator, optimizer, scheduler, out_step["loss"], all_params, loss_params,
                    r.train.max_grad_norm, state, r.train.max_consecutive_nonfinite, step, out, log)
                skipped += not finite
                optimizer.zero_grad(set_to_none=True)
                step += 1
                progress.update(1)
                if finite:
                    window.append({"loss": float(loss_value), "accuracy": float(out_step["accuracy"]),
                                   "temperature": float(out_step["temperature"]), "grad_norm": float(grad_norm)})
                if step % r.train.log_every == 0 or step == total_steps:
                    now = time.time()
                    n = len(window)
                    entry = {
                        "step": step,
                        "epoch": epoch,
                        "loss": sum(w["loss"] for w in window) / n if n else None,
                        "accuracy": sum(w["accuracy"] for w in window) / n if n else None,
                        "temperature": window[-1]["temperature"] if n else None,
                        "lr": scheduler.get_last_lr()[0],
                        "grad_norm": window[-1]["grad_norm"] if n else None,
                        "examples_per_s": (n + skipped) * global_batch / max(now - last_log, 1e-9),
                    }
                    if skipped:
                        entry["skipped_steps"] = skipped  # non-finite steps in this window (not in the averages)
                    entry.update(experts.routing_log(encoder))  # MoE: expert shares, router accuracy
                    record(entry)
                    if n:
                        progress.set_postfix(loss=f"{entry['loss']:.4f}", acc=f"{entry['accuracy']:.3f}")
                    window, skipped, last_log = [], 0, now
                scores = {}
                if eval_tasks and r.train.eval_every and step % r.train.eval_every == 0 and step < total_steps:
                    scores = evaluate(step)
                    _update_best(state, scores, r.eval.metric, step)
                should_save = (r.train.save_every and step % r.train.save_every == 0) or (
                    scores and state["best_step"] == step)
                if should_save and not finite:
                    # checkpoints follow applied updates only; the next save point writes one
                    log(f"step {step}: no checkpoint after a skipped step")
                    should_save = False
                if _stop_requested(stop, accelerator) and step < total_steps:
                    log(f"stop requested: checkpointing at step {step}")
                    should_save, stopped = True, True
                if should_save and step < total_steps:
                    save(step)
                if stopped:
                    break
            epoch, offset = epoch + 1, 0

    if stopped:
        accelerator.end_training()
        return TrainResult(out, out / "model", step, state["baseline"], {}, state["best_step"], time.time() - t0,
                           stopped=True)

    # -- finish: evaluate, save the final model ----------------------------------------------
    if state["final_step"] == step:  # resumed from the last checkpoint: evaluated and saved already
        final = state["final"]
    else:
        final = evaluate(step) if eval_tasks else {}
        _update_best(state, final, r.eval.metric, step)
        state["final_step"], state["final"] = step, final
        save(step)
    model_dir = out / "model"
    problem = None
    # every process takes part: under FSDP / ZeRO-3 this gathers the shards into one full state dict
    full_state = accelerator.get_state_dict(model)
    if accelerator.is_main_process:
        # model/ and results.json appear whole or not at all: each is written aside, then renamed
        tmp = out / ".model.tmp"
        encoder_out = accelerator.unwrap_model(model)
        needed = int(ckpt.estimate_bytes([encoder_out]) * ckpt.SAFETY_FACTOR)
        try:
            problem = ckpt.free_space_problem(out, needed)
            if problem is None:
                with ckpt.cleaned_on_failure(tmp, "final model", out):
                    if tmp.exists():
                        shutil.rmtree(tmp)
                    encoder_out.save(tmp, state_dict=full_state)
                ckpt.replace_dir(tmp, model_dir)
                summary = {"steps": step, "baseline": state["baseline"], "final": final,
                           "best_step": state["best_step"], "seconds": time.time() - t0}
                ckpt.atomic_write_text(out / "results.json", json.dumps(summary, indent=2))
        except EmbedtrainError as err:
            problem = str(err).replace("checkpoint: ", "final model: ", 1)
    ckpt.raise_if_any(accelerator, problem)
    if accelerator.is_main_process and r.output.plot:
        from embedtrain.train.plot import plot_metrics

        plot_metrics(metrics_path, out / "training_curves.png", r.eval.metric)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return TrainResult(out, model_dir, step, state["baseline"], final, state["best_step"], time.time() - t0)


# -- small helpers ---------------------------------------------------------------------------


def _to_device(batch: dict, device: torch.device) -> dict:
    moved = {}
    for k, v in batch.items():
        if isinstance(v, dict):
            moved[k] = {kk: vv.to(device, non_blocking=True) for kk, vv in v.items()}
        elif isinstance(v, torch.Tensor):
            moved[k] = v.to(device, non_blocking=True)
        else:
            moved[k] = v
    return moved


def apply_update(accelerator, optimizer, scheduler, loss: torch.Tensor, all_params: list, loss_params: list,
                 max_grad_norm: float, state: dict, max_consecutive_nonfinite: int, step: int, out: Path,
                 log) -> tuple[bool, Any, torch.Tensor]:
    """Finish one step after backward: average the loss's own gradients, clip, and step the optimizer and
    scheduler unless the loss or gradient is not finite. Returns (finite, grad_norm, mean loss).

    A non-finite step leaves weights and optimizer state those of the last good step; too many in a row
    stop training with an error naming the last good checkpoint.
    """
    # the loss's own parameters (a learnable temperature) are not inside DDP: average by hand
    if accelerator.num_processes > 1:
        for p in loss_params:
            if p.grad is not None:
                p.grad = accelerator.reduce(p.grad, reduction="mean")
    grad_norm = accelerator.clip_grad_norm_(all_params, max_grad_norm) if max_grad_norm else _grad_norm(all_params)
    if grad_norm is None:  # DeepSpeed clips inside its engine and reports no norm here
        grad_norm = _grad_norm(all_params)
    loss_value = accelerator.reduce(loss.detach().float(), reduction="mean")
    finite = bool(torch.isfinite(loss_value)) and bool(torch.isfinite(torch.as_tensor(grad_norm)))
    if finite:
        optimizer.step()
        scheduler.step()
        state["consecutive_nonfinite"] = 0
    else:
        state["consecutive_nonfinite"] += 1
        log(f"step {step + 1}: non-finite loss or gradient; step skipped "
            f"({state['consecutive_nonfinite']} in a row, limit {max_consecutive_nonfinite})")
        if state["consecutive_nonfinite"] >= max_consecutive_nonfinite:
            optimizer.zero_grad(set_to_none=True)
            first = step + 2 - state["consecutive_nonfinite"]
            raise EmbedtrainError(
                f"training stopped: {state['consecutive_nonfinite']} steps in a row had a non-finite loss "
                f"or gradient (steps {first}-{step + 1}); lower train.lr or check the data; {_last_good(out)}"
            )
    return finite, grad_norm, loss_value


def _grad_norm(params) -> torch.Tensor:
    norms = [p.grad.detach().float().norm() for p in params if p.grad is not None]
    return torch.stack(norms).norm() if norms else torch.tensor(0.0)


def _update_best(state: dict, scores: dict, metric: str, step: int) -> None:
    value = scores.get(f"mean/{metric}")
    if value is not None and (state["best_metric"] is None or value > state["best_metric"]):
        state["best_metric"], state["best_step"] = value, step


def _truncate_metrics(path: Path, step: int, lines: Optional[int]) -> int:
    """Drop metric lines written after the checkpoint we resume from; returns the lines kept.

    ``lines`` is the count the checkpoint recorded (None for checkpoints that predate it: then lines
    up to ``step`` are kept). A line cut short by a kill is dropped too.
    """
    if not path.is_file():
        return 0
    kept = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        if lines is not None and len(kept) >= lines:
            break
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if isinstance(entry, dict) and (lines is not None or entry.get("step", 0) <= step):
            kept.append(line)
    ckpt.atomic_write_text(path, "".join(l + "\n" for l in kept))
    return len(kept)


@contextlib.contextmanager
def _closing(progress):
    """Close the progress bar however the loop ends, so that an error message starts on its own line."""
    try:
        yield progress
    finally:
        progress.close()


def _stop_requested(stop: _StopRequest, accelerator) -> bool:
    """Whether any process received SIGINT/SIGTERM (all processes must stop at the same step)."""
    if accelerator.num_processes == 1:
        return stop.requested
    flag = torch.tensor([1.0 if stop.requested else 0.0], device=accelerator.device)
    return bool(accelerator.reduce(flag, reduction="sum").item() > 0)


def _position_limit(backbone) -> Optional[int]:
    """Tokens a backbone with a learned position table can take (None when it has no such table)."""
    table = getattr(getattr(backbone, "embeddings", None), "position_embeddings", None)
    if not isinstance(table, torch.nn.Embedding):
        return None
    # RoBERTa-style tables start counting after the padding index
    padding_idx = getattr(backbone.embeddings, "padding_idx", None)
    offset = padding_idx + 1 if isinstance(padding_idx, int) and padding_idx >= 0 else 0
    return table.num_embeddings - offset


def _check_position_limit(encoder, r: Recipe) -> None:
    """A token limit above the model's position table would fail in the first forward pass."""
    limit = _position_limit(encoder.backbone)
    if limit is None:
        return
    for name, value in (("query_max_length", encoder.query_max_length),
                        ("document_max_length", encoder.document_max_length)):
        if value > limit:
            field_name = name if getattr(r.model, name) is not None else "max_length"
            raise EmbedtrainError(
                f"model.{field_name}: {value} tokens is more than the {limit} positions of "
                f"{r.model.name_or_path}; set model.{field_name} to at most {limit}"
            )


def _nonfinite_parameters(named_params) -> list[str]:
    with torch.no_grad():
        return [name for name, p in named_params if not bool(torch.isfinite(p).all())]


def _last_good(out: Path) -> str:
    found = ckpt.list_checkpoints(out)
    if not found:
        return "no checkpoint was written"
    return f"the last good checkpoint {found[-1][1]} is kept"


def _recipe_changes(saved: Path, current: dict) -> list[str]:
    """Dotted keys whose values differ between a checkpoint's recipe and ``current`` (output.* aside)."""
    try:
        old = yaml.safe_load(saved.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return []
    if not isinstance(old, dict):
        return []
    a, b = _flat(old), _flat(current)
    return sorted(k for k in set(a) | set(b) if not k.startswith("output.") and a.get(k) != b.get(k))


def _flat(d: dict, prefix: str = "") -> dict:
    flat = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            flat.update(_flat(v, key + "."))
        else:
            flat[key] = v if isinstance(v, (int, float, str, bool)) else str(v)
    return flat


def _fmt(scores: dict[str, float]) -> str:
    return ", ".join(f"{k} {100 * v:.2f}" for k, v in scores.items() if not k.startswith("mean/") or len(scores) > 3)
