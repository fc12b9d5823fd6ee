"""CLIP dual encoders (open_clip) and VLM2Vec encoders: rows with images, decoded in the DataLoader
workers; GradCache with separate query and document chunk sizes; image-text retrieval both ways;
the model saved in open_clip's layout (CLIP) or as a sentence-transformers folder (VLM2Vec)."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Optional

import torch

from embedtrain.config import mm_dataset_name, mm_task_name, role_columns
from embedtrain.data.multimodal import (MultimodalCollator, carve_probe, image_folder, open_image, read_multimodal_pairs,
                                       split_inputs)
from embedtrain.errors import EmbedtrainError
from embedtrain.eval.retrieval import evaluate_image_text, load_beir
from embedtrain.losses import LOSSES, InfoNCELoss, SigmoidLoss
from embedtrain.train import compact
from embedtrain.train.optim import parameter_groups
from embedtrain.train.step import chunk_sizes, grad_cache_step, plain_step, replay_sync
from embedtrain.train.task import PairsTask, module_with_state

METRICS = ("recall@1", "recall@5", "recall@10", "ndcg@10", "mrr@10")


def build_encoder(r, device: Optional[torch.device] = None):
    """The model of a CLIP or VLM2Vec recipe, with its trainable parameters chosen (towers, LoRA)."""
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


def build_loss(r) -> torch.nn.Module:
    """The recipe's contrastive loss, at every prefix and precision of loss.compact when set."""
    lo, gather = r.loss, r.train.gather_across_processes
    if r.kind == "clip":
        if lo.name == "siglip":
            loss = SigmoidLoss(temperature=lo.temperature, learnable_temperature=lo.learnable_temperature,
                               bias=lo.bias, learnable_bias=lo.learnable_bias, gather_across_processes=gather)
        else:  # CLIP's loss: symmetric InfoNCE over the global batch with a learnable temperature
            loss = InfoNCELoss(temperature=lo.temperature, learnable_temperature=lo.learnable_temperature,
                               symmetric=True, gather_across_processes=gather)
    else:
        loss = LOSSES.get(lo.name)(temperature=lo.temperature, learnable_temperature=lo.learnable_temperature,
                                   symmetric=lo.symmetric, in_batch_negatives=lo.in_batch_negatives,
                                   mask_false_negatives=lo.mask_false_negatives, gather_across_processes=gather,
                                   hardness_weight=lo.hardness_weight)
    normalize = True if r.kind == "clip" else r.model.normalize  # CLIP's features are always unit length
    return compact.wrap_loss(loss, lo.compact, normalize, ("query", "positive", "negative"), ("query",))


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


class MultimodalTask(PairsTask):
    rows_name = "usable rows"

    def __init__(self, recipe, log=print):
        super().__init__(recipe, log, loss=build_loss(recipe))
        self.bad_before: list = []

    # -- data -------------------------------------------------------------------------------------
    def read_data(self) -> None:
        r = self.recipe
        self.eval_tasks = [(t, load_beir(t.path, mm_task_name(t))) for t in r.eval.tasks]
        self.has_evaluation = bool(self.eval_tasks)
        if any(ds.streaming for ds in r.data.train):
            self._open_streams()
            return
        self.datasets = [
            read_multimodal_pairs(
                ds.path, f"data.train[{i}]", mm_dataset_name(ds), role_columns(ds), ds.image_root, ds.query_template,
                ds.document_template, ds.weight, ds.split, ds.max_rows, r.data.bad_images, r.data.verify_images,
            )
            for i, ds in enumerate(r.data.train)
        ]
        self.bad_before = [b for ds in self.datasets for b in ds.skipped]
        self.hold_out_probe(carve_probe)

    def _open_streams(self) -> None:
        """Streaming datasets (all of them, the recipe check says): shards and columns checked, nothing read yet;
        images are checked as each row is read (see embedtrain.data.streaming.ImageStreamReader)."""
        from embedtrain.data.streaming import ImageRows, StreamState, open_stream

        r = self.recipe
        self.datasets = []
        for i, ds in enumerate(r.data.train):
            roles = role_columns(ds)
            columns = {f"{role}.{kind}": c for role, pair in roles.items()
                       for kind, c in zip(("text", "image"), pair) if c is not None}
            rows = ImageRows(roles, str(image_folder(ds.path, ds.image_root)), ds.query_template, ds.document_template,
                             bad_images=r.data.bad_images, verify=r.data.verify_images)
            self.datasets.append(open_stream(f"data.train[{i}]", mm_dataset_name(ds), ds.path, columns,
                                             weight=ds.weight, split=ds.split, images=rows))
        self.streams = StreamState(1, r.data.num_workers)  # sized for the run's processes in check_data
        self.streams_hold_no_probe()

    def check_data(self, world_size: int) -> None:
        for b in self.bad_before[:20]:
            self.log(f"skipped: {b.message()}")
        if self.bad_before:
            self.log(f"skipped {len(self.bad_before)} rows with bad images (data.bad_images: skip)")
        super().check_data(world_size)

    # -- model ------------------------------------------------------------------------------------
    def build(self, device: torch.device):
        encoder = build_encoder(self.recipe)
        self.log(f"trainable: {encoder.trainable_summary()}")
        self.collator = MultimodalCollator(self.datasets, encoder.inputs, self.recipe.data.bad_images)
        return encoder, build_loss(self.recipe)

    def parameter_groups(self, model) -> list[dict]:
        return parameter_groups(model.named_parameters(), self.recipe.train.weight_decay)

    # -- training ---------------------------------------------------------------------------------
    def check_batch(self, batch: dict, step: int) -> Optional[str]:
        for message in batch.pop("bad_images_read", []):  # streams: rows left out as they were read
            self.log(f"skipped: {message}")
        problem = super().check_batch(batch, step)  # streams: the position the batch carries, or its error
        if problem is not None:
            return problem
        bad_here = batch.pop("bad_images")
        for b in bad_here:
            self.log(f"step {step + 1}: {b.message()}")
        self.counters["bad_images_in_training"] = self.replaced_so_far + len(bad_here)
        if not batch.pop("stop"):
            return None
        message = bad_here[-1].message() if bad_here else "another process hit a bad image"
        return (f"{message}; fix or remove the row, or set data.bad_images: skip, then resume with --resume auto")

    @property
    def replaced_so_far(self) -> int:
        return self.counters.get("bad_images_in_training", 0)

    def step(self, model, loss_fn, batch: dict, accelerator) -> dict:
        chunks = chunk_sizes(self.recipe.train)
        if chunks:
            no_sync, after = replay_sync(accelerator, model)
            return grad_cache_step(model, loss_fn, batch, chunks, accelerator.backward, no_sync, split=split_inputs,
                                   after_replays=after)
        return plain_step(model, loss_fn, batch, accelerator.backward)

    def log_extras(self, learning_rates: list[float]) -> dict:
        return {"bad_images": self.replaced_so_far} if self.replaced_so_far else {}

    # -- evaluation -------------------------------------------------------------------------------
    def evaluate(self, model, accelerator) -> dict[str, float]:
        return evaluate_tasks(model, self.eval_tasks, self.recipe.eval.batch_size)

    def probe_embeddings(self, model):
        """The probe's (query, positive) embeddings: each dataset's items with its templates, as training embeds
        them (a CLIP role is a text or an image; a VLM2Vec one may be both)."""
        if self.probe is None:
            return None
        queries, positives = [], []
        for ds, q, p in zip(self.datasets, self.probe.queries, self.probe.positives):
            if q:
                queries.append(self._encode_items(model, q, "query", ds.query_template))
                positives.append(self._encode_items(model, p, "document", ds.document_template))
        return torch.cat(queries), torch.cat(positives)

    def _encode_items(self, model, items: list[tuple], role: str, template: str) -> torch.Tensor:
        texts = [t for t, _ in items] if items[0][0] is not None else None
        images = [self._probe_image(i) for _, i in items] if items[0][1] is not None else None
        return model.encode_items(texts=texts, images=images, role=role, template=template,
                                  batch_size=self.recipe.eval.batch_size, desc=f"probe {role}s")

    @staticmethod
    def _probe_image(ref):
        try:
            return open_image(ref)
        except Exception as err:  # PIL raises many types; with data.verify_images the reading found these first
            name = ref if isinstance(ref, str) else f"of {len(ref)} bytes in the dataset"
            raise EmbedtrainError(
                f"diagnostics probe: image {name} cannot be decoded ({type(err).__name__}); fix or remove its row, or "
                "set data.verify_images: true so that bad images are found (or skipped) before training") from None

    # -- output -----------------------------------------------------------------------------------
    def export(self, model, loss_fn, path: Path, state_dict: dict) -> None:
        model = module_with_state(model, state_dict, lambda: build_encoder(self.recipe))
        # the trained temperature (and SigLIP's bias) go into the saved model
        loss_state = {k: getattr(loss_fn, k).detach().cpu() for k in ("log_scale", "bias")
                      if isinstance(getattr(loss_fn, k, None), torch.Tensor)}
        model.save(path, loss_state=loss_state)
        compact.write_record(path, self.recipe.loss.compact, model.embedding_dim,
                             self.recipe.kind == "clip" or self.recipe.model.normalize)

    def results(self) -> dict:
        return {**super().results(), "bad_images": {"skipped_before_training": len(self.bad_before),
                               "replaced_during_training": self.replaced_so_far}}
