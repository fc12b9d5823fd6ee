"""The multimodal training function (CLIP dual encoders and VLM2Vec): build, prepare, loop, log,
evaluate, checkpoint, save.

It has the shape of :func:`embedtrain.train.loop.train` and shares its pieces: the Accelerator,
the optimizer and schedule, the epoch plans (task-homogeneous, no duplicates), the plain and
GradCache steps of :mod:`embedtrain.train.step` (GradCache with separate query and document
chunk sizes), crash-safe checkpoints with exact resume, the stop-on-signal handling and the
non-finite guard. What differs is the data (rows with images, decoded in the DataLoader workers),
the model (built by ``kind``), the evaluation (image-text retrieval, both directions) and the saved
model (open_clip's folder for CLIP, a sentence-transformers folder for VLM2Vec).
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict
from pathlib import Path
from typing import Optional

import torch
import yaml

from embedtrain.data.multimodal import MultimodalCollator, read_multimodal_pairs, split_inputs
from embedtrain.data.collate import PlannedBatches
from embedtrain.data.sampler import plan_epoch
from embedtrain.errors import EmbedtrainError
from embedtrain.eval.retrieval import evaluate_image_text, load_beir
from embedtrain.losses import InfoNCELoss, SigmoidLoss
from embedtrain.multimodal_config import MultimodalRecipe, mm_dataset_name, mm_task_name, role_columns
from embedtrain.config import to_dict
from embedtrain.train import checkpoint as ckpt
from embedtrain.train.accelerator import build_accelerator

# the text loop's helpers: one implementation of resume bookkeeping, signals and output folders
from embedtrain.train.loop import (
    apply_update,
    TrainResult,
    _check_output_dir,
    _closing,
    _flat,
    _last_good,
    _nonfinite_parameters,
    _prepare_output_dir,
    _recipe_changes,
    _steps_from,
    _stop_requested,
    _StopRequest,
    _to_device,
    _truncate_metrics,
    _update_best,
)
from embedtrain.train.optim import build_optimizer, build_scheduler
from embedtrain.train.step import grad_cache_step, plain_step

METRICS = ("recall@1", "recall@5", "recall@10", "ndcg@10", "mrr@10")


def _load_data(r: MultimodalRecipe):
    return [
        read_multimodal_pairs(
            ds.path, f"data.train[{i}]", mm_dataset_name(ds), role_columns(ds), ds.image_root, ds.query_template,
            ds.document_template, ds.weight, ds.split, ds.max_rows, r.data.bad_images, r.data.verify_images,
        )
        for i, ds in enumerate(r.data.train)
    ]


def build_encoder(r: MultimodalRecipe):
    """The model of a recipe, with its trainable parameters chosen (towers, LoRA)."""
    m = r.model
    templates = {"query": r.data.train[0].query_template, "document": r.data.train[0].document_template}
    if r.kind == "clip":
        from embedtrain.models.clip import architecture_config, load_clip_encoder

        encoder = load_clip_encoder(
            m.name_or_path, m.pretrained, architecture_config(**asdict(m.architecture)),
            init_logit_bias=r.loss.bias if r.loss.name == "siglip" else None, templates=templates,
            gradient_checkpointing=m.gradient_checkpointing,
        )
        encoder.set_towers(m.image_tower, m.text_tower, m.lora.r, m.lora.alpha, m.lora.dropout, m.lora.target_modules)
        return encoder
    from embedtrain.models.vlm import load_vlm_encoder

    return load_vlm_encoder(
        m.name_or_path, pooling=m.pooling, normalize=m.normalize, max_length=m.max_length, finetune=m.finetune,
        lora_r=m.lora.r, lora_alpha=m.lora.alpha, lora_dropout=m.lora.dropout, lora_targets=m.lora.target_modules,
        train_vision=m.train_vision, dtype=m.dtype, image_max_pixels=m.image_max_pixels,
        attn_implementation=m.attn_implementation, gradient_checkpointing=m.gradient_checkpointing,
        trust_remote_code=m.trust_remote_code, revision=m.revision, templates=templates,
    )


def build_loss(r: MultimodalRecipe):
    lo, gather = r.loss, r.train.gather_across_processes
    if r.kind == "clip":
        if lo.name == "siglip":
            return SigmoidLoss(temperature=lo.temperature, learnable_temperature=lo.learnable_temperature,
                               bias=lo.bias, learnable_bias=lo.learnable_bias, gather_across_processes=gather)
        # CLIP's loss: symmetric InfoNCE over the global batch with a learnable temperature
        return InfoNCELoss(temperature=lo.temperature, learnable_temperature=lo.learnable_temperature,
                           symmetric=True, gather_across_processes=gather)
    return InfoNCELoss(temperature=lo.temperature, learnable_temperature=lo.learnable_temperature,
                       symmetric=lo.symmetric, in_batch_negatives=lo.in_batch_negatives,
                       mask_false_negatives=lo.mask_false_negatives, gather_across_processes=gather)


def chunk_sizes(t) -> Optional[dict[str, int]]:
    """GradCache chunk per role, or None when GradCache is off."""
    query = t.gradient_cache_query_chunk_size or t.gradient_cache_chunk_size
    document = t.gradient_cache_document_chunk_size or t.gradient_cache_chunk_size
    if query is None and document is None:
        return None
    big = 1 << 30  # a role without a chunk size is embedded in one piece
    return {"query": query or big, "positive": document or big, "negative": document or big}


def evaluate_tasks(encoder, tasks, batch_size: int, show_progress: bool = True) -> dict[str, float]:
    """``<task>/<direction>/<metric>`` for every task and direction, and ``mean/<metric>`` over them all."""
    out: dict[str, float] = {}
    for cfg, data in tasks:
        scores = evaluate_image_text(encoder, data, cfg.query_template, cfg.document_template, batch_size=batch_size,
                                     both_directions=cfg.both_directions, show_progress=show_progress)
        out.update({f"{data.name}/{k}": v for k, v in scores.items()})
    for metric in METRICS:
        values = [v for k, v in out.items() if k.endswith(f"/{metric}")]
        if values:
            out[f"mean/{metric}"] = sum(values) / len(values)
    return out


def train_multimodal(recipe: MultimodalRecipe, resume: Optional[str] = None, log=print) -> TrainResult:
    """Run a multimodal recipe. ``resume`` is None, ``'auto'`` or a checkpoint path."""
    from accelerate.utils import set_seed
    from tqdm.auto import tqdm

    t0 = time.time()
    r = recipe
    out = Path(r.output.dir)
    if r.train.torch_threads:
        torch.set_num_threads(r.train.torch_threads)

    # -- build: data first (cheap, and its errors, bad images included, come before the model loads)
    _check_output_dir(out, r.output.overwrite, resuming=resume is not None)
    datasets = _load_data(r)
    accelerator = build_accelerator(r.train.mixed_precision, r.output.report_to or None, str(out))
    world_size, rank = accelerator.num_processes, accelerator.process_index
    if not accelerator.is_main_process:
        log = lambda *_: None  # noqa: E731  (one voice per run)
    elif log is print:
        log = lambda *a: tqdm.write(" ".join(map(str, a)))  # noqa: E731
    bad_before = [b for ds in datasets for b in ds.skipped]
    for b in bad_before[:20]:
        log(f"skipped: {b.message()}")
    if bad_before:
        log(f"skipped {len(bad_before)} rows with bad images (data.bad_images: skip)")
    global_batch = r.data.batch_size * world_size
    for i, ds in enumerate(datasets):
        if len(ds) < global_batch:
            raise EmbedtrainError(
                f"data.train[{i}]: {ds.name} has {len(ds)} usable rows, fewer than one batch "
                f"({r.data.batch_size} x {world_size} processes); lower data.batch_size or add rows"
            )
    eval_tasks = [(t, load_beir(t.path, mm_task_name(t))) for t in r.eval.tasks]
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
    encoder = build_encoder(r)
    log(f"trainable: {encoder.trainable_summary()}")
    loss_fn = build_loss(r)
    collator = MultimodalCollator(datasets, encoder.inputs, r.data.bad_images)
    chunks = chunk_sizes(r.train)

    plans: dict[int, list] = {}

    def plan(epoch: int):
        if epoch not in plans:
            plans.clear()
            plans[epoch] = plan_epoch(
                [len(d) for d in datasets], [d.row_keys for d in datasets], global_batch, r.train.seed, epoch,
                lengths=None, weights=[d.weight for d in datasets], mixing=r.data.mixing,
                no_duplicates=r.data.no_duplicates,
            )
        return plans[epoch]

    steps_per_epoch = len(plan(0))
    if steps_per_epoch == 0:
        raise EmbedtrainError("data.train: no full batch can be formed without repeating a text or image; "
                              "lower data.batch_size or add rows")
    total_steps = r.train.max_steps or r.train.epochs * steps_per_epoch

    optimizer = build_optimizer(encoder, loss_fn, r.train.lr, r.train.weight_decay)
    scheduler = build_scheduler(optimizer, r.train.scheduler, total_steps, r.train.warmup_ratio)
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
    state = {"step": 0, "best_metric": None, "best_step": None, "baseline": {}, "consecutive_nonfinite": 0,
             "metrics_lines": 0, "final_step": None, "final": {}, "bad_images_in_training": 0}
    if resume_from is not None:
        saved_state = ckpt.load_checkpoint(accelerator, resume_from, loss_fn)
        state.update(saved_state)
        log(f"resumed from {resume_from} at step {state['step']}")
        if accelerator.is_main_process:
            state["metrics_lines"] = _truncate_metrics(out / "metrics.jsonl", state["step"],
                                                       saved_state.get("metrics_lines"))
    elif resume and accelerator.is_main_process:
        state["metrics_lines"] = _truncate_metrics(out / "metrics.jsonl", 0, 0)

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
            scores = evaluate_tasks(accelerator.unwrap_model(model), eval_tasks, r.eval.batch_size)
            record({"step": step, **{f"eval/{k}": v for k, v in scores.items()}})
        if world_size > 1:
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
            log(f"before training: {_fmt(state['baseline'], r.eval.metric)}")

    # -- loop --------------------------------------------------------------------------------
    def backward(loss: torch.Tensor) -> None:
        accelerator.backward(loss)

    def run_step(batch: dict) -> dict:
        batch = _to_device(batch, accelerator.device)
        if chunks:
            return grad_cache_step(model, loss_fn, batch, chunks, backward, lambda: accelerator.no_sync(model),
                                   split=split_inputs)
        return plain_step(model, loss_fn, batch, backward)

    loss_params = [p for p in loss_fn.parameters() if p.requires_grad]
    all_params = [p for p in model.parameters() if p.requires_grad] + loss_params
    all_params_named = [(n, p) for n, p in accelerator.unwrap_model(model).named_parameters() if p.requires_grad] + [
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
            loader = torch.utils.data.DataLoader(
                batches, batch_size=None, sampler=list(range(offset, len(batches))), num_workers=r.data.num_workers,
                pin_memory=accelerator.device.type == "cuda", generator=torch.Generator().manual_seed(r.train.seed + epoch),
            )
            for batch in loader:
                if step >= total_steps:
                    break
                bad_here = batch.pop("bad_images")
                for b in bad_here:
                    log(f"step {step + 1}: {b.message()}")
                if _any_process(accelerator, batch.pop("stop")):
                    # a file that passed the checks before training broke since; leave a checkpoint first
                    message = bad_here[-1].message() if bad_here else "another process hit a bad image"
                    if step > 0:
                        save(step)
                    raise EmbedtrainError(
                        f"training stopped at step {step + 1}: {message}; fix or remove the row, or set "
                        f"data.bad_images: skip, then resume with --resume auto; {_last_good(out)}"
                    )
                state["bad_images_in_training"] += len(bad_here)
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
                        entry["skipped_steps"] = skipped
                    if state["bad_images_in_training"]:
                        entry["bad_images"] = state["bad_images_in_training"]
                    record(entry)
                    if n:
                        progress.set_postfix(loss=f"{entry['loss']:.4f}", acc=f"{entry['accuracy']:.3f}")
                    window, skipped, last_log = [], 0, now
                scores = {}
                if eval_tasks and r.train.eval_every and step % r.train.eval_every == 0 and step < total_steps:
                    scores = evaluate(step)
                    _update_best(state, scores, r.eval.metric, step)
                    log(f"step {step}: {_fmt(scores, r.eval.metric)}")
                should_save = (r.train.save_every and step % r.train.save_every == 0) or (
                    scores and state["best_step"] == step)
                if should_save and not finite:
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
    if state["final_step"] == step:
        final = state["final"]
    else:
        final = evaluate(step) if eval_tasks else {}
        _update_best(state, final, r.eval.metric, step)
        state["final_step"], state["final"] = step, final
        save(step)
    model_dir = out / "model"
    problem = None
    if accelerator.is_main_process:
        tmp = out / ".model.tmp"
        encoder_out = accelerator.unwrap_model(model)
        needed = int(ckpt.estimate_bytes([encoder_out]) * ckpt.SAFETY_FACTOR)
        try:
            problem = ckpt.free_space_problem(out, needed)
            if problem is None:
                with ckpt.cleaned_on_failure(tmp, "final model", out):
                    if tmp.exists():
                        shutil.rmtree(tmp)
                    # the trained temperature (and SigLIP's bias) go into the saved model
                    loss_state = {k: getattr(loss_fn, k).detach().cpu() for k in ("log_scale", "bias")
                                  if isinstance(getattr(loss_fn, k, None), torch.Tensor)}
                    encoder_out.save(tmp, loss_state=loss_state)
                ckpt.replace_dir(tmp, model_dir)
                summary = {"steps": step, "baseline": state["baseline"], "final": final,
                           "best_step": state["best_step"], "seconds": time.time() - t0,
                           "bad_images": {"skipped_before_training": len(bad_before),
                                          "replaced_during_training": state["bad_images_in_training"]}}
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


def _any_process(accelerator, flag: bool) -> bool:
    if accelerator.num_processes == 1:
        return bool(flag)
    value = torch.tensor([1.0 if flag else 0.0], device=accelerator.device)
    return bool(accelerator.reduce(value, reduction="sum").item() > 0)


def _fmt(scores: dict[str, float], metric: str) -> str:
    """The selection metric of every task and direction, x100."""
    return ", ".join(f"{k} {100 * v:.2f}" for k, v in scores.items() if k.endswith(f"/{metric}"))
