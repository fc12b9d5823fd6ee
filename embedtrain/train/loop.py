"""The training function: build, prepare, loop, log, evaluate, checkpoint, save.

Read top to bottom; everything a run does is here or one call away.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
import yaml

from embedtrain.config import Recipe, dataset_name, task_name, to_dict
from embedtrain.data import BatchCollator, PlannedBatches, plan_epoch, pretokenize, read_pairs, token_lengths
from embedtrain.errors import EmbedtrainError
from embedtrain.eval.retrieval import evaluate_retrieval, load_beir
from embedtrain.losses import LOSSES
from embedtrain.models import load_text_encoder
from embedtrain.train import checkpoint as ckpt
from embedtrain.train.accelerator import build_accelerator
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
    """SIGINT/SIGTERM ask the loop to finish the current step, checkpoint and exit."""

    def __init__(self):
        self.requested = False
        self._previous = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread
                pass
        return self

    def _handle(self, signum, frame):
        if self.requested:  # a second signal stops at once
            raise KeyboardInterrupt
        self.requested = True

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
    return [
        read_pairs(
            ds.path, f"data.train[{i}]", dataset_name(ds), ds.query_column, ds.positive_column, ds.negative_columns,
            ds.query_prompt, ds.document_prompt, ds.weight, ds.split, ds.max_rows,
        )
        for i, ds in enumerate(recipe.data.train)
    ]


def _evaluate(encoder, tasks, batch_size: int) -> dict[str, float]:
    """Metrics per task as ``<task>/<metric>`` plus the mean over tasks as ``mean/<metric>``."""
    out: dict[str, float] = {}
    for cfg, data in tasks:
        scores = evaluate_retrieval(encoder, data, cfg.query_prompt or None, cfg.document_prompt or None,
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


def train(recipe: Recipe, resume: Optional[str] = None, log=print) -> TrainResult:
    """Run a recipe. ``resume`` is None, ``'auto'`` or a checkpoint path."""
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
    accelerator = build_accelerator(r.train.mixed_precision, r.output.report_to or None, str(out))
    world_size, rank = accelerator.num_processes, accelerator.process_index
    if not accelerator.is_main_process:
        log = lambda *_: None  # noqa: E731  (one voice per run)
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
        log(f"resume: skipping incomplete checkpoint {bad} (killed while writing)")

    set_seed(r.train.seed)
    encoder = load_text_encoder(
        r.model.name_or_path, pooling=r.model.pooling, normalize=r.model.normalize, max_length=r.model.max_length,
        query_max_length=r.model.query_max_length, document_max_length=r.model.document_max_length,
        query_prompt=r.data.train[0].query_prompt, document_prompt=r.data.train[0].document_prompt,
        attn_implementation=r.model.attn_implementation, trust_remote_code=r.model.trust_remote_code,
        revision=r.model.revision, gradient_checkpointing=r.model.gradient_checkpointing,
    )
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
    collator = BatchCollator(datasets, encoder.tokenizer, encoder.max_length_for)

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
    optimizer = build_optimizer(encoder, loss_fn, r.train.lr, r.train.weight_decay)
    scheduler = build_scheduler(optimizer, r.train.scheduler, total_steps, r.train.warmup_ratio)
    if r.train.compile:
        encoder.backbone = torch.compile(encoder.backbone, dynamic=True)
    model, optimizer, scheduler = accelerator.prepare(encoder, optimizer, scheduler)
    loss_fn.to(accelerator.device)

    # -- output directory: only now, after every input check ---------------------------------
    _prepare_output_dir(accelerator, out, r.output.overwrite, resuming=resume is not None)
    recipe_text = yaml.safe_dump(to_dict(r), sort_keys=False)
    if accelerator.is_main_process:
        (out / "recipe.yaml").write_text(recipe_text, encoding="utf-8")
    if r.output.report_to:
        accelerator.init_trackers("embedtrain", config=_flat(to_dict(r)))

    # -- resume ----------------------------------------------------------------------------
    state = {"step": 0, "best_metric": None, "best_step": None, "baseline": {}, "consecutive_nonfinite": 0}
    if resume_from is not None:
        accelerator.load_state(str(resume_from))
        loss_path = resume_from / "loss.safetensors"
        if loss_path.is_file():
            from safetensors.torch import load_file

            loss_fn.load_state_dict(load_file(str(loss_path)), strict=False)
        state.update(ckpt.read_state(resume_from))
        log(f"resumed from {resume_from} at step {state['step']}")
        if accelerator.is_main_process:
            _truncate_metrics(out / "metrics.jsonl", state["step"])

    metrics_path = out / "metrics.jsonl"

    def record(entry: dict) -> None:
        if accelerator.is_main_process:
            with metrics_path.open("a", encoding="utf-8") as f:
                f.write(json.dumps(entry) + "\n")
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

        ckpt.save_checkpoint(accelerator, out, step, {**state, "step": step}, {"recipe.yaml": recipe_text}, write_loss)
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
        if r.train.gradient_cache_chunk_size:
            return grad_cache_step(model, loss_fn, batch, r.train.gradient_cache_chunk_size, backward,
                                   lambda: accelerator.no_sync(model))
        return plain_step(model, loss_fn, batch, backward)

    loss_params = [p for p in loss_fn.parameters() if p.requires_grad]
    all_params = [p for p in model.parameters() if p.requires_grad] + loss_params
    step = state["step"]
    epoch, offset = _steps_from(lambda e: len(plan(e)), step)
    model.train()
    progress = tqdm(total=total_steps, initial=step, desc="training", disable=not accelerator.is_local_main_process,
                    dynamic_ncols=True)
    window: list[dict] = []
    last_log = time.time()
    stopped = False
    with _StopRequest() as stop:
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
                # the loss's own parameters (a learnable temperature) are not inside DDP: average by hand
                for p in loss_params:
                    if p.grad is not None and world_size > 1:
                        p.grad = accelerator.reduce(p.grad, reduction="mean")
                grad_norm = (
                    accelerator.clip_grad_norm_(all_params, r.train.max_grad_norm)
                    if r.train.max_grad_norm else _grad_norm(all_params)
                )
                loss_value = accelerator.reduce(out_step["loss"].detach().float(), reduction="mean")
                finite = bool(torch.isfinite(loss_value)) and bool(torch.isfinite(torch.as_tensor(grad_norm)))
                if finite:
                    optimizer.step()
                    scheduler.step()
                    state["consecutive_nonfinite"] = 0
                else:
                    state["consecutive_nonfinite"] += 1
                    log(f"step {step + 1}: non-finite loss or gradient; step skipped "
                        f"({state['consecutive_nonfinite']} in a row)")
                    if state["consecutive_nonfinite"] >= r.train.max_consecutive_nonfinite:
                        optimizer.zero_grad(set_to_none=True)
                        raise EmbedtrainError(
                            f"training stopped: {state['consecutive_nonfinite']} steps in a row had a non-finite loss "
                            f"or gradient (step {step + 1}); lower train.lr or check the data; the last good "
                            f"checkpoint in {ckpt.checkpoint_root(out)} is kept"
                        )
                optimizer.zero_grad(set_to_none=True)
                step += 1
                progress.update(1)
                window.append({"loss": float(loss_value), "accuracy": float(out_step["accuracy"]),
                               "temperature": float(out_step["temperature"])})
                if step % r.train.log_every == 0 or step == total_steps:
                    now = time.time()
                    entry = {
                        "step": step,
                        "epoch": epoch,
                        "loss": sum(w["loss"] for w in window) / len(window),
                        "accuracy": sum(w["accuracy"] for w in window) / len(window),
                        "temperature": window[-1]["temperature"],
                        "lr": scheduler.get_last_lr()[0],
                        "grad_norm": float(grad_norm),
                        "examples_per_s": len(window) * global_batch / max(now - last_log, 1e-9),
                    }
                    record(entry)
                    progress.set_postfix(loss=f"{entry['loss']:.4f}", acc=f"{entry['accuracy']:.3f}")
                    window, last_log = [], now
                scores = {}
                if eval_tasks and r.train.eval_every and step % r.train.eval_every == 0 and step < total_steps:
                    scores = evaluate(step)
                    _update_best(state, scores, r.eval.metric, step)
                should_save = (r.train.save_every and step % r.train.save_every == 0) or (
                    scores and state["best_step"] == step)
                if stop.requested:
                    log(f"stop requested: checkpointing at step {step}")
                    should_save, stopped = True, True
                if should_save and step < total_steps:
                    save(step)
                if stopped:
                    break
            epoch, offset = epoch + 1, 0
    progress.close()

    if stopped:
        accelerator.end_training()
        return TrainResult(out, out / "model", step, state["baseline"], {}, state["best_step"], time.time() - t0,
                           stopped=True)

    # -- finish: evaluate, save the final model ----------------------------------------------
    final = evaluate(step) if eval_tasks else {}
    _update_best(state, final, r.eval.metric, step)
    save(step)
    model_dir = out / "model"
    if accelerator.is_main_process:
        tmp = out / ".model.tmp"
        if tmp.exists():
            shutil.rmtree(tmp)
        accelerator.unwrap_model(model).save(tmp)
        if model_dir.exists():
            shutil.rmtree(model_dir)
        os.replace(tmp, model_dir)
        summary = {"steps": step, "baseline": state["baseline"], "final": final, "best_step": state["best_step"],
                   "seconds": time.time() - t0}
        (out / "results.json").write_text(json.dumps(summary, indent=2), encoding="utf-8")
        if r.output.plot:
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


def _grad_norm(params) -> torch.Tensor:
    norms = [p.grad.detach().float().norm() for p in params if p.grad is not None]
    return torch.stack(norms).norm() if norms else torch.tensor(0.0)


def _update_best(state: dict, scores: dict, metric: str, step: int) -> None:
    value = scores.get(f"mean/{metric}")
    if value is not None and (state["best_metric"] is None or value > state["best_metric"]):
        state["best_metric"], state["best_step"] = value, step


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop metric lines written after the checkpoint we resume from."""
    if not path.is_file():
        return
    lines = [l for l in path.read_text(encoding="utf-8").splitlines() if l.strip()]
    kept = [l for l in lines if json.loads(l).get("step", 0) <= step]
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(l + "\n" for l in kept), encoding="utf-8")
    os.replace(tmp, path)


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
