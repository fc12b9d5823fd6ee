"""Text encoders: BERT-class models, bidirectional decoders (NV-Embed: LoRA, latent attention,
instruction masking, chained stages) and their Mixture-of-Experts upcycling."""

from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path
from typing import Optional

import torch

from embedtrain.config import task_name
from embedtrain.data import BatchCollator, pretokenize, token_lengths
from embedtrain.data.probe import carve_probe
from embedtrain.errors import EmbedtrainError
from embedtrain.eval.retrieval import evaluate_retrieval, load_beir
from embedtrain.losses import LOSSES
from embedtrain.train import compact, experts
from embedtrain.train.nv_embed import (load_recipe_decoder, load_training_dataset, previous_stage_model,
                                       prompt_lengths, query_prompt_of)
from embedtrain.train.optim import parameter_groups
from embedtrain.train.step import chunk_sizes, grad_cache_step, plain_step, replay_sync
from embedtrain.train.task import PairsTask, module_with_state

METRICS = ("ndcg@10", "mrr@10", "recall@10")


def build_loss(r) -> torch.nn.Module:
    """The recipe's contrastive loss (no parameters to load: the epoch plan asks it which repeats are harmless),
    at every prefix and precision of loss.compact when set."""
    loss = LOSSES.get(r.loss.name)(
        temperature=r.loss.temperature, learnable_temperature=r.loss.learnable_temperature,
        symmetric=r.loss.symmetric, in_batch_negatives=r.loss.in_batch_negatives,
        mask_false_negatives=r.loss.mask_false_negatives, gather_across_processes=r.train.gather_across_processes,
        # only the softmax losses take it (the recipe check refuses it elsewhere)
        **({"hardness_weight": r.loss.hardness_weight} if r.loss.hardness_weight else {}),
    )
    return compact.wrap_loss(loss, r.loss.compact, r.model.normalize, ("query", "positive", "negative"), ("query",))


class TextTask(PairsTask):
    def __init__(self, recipe, log=print, chain: tuple[str, ...] = (), run_stage=None):
        super().__init__(recipe, log, loss=build_loss(recipe))
        self.chain, self.run_stage = chain, run_stage
        # an MoE step leaves the other domains' experts without gradient, which DDP must be told
        self.find_unused_parameters = experts.uses_experts(recipe)

    # -- data -------------------------------------------------------------------------------------
    def read_data(self) -> None:
        r = self.recipe
        self.read_training_data()
        self.model_source = r.model.name_or_path
        if r.model.previous_stage:  # stage 2 starts from stage 1's output model
            with self.startup.phase("previous stage"):  # a whole run of its own when not trained yet
                self.model_source = previous_stage_model(r, self.run_stage, self.log, self.chain)
        self.eval_tasks = []
        for t in r.eval.tasks:
            with self.startup.phase("evaluation data", f"reading {t.path} ..."):
                self.eval_tasks.append((t, load_beir(t.path, task_name(t))))
        self.has_evaluation = bool(self.eval_tasks)

    def read_training_data(self) -> None:
        """The training datasets, the diagnostics probe held out (``embedtrain plan`` reads these without touching
        a previous stage)."""
        r = self.recipe
        if any(ds.streaming for ds in r.data.train):
            self._open_streams()
            return
        self.datasets = []
        for i, ds in enumerate(r.data.train):
            with self.startup.phase("training data", f"reading {ds.path} ..."):
                self.datasets.append(load_training_dataset(ds, i, r.train.seed))
        with self.startup.phase("diagnostics probe"):
            self.hold_out_probe(carve_probe)

    def _open_streams(self) -> None:
        """Streaming datasets (all of them stream, the recipe check says): their shards and columns checked, nothing
        read yet. The diagnostics probe is held out of data read whole, so a streaming run has none."""
        from embedtrain.config import dataset_name
        from embedtrain.data.streaming import StreamState, open_stream

        r = self.recipe
        self.datasets = []
        for i, ds in enumerate(r.data.train):
            columns = {"query": ds.query_column, "positive": ds.positive_column}
            columns.update({f"negative_{j}": c for j, c in enumerate(ds.negative_columns)})
            self.datasets.append(open_stream(f"data.train[{i}]", dataset_name(ds), ds.path, columns,
                                             query_prompt_of(ds), ds.document_prompt, ds.weight, ds.split, ds.subset))
        self.streams = StreamState(1, r.data.num_workers)  # sized for the run's processes in check_data
        self.streams_hold_no_probe()

    # -- model ------------------------------------------------------------------------------------
    def _load_encoder(self, device: torch.device, log=print):
        """The recipe's encoder as loaded (and upcycled into experts), before any training."""
        from embedtrain.models import load_text_encoder

        r = self.recipe
        with_experts = experts.uses_experts(r)  # with experts, the adapters come after upcycling: each gets its own
        if r.model.bidirectional:
            encoder = load_recipe_decoder(r, self.model_source, device)
        else:
            encoder = load_text_encoder(
                self.model_source, pooling=r.model.pooling, normalize=r.model.normalize, max_length=r.model.max_length,
                query_max_length=r.model.query_max_length, document_max_length=r.model.document_max_length,
                query_prompt=query_prompt_of(r.data.train[0]), document_prompt=r.data.train[0].document_prompt,
                attn_implementation=r.model.attn_implementation, trust_remote_code=r.model.trust_remote_code,
                revision=r.model.revision, gradient_checkpointing=r.model.gradient_checkpointing,
                lora=asdict(r.model.lora) if r.model.lora is not None and not with_experts else None,
                dtype=r.model.dtype,
            )
        encoder = experts.prepare_encoder(encoder, r, log)  # model.moe: upcycled into one expert per domain
        if r.model.lora is not None and with_experts:
            lora = r.model.lora
            encoder.add_lora(lora.r, lora.alpha, lora.dropout, lora.target_modules)
        return encoder

    def build(self, device: torch.device):
        from accelerate import PartialState

        r = self.recipe
        with self.startup.phase("loading model", f"loading model {self.model_source} ..."):
            encoder = self._load_encoder(device, self.log)
        self.batch_domains = experts.dataset_domains(encoder, r)
        experts.check_eval_tasks(encoder, r)
        _check_position_limit(encoder, r)
        compact.check_dims(r.loss.compact, encoder.embedding_dim)
        c = r.loss.compact
        if c is not None and c.center:
            d, pca = encoder.embedding_dim, c.basis == "pca"
            if self.resuming:
                # the checkpoint holds the centre (and basis) the run started with (buffers, loaded strictly with the
                # weights: a checkpoint without them is a resume error); NaN until then, so that they are never used
                # unread
                encoder.set_center(torch.full((d,), float("nan")), torch.full((d, d), float("nan")) if pca else None)
                self.log(f"loss.compact.center: the centre{' and basis are' if pca else ' is'} read from the checkpoint")
            else:
                with self.startup.phase("centre", "loss.compact.center: embedding the centre's texts ..."):
                    encoder.set_center(*compact.calibrate(encoder, self.datasets, c.center_rows, r.eval.batch_size,
                                                          self.log, basis=pca))
                    self.log("loss.compact.center: the centre is their mean"
                             + ("; basis: their principal axes, largest variance first" if pca else ""))
        loss_fn = build_loss(r)
        # Tokenize once; the main process fills the datasets cache, the others read it.
        if self.streams is not None:  # streams are tokenized as they are read, in the DataLoader workers
            from embedtrain.data.streaming import TokenizeRoles

            self.stream_tokenize = TokenizeRoles(encoder.tokenizer, encoder.max_length_for("query"),
                                                 encoder.max_length_for("document"))
        else:
            with PartialState().main_process_first(), self.startup.phase("tokenizing"):
                for ds in self.datasets:
                    if r.data.pretokenize:
                        pretokenize(ds, encoder.tokenizer, encoder.max_length_for)
            with self.startup.phase("token lengths"):
                self.lengths = [token_lengths(ds) for ds in self.datasets] if r.data.length_grouping else None
        self.collator = BatchCollator(self.datasets, encoder.tokenizer, encoder.max_length_for,
                                      prompt_lengths(encoder, self.datasets))
        with self.startup.phase("unused parameters"):  # one forward and backward
            frozen = encoder.freeze_unused_parameters()
        if frozen:
            self.log(f"not trained (no influence on the embedding): {', '.join(frozen)}")
        if r.train.compile:
            # compiled in place: parameter names (checkpoints, the saved model) stay those of the backbone
            encoder.backbone.compile(dynamic=True)
        self.encoder = encoder
        return encoder, loss_fn

    def parameter_groups(self, model) -> list[dict]:
        r = self.recipe
        return parameter_groups(model.named_parameters(), r.train.weight_decay, experts.learning_rates(r))

    # -- training ---------------------------------------------------------------------------------
    def step(self, model, loss_fn, batch: dict, accelerator) -> dict:
        chunks = chunk_sizes(self.recipe.train)
        scale = accelerator.scaler.get_scale() if accelerator.scaler is not None else 1.0
        with experts.routed_batch(self.encoder, self.batch_domains, batch, scale):  # MoE: the dataset's expert
            if chunks:
                no_sync, after = replay_sync(accelerator, model)
                return grad_cache_step(model, loss_fn, batch, chunks, accelerator.backward, no_sync, after_replays=after)
            return plain_step(model, loss_fn, batch, accelerator.backward, self.recipe.train.forward_token_budget)

    def log_extras(self, learning_rates: list[float]) -> dict:
        return experts.routing_log(self.encoder)  # MoE: expert shares, router accuracy

    # -- evaluation -------------------------------------------------------------------------------
    def evaluate(self, model, accelerator) -> dict[str, float]:
        """Metrics per task as ``<task>/<metric>`` plus the mean over tasks as ``mean/<metric>``."""
        out: dict[str, float] = {}
        for cfg, data in self.eval_tasks:
            with experts.routed_task(model, cfg.domain):  # MoE models: the task's domain, or the router
                scores = evaluate_retrieval(model, data, query_prompt_of(cfg) or None, cfg.document_prompt or None,
                                            batch_size=self.recipe.eval.batch_size, show_progress=True)
            out.update({f"{data.name}/{k}": v for k, v in scores.items()})
        if self.eval_tasks:
            for metric in METRICS:
                out[f"mean/{metric}"] = sum(out[f"{d.name}/{metric}"] for _, d in self.eval_tasks) / len(self.eval_tasks)
        return out

    def format_scores(self, scores: dict[str, float]) -> str:
        return ", ".join(f"{k} {100 * v:.2f}" for k, v in scores.items() if not k.startswith("mean/") or len(scores) > 3)

    def _encode(self, model, i: int, texts: list[str], role: str, desc: str) -> torch.Tensor:
        """Training dataset ``i``'s ``texts`` embedded as ``role`` ('query' or 'document') with its prompts, routed
        to its MoE domain."""
        ds = self.datasets[i]
        domain = self.batch_domains[i] if self.batch_domains else None
        with experts.routed_task(model, domain):
            return model.encode(texts, role=role, prompt=ds.query_prompt if role == "query" else ds.document_prompt,
                                batch_size=self.recipe.eval.batch_size, desc=desc)

    def probe_embeddings(self, model):
        """The probe's (query, positive) embeddings, each dataset's texts with its prompts (and MoE domain)."""
        if self.probe is None:
            return None
        queries, positives = [], []
        for i, (q, p) in enumerate(zip(self.probe.queries, self.probe.positives)):
            if q:
                queries.append(self._encode(model, i, q, "query", "probe queries"))
                positives.append(self._encode(model, i, p, "document", "probe positives"))
        return torch.cat(queries), torch.cat(positives)

    # -- mined negatives (data.mined_negatives) -------------------------------------------------
    def refresh(self, step: int, model, accelerator) -> Optional[int]:
        """Mine every dataset's hard negatives with the weights of ``step`` when due (at the first step of a run, and
        every ``every`` steps after the last mining); returns the step at which mining is due next."""
        from embedtrain.train.mining import mine_during_training

        m = self.recipe.data.mined_negatives
        if m is None:
            return None
        mined = self.collator.mined
        if mined is None or (m.every and step >= mined[0].step + m.every):
            start = time.time()
            self.log(f"mined negatives: mining with the weights of step {step} ...")
            with accelerator.autocast():  # embedded in the run's precision, as its steps are
                tables, report = mine_during_training(
                    lambda i, texts, role: self._encode(model, i, texts, role, f"mining: {role} texts"), self.datasets,
                    m, step, self.recipe.train.seed, accelerator)
            self.collator.mined = mined = tables
            entry = {"step": step, "seconds": round(time.time() - start, 3), "datasets": report}
            self.counters.setdefault("mined_negatives", []).append(entry)
            for name, f in report.items():
                self.log(f"mined negatives at step {step}: {name}: {f['rows']} rows from {f['corpus']} distinct "
                         f"positives in {entry['seconds']:.0f} s; {f['dropped_false_negatives']} candidates dropped as "
                         f"likely false negatives; {f['rows_short']} rows had fewer than {m.num_negatives} candidates "
                         f"passing the rule ({f['random_candidates']} random corpus texts fill the candidate lists)")
        return mined[0].step + m.every if m.every else None

    MINED_FILE = "mined_negatives.safetensors"

    def save_files(self, path: Path) -> None:
        """The mined candidates (a checkpoint's weights may be later than the ones that mined them)."""
        if self.collator is not None and self.collator.mined is not None:
            from safetensors.torch import save_file

            from embedtrain.data.mined import to_tensors

            save_file(to_tensors(self.collator.mined), str(path / self.MINED_FILE))

    def load_files(self, path: Path) -> None:
        from embedtrain.data.mined import from_tensors

        m, file = self.recipe.data.mined_negatives, path / self.MINED_FILE
        if m is None:
            return
        if not file.is_file():
            self.log(f"mined negatives: {path} holds none (its run did not mine); mining again at its step")
            return
        from safetensors.torch import load_file

        try:
            tensors = load_file(str(file))
        except Exception as err:  # a damaged file: one line naming it
            raise EmbedtrainError(f"--resume: {file} cannot be read ({err.__class__.__name__}); resume from an older "
                                  "checkpoint with --resume PATH") from None
        self.collator.mined = from_tensors(tensors, self.datasets, m.num_negatives, f"--resume: {file}")
        self.log(f"mined negatives: read from the checkpoint (mined at step {self.collator.mined[0].step})")

    def results(self) -> dict:
        out = super().results()
        if "mined_negatives" in self.counters:
            out["mined_negatives"] = {"every": self.recipe.data.mined_negatives.every,
                                      "negatives_repeated": self.counters.get("negatives_repeated", 0),
                                      "minings": self.counters["mined_negatives"]}
        return out

    # -- output -----------------------------------------------------------------------------------
    def export(self, model, loss_fn, path: Path, state_dict: dict) -> None:
        # a sharded model is written from a fresh unsharded copy that holds the gathered weights
        def rebuild():
            encoder = self._load_encoder(torch.device("cpu"), lambda *_: None)
            # loss.compact.center (and basis): buffers of the state dict
            encoder.set_center(state_dict.get("center"), state_dict.get("basis"))
            return encoder

        model = module_with_state(model, state_dict, rebuild)
        model.save(path, state_dict=state_dict)
        compact.write_record(path, self.recipe.loss.compact, model.embedding_dim, self.recipe.model.normalize)

    def card(self, model_dir: Path, baseline: dict, final: dict, seconds: float, steps: int, engine):
        from embedtrain.hub.run_card import card_for_run

        return card_for_run(self.recipe, model_dir, baseline, final, seconds, steps, engine.processes,
                            engine=engine.describe())

    def summary(self, baseline: dict[str, float], final: dict[str, float]) -> list[str]:
        metric = self.recipe.eval.metric
        names = sorted({k.split("/")[0] for k in {**baseline, **final} if k.endswith(metric) and not k.startswith("mean/")})
        lines = []
        for name in names:
            before, after = baseline.get(f"{name}/{metric}"), final.get(f"{name}/{metric}")
            line = f"{name} {metric}: " + (f"before {100 * before:.2f} -> " if before is not None else "")
            lines.append(line + (f"after {100 * after:.2f}" if after is not None else ""))
        return lines


def _position_limit(backbone) -> Optional[int]:
    """Tokens a backbone with a learned position table can take (None when it has no such table)."""
    table = getattr(getattr(backbone, "embeddings", None), "position_embeddings", None)
    if not isinstance(table, torch.nn.Embedding):
        return None
    # RoBERTa-style tables start counting after the padding index
    padding_idx = getattr(backbone.embeddings, "padding_idx", None)
    offset = padding_idx + 1 if isinstance(padding_idx, int) and padding_idx >= 0 else 0
    return table.num_embeddings - offset


def _check_position_limit(encoder, r) -> None:
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
