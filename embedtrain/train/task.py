"""What differs between kinds of model: a small task object the training loop calls.

The loop (:mod:`embedtrain.train.loop`) owns everything that is the same for every kind: the
output folder, the Accelerator, the training state, the data position, the update step, logging,
evaluation and checkpoint scheduling, signals, the final save, plots, the model card and the Hub
push. A task supplies the rest, in the order the loop asks for it:

1. ``read_data``: read and check the training data (before any model loads, so data errors come first);
2. ``check_data``: what depends on the number of processes (a dataset smaller than one global batch);
3. ``build``: the model and the loss module, trainable parameters chosen;
4. ``parameter_groups``: the optimizer's groups of the model (weight decay, own learning rates);
5. ``batches_in_epoch`` / ``loader``: the epoch plans and a loader starting at a batch of an epoch;
6. ``step``: forward and backward of one batch (plain or GradCache), returning detached figures;
7. ``evaluate``: scores on the held-out tasks (``selection_key`` picks the best checkpoint);
8. ``export``: the final model folder, written from the gathered full state dict;
9. ``results`` / ``card`` / ``summary``: what goes into results.json, the model card and the last lines printed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Iterable, Optional

import torch

from embedtrain.errors import EmbedtrainError
from embedtrain.train.startup import StartupPhases


class Task:
    """Base class of the per-kind pieces; see the module docstring for the order of calls."""

    throughput_key = "examples_per_s"
    """Name of the throughput figure in metrics.jsonl."""
    last_value_keys: tuple[str, ...] = ("temperature",)
    """Step figures logged as their last value in a window (the others are averaged)."""
    max_processes: Optional[int] = None
    """None: any number of processes; 1: the kind runs in one process only."""
    find_unused_parameters = False
    """Tell DDP that a step may leave parameters without gradient (an MoE step's other experts)."""

    def __init__(self, recipe, log=print, loss: Optional[torch.nn.Module] = None):
        self.recipe = recipe
        self.log = log
        self.loss_parameters = [n for n, p in loss.named_parameters() if p.requires_grad] if loss is not None else []
        """Names of the loss's own learnable parameters (a temperature, a bias), from the recipe's loss as built."""
        self.counters: dict = {}
        """The task's own figures that a checkpoint keeps (the loop hands in the training state's)."""
        self.startup = StartupPhases(log)
        """The run's start-up, timed: the loop marks its stages, the task times its long parts in them."""
        self.resuming = False
        """Set by the loop before :meth:`build` when a checkpoint's weights and buffers will replace the built
        model's: what only the start of a run computes (the compact centre) can be skipped."""

    # -- data -------------------------------------------------------------------------------
    def read_data(self) -> None:
        raise NotImplementedError

    def check_data(self, world_size: int) -> None:
        """Checks that need the number of processes (after the Accelerator is built)."""

    def batches_in_epoch(self, epoch: int) -> int:
        raise NotImplementedError

    def data_accounts(self) -> list:
        """Per training dataset, where its rows go in an epoch; [] for kinds that do not plan pairs."""
        return []

    def check_accounts(self) -> list:
        """:meth:`data_accounts`, logged and checked (called once the model is built, before the first step)."""
        return self.data_accounts()

    def loader(self, epoch: int, offset: int, rank: int, world_size: int, pin_memory: bool) -> Iterable[dict]:
        """This process's batches of ``epoch`` from batch ``offset`` on."""
        raise NotImplementedError

    def examples_per_step(self, world_size: int) -> int:
        return self.recipe.data.batch_size * world_size

    # -- model --------------------------------------------------------------------------------
    def build(self, device: torch.device) -> tuple[torch.nn.Module, torch.nn.Module]:
        """(model, loss module); called after the seed is set."""
        raise NotImplementedError

    def parameter_groups(self, model: torch.nn.Module) -> list[dict]:
        """The optimizer's groups of the model's trainable parameters (the loop adds the loss's own)."""
        raise NotImplementedError

    # -- training -----------------------------------------------------------------------------
    def check_batch(self, batch: dict, step: int) -> Optional[str]:
        """A reason to stop before this batch (e.g. an image that broke since the checks), or None."""
        return None

    def refresh(self, step: int, model, accelerator) -> Optional[int]:
        """Work on the training data that is due before the batch after ``step`` completed steps (hard negatives
        mined again with ``model``, the unwrapped model; every process calls it); returns the step at which it is
        due next (the loop starts a new loader there), or None when never."""
        return None

    def save_files(self, path: Path) -> None:
        """Write the task's own files into the checkpoint folder ``path`` (main process)."""

    def load_files(self, path: Path) -> None:
        """Read them back from the checkpoint ``path`` a run resumes from (every process)."""

    def sync(self, accelerator) -> None:
        """Bring what each process knows into ``counters`` before a checkpoint or the final results (every
        process calls it; streams: their positions)."""

    def step(self, model, loss_fn, batch: dict, accelerator) -> dict[str, torch.Tensor]:
        """Forward and backward of one batch; returns detached figures, ``loss`` first."""
        raise NotImplementedError

    def log_extras(self, learning_rates: list[float]) -> dict[str, Any]:
        """Figures added to each metrics line (routing statistics, counters)."""
        return {}

    # -- evaluation -----------------------------------------------------------------------------
    has_evaluation = True
    probe = None
    """The diagnostics probe (:class:`~embedtrain.data.probe.Probe`): pairs held out of the training data, or for
    metric learning same-class pairs of the unseen classes; None without one."""
    probe_off: Optional[str] = None
    """Why the run has no diagnostics probe though the recipe asks for one (said once when read)."""

    def probe_embeddings(self, model) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
        """The probe's (query, positive) embeddings, (n, d) each, row i a pair; None without a probe."""
        return None

    def probe_record(self, names: list[str]) -> dict[str, Any]:
        """results.json's ``diagnostics_probe``: the probe's summary, its parts named by ``names``, or why there is
        none (nothing when the recipe asked for none)."""
        if self.probe is not None:
            return {"diagnostics_probe": self.probe.summary(names)}
        if self.probe_off:
            return {"diagnostics_probe": {"off": self.probe_off}}
        return {}

    def evaluate(self, model, accelerator) -> dict[str, float]:
        return {}

    @property
    def selection_key(self) -> str:
        """The score that selects the best checkpoint (higher is better)."""
        return f"mean/{self.recipe.eval.metric}"

    def format_scores(self, scores: dict[str, float]) -> str:
        return ", ".join(f"{k} {100 * v:.2f}" for k, v in scores.items() if k.endswith(f"/{self.recipe.eval.metric}"))

    # -- output --------------------------------------------------------------------------------
    def export(self, model, loss_fn, path: Path, state_dict: dict) -> None:
        """Write the final model into the empty folder ``path`` from the gathered ``state_dict``."""
        raise NotImplementedError

    def results(self) -> dict[str, Any]:
        """Entries of results.json besides the steps, scores and times."""
        return {}

    def card(self, model_dir: Path, baseline: dict, final: dict, seconds: float, steps: int, engine):
        """Model-card data for the saved folder (``engine``: what the run ran on), or None when this kind
        has no card."""
        return None

    def summary(self, baseline: dict[str, float], final: dict[str, float]) -> list[str]:
        """Lines printed at the end: each task's selection metric before and after."""
        metric = self.recipe.eval.metric
        lines = []
        for key in sorted(k for k in {**baseline, **final} if k.endswith(f"/{metric}") and not k.startswith("mean/")):
            before, after = baseline.get(key), final.get(key)
            line = f"{key}: " + (f"before {100 * before:.2f} -> " if before is not None else "")
            lines.append(line + (f"after {100 * after:.2f}" if after is not None else ""))
        return lines


class PairsTask(Task):
    """What the kinds that train on (query, positive, negatives) rows share: epoch plans of task-homogeneous
    global batches (:func:`~embedtrain.data.sampler.plan_epoch`), their loader, and the account of where
    every row goes (checked before the first step: no dataset is dropped or cut without an error).

    A subclass sets ``self.datasets`` (in ``read_data``), ``self.collator`` and, for length grouping,
    ``self.lengths`` (in ``build``)."""

    collator = None
    """Set in ``build``: turns planned rows into batches."""
    streams = None
    """Set in ``read_data`` when the datasets are streams (:mod:`embedtrain.data.streaming`): ``self.datasets`` are
    then :class:`~embedtrain.data.streaming.StreamSource` and a text task sets ``self.stream_tokenize`` in ``build``."""
    stream_tokenize = None
    """What a stream reader tokenizes text rows with; None for multimodal rows, which the collator prepares."""

    def __init__(self, recipe, log=print, loss: Optional[torch.nn.Module] = None):
        super().__init__(recipe, log, loss)
        self._plans: dict[int, list] = {}
        self.lengths: Optional[list] = None
        self.repeat_documents = bool(getattr(loss, "masks_repeated_documents", False))
        """Documents may repeat in a batch (the loss masks them, see InBatchLoss.masks_repeated_documents)."""
        self.rows_interact = bool(getattr(loss, "in_batch_negatives", True))
        """A row's query meets the other rows' documents (in-batch negatives): only then can a repeat harm."""

    # -- the diagnostics probe ----------------------------------------------------------------------
    def hold_out_probe(self, carve: Callable) -> None:
        """Hold the diagnostics probe out of ``self.datasets`` with ``carve(datasets, wanted)`` (the kind's
        :func:`~embedtrain.data.probe.carve_probe`): the same rows on every start and resume."""
        from embedtrain.data.probe import MAX_FRACTION, MIN_ROWS, probe_size

        wanted = self.recipe.eval.diagnostics.probe_rows
        if not wanted:
            return
        probe, kept = carve(self.datasets, wanted)
        total = sum(len(d) for d in self.datasets)
        if not probe.rows:
            if probe_size(total, wanted) == 0:
                self.probe_off = (f"{total} training rows are too few to hold out a probe of {MIN_ROWS} or more "
                                  f"pairs (at most {MAX_FRACTION:.0%} of them)")
            else:
                self.probe_off = (f"fewer than {MIN_ROWS} pairs could be held out without taking more than "
                                  f"{MAX_FRACTION:.0%} of a dataset's rows with them (texts many rows share: labels, "
                                  "negatives used again)")
            self.log(f"diagnostics: off; {self.probe_off}; add rows or set eval.diagnostics.probe_rows=0")
            return
        self.probe, self.datasets = probe, kept
        self.log(f"diagnostics probe: {probe.rows} pairs held out of training; {sum(probe.excluded_rows)} of "
                 f"{total} training rows removed (the probe's and those sharing a text or image with it)")

    def streams_hold_no_probe(self) -> None:
        """Say once that streaming datasets hold out no probe (when the recipe asks for one)."""
        if self.recipe.eval.diagnostics.probe_rows:
            self.probe_off = "the probe is held out of datasets read whole; streaming datasets are not"
            self.log(f"diagnostics: probe off ({self.probe_off}); no diagnostics are measured")

    def check_data(self, world_size: int) -> None:
        if self.streams is not None:
            self.global_batch = self.recipe.data.batch_size * world_size
            self._check_streams(world_size)
            return
        self.global_batch = check_batch_fits(self.datasets, self.recipe.data.batch_size, world_size,
                                             rows=self.rows_name)

    rows_name = "rows"

    def batches_in_epoch(self, epoch: int) -> int:
        if self.streams is not None:
            return STREAM_EPOCH  # a stream has no epochs: the run ends at train.max_steps
        return len(self._plan(epoch))

    # -- streams --------------------------------------------------------------------------------
    def _check_streams(self, world_size: int) -> None:
        from embedtrain.data.streaming import StreamSettings, StreamState, mixing_probabilities

        r = self.recipe
        workers = max(1, r.data.num_workers)
        readers = world_size * workers
        for source in self.datasets:
            if source.num_shards < readers:
                self.log(f"data: {source.name} has {source.num_shards} shard(s) for {readers} readers ({world_size} "
                         f"process(es) x {workers} worker(s)): every reader reads all shards and keeps every "
                         f"{readers}th row; more shards than readers read faster")
        probabilities, how = mixing_probabilities(self.datasets, r.data.mixing)
        if len(self.datasets) > 1:
            shares = ", ".join(f"{s.name} {p:.1%}" for s, p in zip(self.datasets, probabilities))
            self.log(f"data: each step's dataset drawn by {how}: {shares}")
        self.streams = StreamState(world_size, workers)
        self.stream_settings = StreamSettings(
            seed=r.train.seed, batch_size=r.data.batch_size,
            # text: the length-grouping window's batches; multimodal (no length grouping): data.stream_pool_batches
            pool_rows=max(1, getattr(r.data, "length_grouping_window", None) or r.data.stream_pool_batches)
            * r.data.batch_size,
            group_by_length=bool(getattr(r.data, "length_grouping", False)),
            no_duplicates=r.data.no_duplicates and self.rows_interact, repeat_documents=self.repeat_documents,
            mixing=r.data.mixing, probabilities=probabilities)

    def _plan(self, epoch: int) -> list:
        from embedtrain.data.sampler import plan_epoch

        r = self.recipe
        if epoch not in self._plans:
            self._plans.clear()  # keep one epoch in memory
            self._plans[epoch] = plan_epoch(
                [len(d) for d in self.datasets], [getattr(d, "dedup_keys", d.row_keys) for d in self.datasets],
                self.global_batch, r.train.seed, epoch, lengths=self.lengths, weights=[d.weight for d in self.datasets],
                mixing=r.data.mixing, no_duplicates=r.data.no_duplicates and self.rows_interact,
                window=getattr(r.data, "length_grouping_window", 64), repeat_documents=self.repeat_documents,
            )
        return self._plans[epoch]

    def data_accounts(self) -> list:
        """Where each dataset's rows go in an epoch (:mod:`embedtrain.data.accounting`); none for streams (their
        rows are counted as they are read: results.json "streams")."""
        from embedtrain.data.accounting import account

        if self.streams is not None:
            return []
        return account(self.datasets, self._plan(0), self.global_batch)

    def check_accounts(self) -> list:
        """The accounts, logged; a dataset that yields no batch or loses too many rows is an error."""
        from embedtrain.data.accounting import check_accounts

        if self.streams is not None:
            for source in self.datasets:
                self.log(f"data: {source.line()}")
            return []
        accounts = self.data_accounts()
        for a in accounts:
            self.log(f"data: {a.line()}")
        check_accounts(accounts, self.recipe.data.max_dropped_share, self.global_batch)
        return accounts

    def loader(self, epoch: int, offset: int, rank: int, world_size: int, pin_memory: bool):
        from embedtrain.data.collate import PlannedBatches

        if self.streams is not None:
            return self._stream_loader(offset, rank, world_size, pin_memory)

        batches = PlannedBatches(self._plan(epoch), self.collator, rank, world_size)
        return torch.utils.data.DataLoader(
            batches, batch_size=None, sampler=list(range(offset, len(batches))), num_workers=self.recipe.data.num_workers,
            pin_memory=pin_memory,
            # its own generator: creating the iterator must not draw from the global random state
            # (that would shift dropout after a resume)
            generator=torch.Generator().manual_seed(self.recipe.train.seed + epoch),
        )

    def _stream_loader(self, step: int, rank: int, world_size: int, pin_memory: bool):
        from embedtrain.data.streaming import PairStream

        positions = self.streams.positions_for(self.counters.get("streams"), rank)
        if positions:
            self.log(f"data: streams continue where the checkpoint left them (step {step})")
        stream = PairStream(self.datasets, self.stream_settings, self.collator.collate, self.stream_tokenize, step,
                            rank, world_size, self.recipe.data.num_workers, positions)
        return torch.utils.data.DataLoader(stream, batch_size=None, num_workers=self.recipe.data.num_workers,
                                           pin_memory=pin_memory,
                                           # its own generator: the global one drives dropout (see loader)
                                           generator=torch.Generator().manual_seed(self.recipe.train.seed))

    def check_batch(self, batch: dict, step: int) -> Optional[str]:
        repeated = batch.pop("negatives_repeated", 0)  # mined negatives (data.mined_negatives), counted
        if repeated:
            if not self.counters.get("negatives_repeated"):
                self.log(f"mined negatives: at step {step + 1}, {repeated} mined negative(s) repeat a text of the batch "
                         "(their rows had no other candidate left); counted in results.json")
            self.counters["negatives_repeated"] = self.counters.get("negatives_repeated", 0) + repeated
        return self.streams.take(batch) if self.streams is not None else None

    def sync(self, accelerator) -> None:
        if self.streams is not None:
            self.counters["streams"] = self.streams.to_dict(accelerator)

    def results(self) -> dict[str, Any]:
        out: dict[str, Any] = self.probe_record([d.name for d in self.datasets])
        if self.streams is not None:
            from embedtrain.data.streaming import stream_figures

            out["streams"] = stream_figures(self.counters.get("streams", {}), self.datasets)
        return out


STREAM_EPOCH = 1 << 62
"""The batches of a streaming run's one "epoch": more than any run takes (it ends at train.max_steps)."""


def check_batch_fits(datasets, batch_size: int, world_size: int, rows: str = "rows") -> int:
    """The global batch (``batch_size`` x processes); a dataset with fewer ``rows`` than that is an error."""
    global_batch = batch_size * world_size
    for i, ds in enumerate(datasets):
        if len(ds) < global_batch:
            raise EmbedtrainError(
                f"data.train[{i}]: {ds.name} has {len(ds)} {rows}, fewer than one batch "
                f"({batch_size} x {world_size} processes); lower data.batch_size or add rows"
            )
    return global_batch


def module_with_state(model: torch.nn.Module, state_dict: dict, rebuild) -> torch.nn.Module:
    """A module holding exactly ``state_dict`` (the gathered weights), for savers that write a live module.

    In one process or under DDP ``model``'s own tensors are the full weights and it is used as it is
    (with ``state_dict`` copied in where a tensor differs). Under FSDP / ZeRO-3 its tensors are shards:
    ``rebuild()`` then makes a fresh, unsharded module of the same architecture on the CPU, and the
    gathered weights are loaded into it.
    """
    own = model.state_dict()
    full = own.keys() == state_dict.keys() and all(
        type(own[k]) is torch.Tensor and own[k].shape == v.shape for k, v in state_dict.items())
    if not full:
        model = rebuild()
        model.load_state_dict(state_dict)
        return model
    with torch.no_grad():
        for key, value in state_dict.items():
            if own[key].data_ptr() != value.data_ptr() and not torch.equal(own[key], value.to(own[key].device)):
                own[key].copy_(value)
    return model
