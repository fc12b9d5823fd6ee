"""The metric-learning training function: build, prepare, loop, log, evaluate, checkpoint, save.

``embedtrain dml RECIPE`` trains a prompted ViT (or its head, biases, or the whole backbone) with a
proxy loss on the training classes of a labelled image set, and evaluates zero-shot on the other
classes (Recall@K, MAP@R). Read top to bottom; everything a run does is here or one call away.
It runs in one process (one GPU or the CPU): proxy losses need no cross-process negatives, and the
semantic-proxy memory is updated in place.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
import yaml

from embedtrain.config import resolve_path, to_dict
from embedtrain.data.class_sampler import class_balanced_batches
from embedtrain.data.images import ImageClassDataset, build_transform, collate_images, read_labelled_images, split_classes
from embedtrain.dml_config import DMLRecipe
from embedtrain.errors import EmbedtrainError
from embedtrain.eval.dml import evaluate_dml
from embedtrain.losses import PROXY_LOSSES
from embedtrain.models.semantic_proxies import DMLModel, ProxyBank, save_dml_model
from embedtrain.models.visual_prompts import PromptedViT, prompt_layout
from embedtrain.models.vit_backbones import load_vit_backbone
from embedtrain.train import checkpoint as ckpt
from embedtrain.train.accelerator import build_accelerator
from embedtrain.train.loop import (_check_output_dir, _closing, _last_good, _prepare_output_dir, _recipe_changes,
                                   _StopRequest, _truncate_metrics)
from embedtrain.train.optim import build_scheduler


@dataclass
class DMLResult:
    """What a run produced; metrics are on a 0-1 scale and refer to the unseen test classes."""

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


def build_dml_model(r: DMLRecipe, num_classes: int) -> DMLModel:
    """The backbone with its prompts and head, and the proxies of ``num_classes`` training classes."""
    b, tu, pr = r.backbone, r.tuning, r.proxies
    backbone = load_vit_backbone(b.kind, resolve_path(b.name_or_path) if b.kind == "open_clip" else b.name_or_path,
                                 pretrained=b.pretrained, weights=resolve_path(b.weights) if b.weights else None,
                                 revision=b.revision)
    counts = prompt_layout(backbone.num_layers, tu.prompt_depth, tu.num_prompts, tu.prompts_per_layer)
    encoder = PromptedViT(backbone, counts, tu.embed_dim, tu.train_backbone, tu.head_init)
    if pr.semantic and pr.class_prompt_depth > backbone.num_layers:
        raise EmbedtrainError(f"proxies.class_prompt_depth: {pr.class_prompt_depth} is more than the backbone's "
                              f"{backbone.num_layers} blocks")
    proxies = ProxyBank(num_classes, encoder.embed_dim, semantic=pr.semantic, alpha=pr.alpha, accumulate=pr.accumulate,
                        momentum=pr.momentum, class_prompt_depth=pr.class_prompt_depth, class_prompts=pr.class_prompts,
                        width=backbone.width, num_layers=backbone.num_layers, semantic_head=encoder.head)
    return DMLModel(encoder, proxies)


def build_dml_optimizer(model: DMLModel, lr: float, proxy_lr: float, weight_decay: float, kind: str = "adamw",
                        momentum: float = 0.9) -> torch.optim.Optimizer:
    """Three groups: weights with decay; biases, norms and prompts without; the learnable proxies at their own lr."""
    decay, no_decay = [], []
    proxy_params = [model.proxies.learnable]
    for name, p in model.named_parameters():
        if not p.requires_grad or p is model.proxies.learnable:
            continue
        plain = p.ndim < 2 or "norm" in name.lower() or "prompts" in name.split(".")[-1] or ".prompts." in name
        (no_decay if plain else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0},
              {"params": proxy_params, "weight_decay": 0.0, "lr": proxy_lr}]
    groups = [g for g in groups if g["params"]]
    if kind == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum)
    try:
        return torch.optim.AdamW(groups, lr=lr, fused=True)
    except (RuntimeError, ValueError):  # a device or dtype without a fused kernel
        return torch.optim.AdamW(groups, lr=lr, foreach=True)


def build_proxy_loss(r: DMLRecipe) -> torch.nn.Module:
    lo = r.loss
    metrix = {"metrix": lo.metrix, "metrix_weight": lo.metrix_weight, "metrix_beta": lo.metrix_beta}
    if lo.name == "proxy_anchor":
        return PROXY_LOSSES.get(lo.name)(scale=lo.scale, margin=lo.margin, **metrix)
    return PROXY_LOSSES.get(lo.name)(temperature=lo.temperature, **metrix)


def train_dml(recipe: DMLRecipe, resume: Optional[str] = None, log=print) -> DMLResult:
    """Run a DML recipe. ``resume`` is None, ``'auto'`` or a checkpoint path."""
    from accelerate.utils import set_seed
    from tqdm.auto import tqdm

    t0 = time.time()
    r = recipe
    out = Path(r.output.dir)
    if r.train.torch_threads:
        torch.set_num_threads(r.train.torch_threads)

    # -- build: data first (cheap, and its errors should come before the model loads) ----------
    _check_output_dir(out, r.output.overwrite, resuming=resume is not None)
    images = read_labelled_images(resolve_path(r.data.path), r.data.image_column, r.data.label_column)
    train_classes, test_classes = split_classes(images.classes(), r.data.train_class_fraction, r.data.class_split,
                                                r.data.split_seed)
    train_images, train_labels = images.subset(train_classes)
    test_images, test_labels = images.subset(test_classes)
    accelerator = build_accelerator(r.train.mixed_precision, None, str(out))
    if accelerator.num_processes > 1:
        raise EmbedtrainError("embedtrain dml runs in one process; launch it without accelerate launch / torchrun")
    if log is print:
        log = lambda *a: tqdm.write(" ".join(map(str, a)))  # noqa: E731  (a line of its own, not inside the bar)
    log(f"classes: {len(train_classes)} to train ({len(train_images)} images), {len(test_classes)} unseen to test "
        f"({len(test_images)} images)")
    resume_from = ckpt.resolve_resume(out, resume) if resume else None
    if resume == "auto" and resume_from is None:
        log(f"resume: no complete checkpoint in {out}; starting from the beginning")
    if resume_from is not None:
        changed = _recipe_changes(resume_from / "recipe.yaml", to_dict(r))
        if changed:
            log(f"resume: the recipe differs from the checkpoint's in {', '.join(changed)}; the run continues with the new values")

    set_seed(r.train.seed)
    model = build_dml_model(r, len(train_classes))
    backbone = model.encoder.backbone
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    log(f"trainable: {trainable:,} of {total:,} parameters ({100 * trainable / total:.2f}%)")

    d = r.data
    train_transform = build_transform(backbone.image_size, backbone.mean, backbone.std, True, d.augment, d.resize,
                                      d.min_crop_scale)
    eval_transform = build_transform(backbone.image_size, backbone.mean, backbone.std, False, "none", d.resize)
    preload_size = d.resize or min(backbone.image_size)
    train_set = ImageClassDataset(train_images, train_labels, train_transform, d.preload, preload_size)
    test_set = ImageClassDataset(test_images, test_labels, eval_transform, d.preload, preload_size)
    test_loader = torch.utils.data.DataLoader(test_set, batch_size=r.eval.batch_size, shuffle=False,
                                              num_workers=d.num_workers, collate_fn=collate_images)

    def plan(epoch: int) -> list[list[int]]:
        return class_balanced_batches(train_labels, d.batch_size, d.samples_per_class, r.train.seed, epoch)

    steps_per_epoch = len(plan(0))
    if steps_per_epoch == 0:
        raise EmbedtrainError("data: no full class-balanced batch can be formed; lower data.batch_size")
    total_steps = r.train.max_steps or r.train.epochs * steps_per_epoch

    loss_fn = build_proxy_loss(r)
    optimizer = build_dml_optimizer(model, r.train.lr, r.proxies.lr, r.train.weight_decay, r.train.optimizer,
                                    r.train.momentum)
    scheduler = build_scheduler(optimizer, r.train.scheduler, total_steps, r.train.warmup_ratio)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    params = [p for p in model.parameters() if p.requires_grad]

    # -- output directory: only now, after every input check ---------------------------------
    _prepare_output_dir(accelerator, out, r.output.overwrite, resuming=resume is not None)
    recipe_text = yaml.safe_dump(to_dict(r), sort_keys=False)
    if resume:
        ckpt.remove_incomplete(out)
    ckpt.atomic_write_text(out / "recipe.yaml", recipe_text)

    state = {"step": 0, "best_metric": None, "best_step": None, "baseline": {}, "consecutive_nonfinite": 0,
             "metrics_lines": 0, "final_step": None, "final": {}, "train_seconds": 0.0}
    if resume_from is not None:
        saved = ckpt.load_checkpoint(accelerator, resume_from)
        state.update(saved)
        log(f"resumed from {resume_from} at step {state['step']}")
        state["metrics_lines"] = _truncate_metrics(out / "metrics.jsonl", state["step"], saved.get("metrics_lines"))
    elif resume:
        state["metrics_lines"] = _truncate_metrics(out / "metrics.jsonl", 0, 0)
    metrics_path = out / "metrics.jsonl"

    def record(entry: dict) -> None:
        with metrics_path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(entry) + "\n")
        state["metrics_lines"] += 1

    def evaluate(step: int) -> dict[str, float]:
        with accelerator.autocast():
            scores = evaluate_dml(accelerator.unwrap_model(model).encoder, test_loader, r.eval.recall_at,
                                  accelerator.device)
        record({"step": step, **{f"eval/{k}": v for k, v in scores.items()}})
        return scores

    def save(step: int) -> None:
        needed = ckpt.estimate_bytes([accelerator.unwrap_model(model)], [optimizer])
        ckpt.save_checkpoint(accelerator, out, step, {**state, "step": step}, {"recipe.yaml": recipe_text},
                             needed_bytes=needed)
        ckpt.prune_checkpoints(out, r.train.keep_last, state["best_step"])

    def update_best(scores: dict, step: int) -> None:
        value = scores.get("recall@1")
        if value is not None and (state["best_metric"] is None or value > state["best_metric"]):
            state["best_metric"], state["best_step"] = value, step

    if state["step"] == 0 and r.eval.before_training:
        state["baseline"] = evaluate(0)
        log(f"before training (unseen classes): {_fmt(state['baseline'])}")

    # -- loop --------------------------------------------------------------------------------
    step = state["step"]
    epoch, offset = divmod(step, steps_per_epoch)
    model.train()
    loss_fn.train()
    progress = tqdm(total=total_steps, initial=step, desc="training", dynamic_ncols=True)
    window: list[dict] = []
    skipped, last_log, stopped = 0, time.time(), False
    loop_start = time.time()
    with _StopRequest() as stop, _closing(progress):
        while step < total_steps and not stopped:
            batches = plan(epoch)[offset:]
            loader = torch.utils.data.DataLoader(
                train_set, batch_sampler=batches, num_workers=d.num_workers, collate_fn=collate_images,
                pin_memory=accelerator.device.type == "cuda",
                # its own generator: creating the iterator must not draw from the global random state
                generator=torch.Generator().manual_seed(r.train.seed + epoch),
            )
            for batch in loader:
                if step >= total_steps:
                    break
                pixels = batch["pixels"].to(accelerator.device, non_blocking=True)
                labels = batch["labels"].to(accelerator.device, non_blocking=True)
                with accelerator.autocast():
                    outputs = model(pixels, labels)
                    losses = loss_fn(outputs["embeddings"].float(), labels, outputs["proxies"].float())
                accelerator.backward(losses["loss"])
                grad_norm = (accelerator.clip_grad_norm_(params, r.train.max_grad_norm) if r.train.max_grad_norm
                             else torch.norm(torch.stack([p.grad.norm() for p in params if p.grad is not None])))
                finite = bool(torch.isfinite(losses["loss"].detach())) and bool(torch.isfinite(torch.as_tensor(grad_norm)))
                if finite:
                    optimizer.step()
                    scheduler.step()
                    state["consecutive_nonfinite"] = 0
                else:
                    # the update is skipped: weights and optimizer state stay those of the last good step
                    state["consecutive_nonfinite"] += 1
                    skipped += 1
                    log(f"step {step + 1}: non-finite loss or gradient; step skipped")
                    if state["consecutive_nonfinite"] >= r.train.max_consecutive_nonfinite:
                        raise EmbedtrainError(
                            f"training stopped: {state['consecutive_nonfinite']} steps in a row had a non-finite loss "
                            f"or gradient; lower train.lr or check the data; {_last_good(out)}")
                optimizer.zero_grad(set_to_none=True)
                step += 1
                progress.update(1)
                if finite:
                    window.append({k: float(v.detach()) for k, v in losses.items()} | {"grad_norm": float(grad_norm)})
                if step % r.train.log_every == 0 or step == total_steps:
                    now = time.time()
                    entry = {"step": step, "epoch": epoch}
                    for key in sorted({k for w in window for k in w}):
                        values = [w[key] for w in window if key in w]
                        entry[key] = sum(values) / len(values)
                    entry["lr"] = scheduler.get_last_lr()[0]
                    entry["proxy_lr"] = scheduler.get_last_lr()[-1]
                    entry["images_per_s"] = (len(window) + skipped) * d.batch_size / max(now - last_log, 1e-9)
                    if skipped:
                        entry["skipped_steps"] = skipped
                    record(entry)
                    if window:
                        progress.set_postfix(loss=f"{entry['loss']:.4f}", acc=f"{entry['accuracy']:.3f}")
                    window, skipped, last_log = [], 0, now
                scores = {}
                if r.train.eval_every and step % r.train.eval_every == 0 and step < total_steps:
                    scores = evaluate(step)
                    update_best(scores, step)
                    log(f"step {step} (unseen classes): {_fmt(scores)}")
                should_save = bool(r.train.save_every and step % r.train.save_every == 0)
                if stop.requested and step < total_steps:
                    log(f"stop requested: checkpointing at step {step}")
                    should_save, stopped = True, True
                if should_save and finite and step < total_steps:
                    state["train_seconds"] += time.time() - loop_start
                    loop_start = time.time()
                    save(step)
                if stopped:
                    break
            epoch, offset = epoch + 1, 0
    state["train_seconds"] += time.time() - loop_start

    if stopped:
        return DMLResult(out, out / "model", step, state["baseline"], {}, state["best_step"], time.time() - t0,
                         state["train_seconds"], trainable, total, stopped=True)

    # -- finish: evaluate, save the final model ----------------------------------------------
    if state["final_step"] == step:  # resumed from the last checkpoint: evaluated and saved already
        final = state["final"]
    else:
        final = evaluate(step)
        update_best(final, step)
        state["final_step"], state["final"] = step, final
        save(step)
    log(f"after {step} steps (unseen classes): {_fmt(final)}")
    model_dir = out / "model"
    tmp = out / ".model.tmp"
    unwrapped = accelerator.unwrap_model(model)
    problem = ckpt.free_space_problem(out, int(ckpt.estimate_bytes([unwrapped]) * ckpt.SAFETY_FACTOR))
    if problem:
        raise EmbedtrainError(problem.replace("checkpoint: ", "final model: ", 1))
    with ckpt.cleaned_on_failure(tmp, "final model", out):
        if tmp.exists():
            shutil.rmtree(tmp)
        save_dml_model(unwrapped, tmp, {"train_classes": train_classes, "test_classes": test_classes})
    ckpt.replace_dir(tmp, model_dir)
    seconds = time.time() - t0
    summary = {"steps": step, "baseline": state["baseline"], "final": final, "best_step": state["best_step"],
               "seconds": seconds, "train_seconds": state["train_seconds"], "trainable_parameters": trainable,
               "total_parameters": total, "train_classes": len(train_classes), "test_classes": len(test_classes),
               "train_images": len(train_images), "test_images": len(test_images)}
    ckpt.atomic_write_text(out / "results.json", json.dumps(summary, indent=2))
    if r.output.plot:
        from embedtrain.train.plot import plot_metrics

        plot_metrics(metrics_path, out / "training_curves.png", "recall@1")
    accelerator.end_training()
    return DMLResult(out, model_dir, step, state["baseline"], final, state["best_step"], seconds,
                     state["train_seconds"], trainable, total)


def _fmt(scores: dict[str, float]) -> str:
    return ", ".join(f"{k} {100 * v:.2f}" for k, v in scores.items() if k not in ("queries", "singletons"))
