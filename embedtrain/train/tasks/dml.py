"""Metric learning on labelled images: a prompted ViT (or its head, biases, or the whole backbone)
trained with a proxy loss on the training classes, evaluated zero-shot on the other classes
(Recall@K, MAP@R). Runs in one process: proxy losses need no cross-process negatives, and the
semantic-proxy memory is updated in place. The diagnostics probe is pairs of same-class images of the unseen
classes (:func:`~embedtrain.data.probe.same_class_pairs`): no training image is held out for it."""

from __future__ import annotations

from pathlib import Path

import torch

from embedtrain.config import resolve_path
from embedtrain.data.class_sampler import class_balanced_batches
from embedtrain.data.images import ImageClassDataset, build_transform, collate_images, read_labelled_images, split_classes
from embedtrain.data.probe import MIN_ROWS, Probe, same_class_pairs
from embedtrain.errors import EmbedtrainError
from embedtrain.eval.dml import embed_batches, evaluate_dml
from embedtrain.losses import PROXY_LOSSES
from embedtrain.models.semantic_proxies import DMLModel, ProxyBank, save_dml_model
from embedtrain.models.visual_prompts import PromptedViT, prompt_layout
from embedtrain.models.vit_backbones import load_vit_backbone
from embedtrain.train import compact
from embedtrain.train.optim import parameter_groups
from embedtrain.train.task import Task, module_with_state


def build_dml_model(r, num_classes: int) -> DMLModel:
    """The backbone with its prompts and head, and the proxies of ``num_classes`` training classes."""
    b, tu, pr = r.model.backbone, r.model.tuning, r.model.proxies
    backbone = load_vit_backbone(b.kind, resolve_path(b.name_or_path) if b.kind == "open_clip" else b.name_or_path,
                                 pretrained=b.pretrained, weights=resolve_path(b.weights) if b.weights else None,
                                 revision=b.revision)
    counts = prompt_layout(backbone.num_layers, tu.prompt_depth, tu.num_prompts, tu.prompts_per_layer)
    encoder = PromptedViT(backbone, counts, tu.embed_dim, tu.train_backbone, tu.head_init)
    if pr.semantic and pr.class_prompt_depth > backbone.num_layers:
        raise EmbedtrainError(f"model.proxies.class_prompt_depth: {pr.class_prompt_depth} is more than the backbone's "
                              f"{backbone.num_layers} blocks")
    proxies = ProxyBank(num_classes, encoder.embed_dim, semantic=pr.semantic, alpha=pr.alpha, accumulate=pr.accumulate,
                        momentum=pr.momentum, class_prompt_depth=pr.class_prompt_depth, class_prompts=pr.class_prompts,
                        width=backbone.width, num_layers=backbone.num_layers, semantic_head=encoder.head)
    return DMLModel(encoder, proxies)


def build_proxy_loss(r) -> torch.nn.Module:
    lo = r.loss
    metrix = {"metrix": lo.metrix, "metrix_weight": lo.metrix_weight, "metrix_beta": lo.metrix_beta}
    if lo.name == "proxy_anchor":
        loss = PROXY_LOSSES.get(lo.name)(scale=lo.scale, margin=lo.margin, **metrix)
    else:
        loss = PROXY_LOSSES.get(lo.name)(temperature=lo.temperature, **metrix)
    # the proxy losses compare unit-length embeddings and proxies: each prefix is normalised again, and the
    # proxies are cut and quantized as the embeddings are
    return compact.wrap_loss(loss, lo.compact, True, ("embeddings", "proxies"))


class MetricLearningTask(Task):
    throughput_key = "images_per_s"
    last_value_keys = ()
    max_processes = 1

    def __init__(self, recipe, log=print):
        super().__init__(recipe, log)
        self._plan_cache: dict[int, list] = {}

    # -- data -------------------------------------------------------------------------------------
    def read_data(self) -> None:
        d = self.recipe.data
        images = read_labelled_images(resolve_path(d.path), d.image_column, d.label_column)
        self.train_classes, self.test_classes = split_classes(images.classes(), d.train_class_fraction, d.class_split,
                                                              d.split_seed)
        self.train_images, self.train_labels = images.subset(self.train_classes)
        self.test_images, self.test_labels = images.subset(self.test_classes)
        self._choose_probe()

    def _choose_probe(self) -> None:
        """Same-class image pairs of the unseen classes as the diagnostics probe (as many as
        eval.diagnostics.probe_rows asks, one pair per class per round)."""
        wanted = self.recipe.eval.diagnostics.probe_rows
        if not wanted:
            return
        self.probe_pairs = same_class_pairs(self.test_labels, wanted)
        if not self.probe_pairs:
            self.probe_off = (f"the {len(self.test_classes)} unseen classes' {len(self.test_images)} images make fewer "
                              f"than {MIN_ROWS} same-class pairs")
            self.log(f"diagnostics: off; {self.probe_off}; add images or set eval.diagnostics.probe_rows=0")
            return
        paths = list(self.test_images.paths)
        self.probe = Probe(queries=[[paths[a] for a, _ in self.probe_pairs]],
                           positives=[[paths[b] for _, b in self.probe_pairs]], excluded_rows=[0])
        classes = len({int(self.test_labels[a]) for a, _ in self.probe_pairs})
        self.log(f"diagnostics probe: {self.probe.rows} pairs of same-class images from {classes} unseen classes; "
                 "no training image held out")

    def check_data(self, world_size: int) -> None:
        self.log(f"classes: {len(self.train_classes)} to train ({len(self.train_images)} images), "
                 f"{len(self.test_classes)} unseen to test ({len(self.test_images)} images)")
        if self.batches_in_epoch(0) == 0:
            raise EmbedtrainError("data: no full class-balanced batch can be formed; lower data.batch_size")

    def _plan(self, epoch: int) -> list[list[int]]:
        d = self.recipe.data
        if epoch not in self._plan_cache:
            self._plan_cache.clear()  # keep one epoch in memory
            self._plan_cache[epoch] = class_balanced_batches(self.train_labels, d.batch_size, d.samples_per_class,
                                                             self.recipe.train.seed, epoch)
        return self._plan_cache[epoch]

    def batches_in_epoch(self, epoch: int) -> int:
        # class-balanced plans differ in length from epoch to epoch (classes with few images run out)
        return len(self._plan(epoch))

    def loader(self, epoch: int, offset: int, rank: int, world_size: int, pin_memory: bool):
        return torch.utils.data.DataLoader(
            self.train_set, batch_sampler=self._plan(epoch)[offset:], num_workers=self.recipe.data.num_workers,
            collate_fn=collate_images, pin_memory=pin_memory,
            # its own generator: creating the iterator must not draw from the global random state
            generator=torch.Generator().manual_seed(self.recipe.train.seed + epoch),
        )

    # -- model ------------------------------------------------------------------------------------
    def build(self, device: torch.device):
        r, d = self.recipe, self.recipe.data
        model = build_dml_model(r, len(self.train_classes))
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        total = sum(p.numel() for p in model.parameters())
        self.log(f"trainable: {trainable:,} of {total:,} parameters ({100 * trainable / total:.2f}%)")
        backbone = model.encoder.backbone
        train_transform = build_transform(backbone.image_size, backbone.mean, backbone.std, True, d.augment, d.resize,
                                          d.min_crop_scale)
        eval_transform = build_transform(backbone.image_size, backbone.mean, backbone.std, False, "none", d.resize)
        preload_size = d.resize or min(backbone.image_size)
        self.train_set = ImageClassDataset(self.train_images, self.train_labels, train_transform, d.preload, preload_size)
        test_set = ImageClassDataset(self.test_images, self.test_labels, eval_transform, d.preload, preload_size)
        self.test_loader = torch.utils.data.DataLoader(test_set, batch_size=r.eval.batch_size, shuffle=False,
                                                       num_workers=d.num_workers, collate_fn=collate_images)
        return model, build_proxy_loss(r)

    def parameter_groups(self, model) -> list[dict]:
        """Weights with decay; biases, norms and prompts without; the learnable proxies at their own lr."""
        learnable = model.proxies.learnable
        named = [(n, p) for n, p in model.named_parameters() if p is not learnable]
        return parameter_groups(named, self.recipe.train.weight_decay) + [
            {"params": [learnable], "weight_decay": 0.0, "lr": self.recipe.model.proxies.lr}]

    # -- training ---------------------------------------------------------------------------------
    def step(self, model, loss_fn, batch: dict, accelerator) -> dict:
        pixels, labels = batch["pixels"], batch["labels"]
        with accelerator.autocast():
            outputs = model(pixels, labels)
            losses = loss_fn(outputs["embeddings"].float(), labels, outputs["proxies"].float())
        accelerator.backward(losses["loss"])
        return {k: v.detach() for k, v in losses.items()}

    def log_extras(self, learning_rates: list[float]) -> dict:
        return {"proxy_lr": learning_rates[-1]}

    # -- evaluation -------------------------------------------------------------------------------
    def evaluate(self, model, accelerator) -> dict[str, float]:
        with accelerator.autocast():
            return evaluate_dml(model.encoder, self.test_loader, self.recipe.eval.recall_at, accelerator.device)

    def probe_embeddings(self, model):
        """The probe pairs' embeddings, each image embedded once as the evaluation embeds it (eval mode, the
        evaluation's transform)."""
        if self.probe is None:
            return None
        images = sorted({i for pair in self.probe_pairs for i in pair})
        # its own generator: measuring must not draw from the global random state that training's augmentation uses
        loader = torch.utils.data.DataLoader(torch.utils.data.Subset(self.test_loader.dataset, images),
                                             batch_size=self.recipe.eval.batch_size, collate_fn=collate_images,
                                             generator=torch.Generator())
        encoder, was_training = model.encoder, model.encoder.training
        encoder.eval()
        try:
            with torch.no_grad():
                embeddings, _ = embed_batches(encoder, loader, next(encoder.parameters()).device)
        finally:
            encoder.train(was_training)
        row = {image: k for k, image in enumerate(images)}
        return (embeddings[[row[a] for a, _ in self.probe_pairs]], embeddings[[row[b] for _, b in self.probe_pairs]])

    @property
    def selection_key(self) -> str:
        return self.recipe.eval.metric

    def format_scores(self, scores: dict[str, float]) -> str:
        return "(unseen classes) " + ", ".join(f"{k} {100 * v:.2f}" for k, v in scores.items()
                                              if k not in ("queries", "singletons"))

    # -- output -----------------------------------------------------------------------------------
    def export(self, model, loss_fn, path: Path, state_dict: dict) -> None:
        model = module_with_state(model, state_dict, lambda: build_dml_model(self.recipe, len(self.train_classes)))
        save_dml_model(model, path, {"train_classes": self.train_classes, "test_classes": self.test_classes})
        compact.write_record(path, self.recipe.loss.compact, model.encoder.embed_dim, True)

    def results(self) -> dict:
        out = {"train_classes": len(self.train_classes), "test_classes": len(self.test_classes),
               "train_images": len(self.train_images), "test_images": len(self.test_images),
               **self.probe_record(["unseen classes"])}
        if self.probe is not None:
            out["diagnostics_probe"]["classes"] = len({int(self.test_labels[a]) for a, _ in self.probe_pairs})
        return out

    def summary(self, baseline: dict[str, float], final: dict[str, float]) -> list[str]:
        lines = []
        for key in [k for k in final if k.startswith("recall@") or k == "map@r"]:
            before = baseline.get(key)
            lines.append(f"unseen classes {key}: " + (f"before {100 * before:.2f} -> " if before is not None else "")
                         + f"after {100 * final[key]:.2f}")
        return lines
