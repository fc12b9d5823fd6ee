"""``embedtrain plan``: what a recipe will do before it costs GPU hours. Reads the data, downloads no weights.

- **Data**: the training datasets read by the same code training uses, the epoch planned on the chosen number of
  processes, and every row accounted for (:mod:`embedtrain.data.accounting`): rows read, trained per epoch, and
  dropped per rule. A dataset that yields no batch or loses more than ``data.max_dropped_share`` is a problem.
- **Model**: built from its configuration on the meta device (:mod:`embedtrain.plan.model`): parameters,
  trainable parameters.
- **Memory per device, FLOPs and time** (:mod:`embedtrain.plan.estimate`) for the engine of an accelerate config:
  the peak over the batches the run will train on (the higher of the end of the forward pass and the update) (the epoch plan is deterministic, so the plan knows them), with
  token lengths from the model's tokenizer when it is local, else estimated from characters.
- **Communication** (:func:`~embedtrain.plan.estimate.step_communication`): the bytes the engine's collectives move
  per step and device (gathered weights, reduced gradients), and their time at ``--link-gbs`` if none overlaps compute.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

from embedtrain.data.readers import column_list
from embedtrain.errors import EmbedtrainError
from embedtrain.plan.estimate import (Engine, Work, engine_from_accelerate_config, estimate, forward_flops,
                                      step_communication)
from embedtrain.plan.model import ModelShape, model_shape

CHARS_PER_TOKEN = 4
"""Characters per token when no tokenizer is at hand (English text with a BPE vocabulary)."""


@dataclass
class PlanSettings:
    accelerate_config: Optional[str] = None
    devices: Optional[int] = None
    device_memory_gb: Optional[float] = None
    device_tflops: float = 989.0
    """Dense bf16 peak of one device (H100 SXM: 989; A100: 312)."""
    mfu: float = 0.4
    """Share of the peak the run achieves (model FLOPs utilisation)."""
    link_gbs: float = 450.0
    """GB/s one device sends to the others (H100 SXM, NVLink 4 in one node: 18 links of 25 GB/s each way)."""
    model_config: Optional[str] = None
    max_batches: int = 5000
    """Batches of the plan scanned for the peak (the first ones the run trains on)."""
    lengths: str = "data"
    """'data': every text at its own token length (padded to its batch's longest); 'max': every text at the
    recipe's token limit (the worst case, whatever the data)."""


def make_plan(recipe, settings: PlanSettings = PlanSettings(), log=lambda *_: None) -> dict:
    """The plan as a JSON-ready dict with ``problems`` (empty when the recipe can run as planned)."""
    for flag, value, ok in (("--device-tflops", settings.device_tflops, settings.device_tflops > 0),
                            ("--mfu", settings.mfu, 0 < settings.mfu <= 1),
                            ("--link-gbs", settings.link_gbs, settings.link_gbs > 0)):
        if not ok:
            raise EmbedtrainError(f"{flag} {value:g}: give a positive number{' of at most 1' if flag == '--mfu' else ''}")
    engine = engine_from_accelerate_config(settings.accelerate_config, settings.devices, recipe.train.mixed_precision)
    problems: list[str] = []
    data, task = _data(recipe, engine, problems, log)
    from embedtrain.train.accelerator import engine_problems

    problems += engine_problems(engine.distributed_type, recipe.train, task.loss_parameters)
    classes = len(task.train_classes) if recipe.kind == "dml" else None
    shape = model_shape(recipe, settings.model_config, classes)
    steps = recipe.train.max_steps or recipe.train.epochs * task.batches_in_epoch(0)
    lengths_from, works = _step_work(recipe, task, shape, engine, settings)
    if not works:  # no batch at all (a problem above): the model's own memory still tells something
        lengths_from, works = "no batch to train on", [[]]
    t = recipe.train
    chunks = _chunks(recipe)
    checkpointing = bool(getattr(recipe.model, "gradient_checkpointing", False))
    estimates = [estimate(shape, engine, w, t.optimizer, checkpointing, chunks, first_step=i == 0)
                 for i, w in enumerate(works)]
    peak_batch = max(range(len(estimates)), key=lambda i: estimates[i].memory["total"])
    peak = estimates[peak_batch]
    flops = sum(e.flops_per_step for e in estimates) / max(1, len(estimates))
    rate = settings.device_tflops * 1e12 * settings.mfu
    seconds_per_step = flops / rate
    comms = [step_communication(shape, engine, w, chunks) for w in works]
    communication = {k: sum(c[k] for c in comms) // max(1, len(comms)) for k in comms[0]}
    communication_seconds = communication["sent"] / (settings.link_gbs * 1e9)
    mined = data.get("mined_negatives")
    if mined is not None:  # every mining: one forward pass over its texts, shared by the processes
        every = recipe.data.mined_negatives.every
        mined["minings"] = 1 + (steps - 1) // every if every else 1
        rows = sum(w.rows for work in works for w in work) or 1
        mean_length = round(sum(w.rows * w.length for work in works for w in work) / rows)
        per_device = -(-mined["texts_per_mining"] // engine.processes)
        tower = shape.towers[0]
        # the main process also ranks the corpus for every row: a (rows x d) by (d x corpus) product
        mined["flops_per_mining_main_device"] = (forward_flops(tower, per_device, mean_length)
                                                + 2.0 * mined["scores_per_mining"] * tower.hidden)
        mined["seconds_per_mining"] = mined["flops_per_mining_main_device"] / rate
        mined["mean_tokens_per_text"] = mean_length
    gib = 1024 ** 3
    if settings.device_memory_gb and peak.memory["total"] > settings.device_memory_gb * 1e9:
        problems.append(f"memory: the peak of {peak.memory['total'] / gib:.1f} GiB per device is more than the "
                        f"{settings.device_memory_gb:g} GB of a device; shard (an FSDP config), turn on "
                        "model.gradient_checkpointing or GradCache, or lower data.batch_size")
    return {
        "recipe": recipe.kind,
        "engine": {**engine.to_dict(), "shards": engine.shards},
        "data": data,
        "model": shape.to_dict(),
        "memory_per_device": {**peak.memory, "total_gib": round(peak.memory["total"] / gib, 3),
                              "peak_batch": peak_batch, "token_lengths": lengths_from,
                              "gradient_checkpointing": checkpointing,
                              "gradient_cache_chunks": chunks},
        "compute": {"steps": steps, "flops_per_step_per_device": flops,
                    "device_tflops": settings.device_tflops, "mfu": settings.mfu,
                    "seconds_per_step": seconds_per_step, "hours": steps * seconds_per_step / 3600,
                    "batches_scanned": len(works)},
        "communication": {"bytes_per_step": communication, "link_gbs": settings.link_gbs,
                          "seconds_per_step": communication_seconds,
                          "hours": steps * communication_seconds / 3600},
        "problems": problems,
    }


def _data(recipe, engine: Engine, problems: list[str], log):
    from embedtrain.data.accounting import problems as data_problems

    if recipe.kind == "dml":
        from embedtrain.train.tasks.dml import MetricLearningTask

        task = MetricLearningTask(recipe, log)
        task.read_data()
        batches = task.batches_in_epoch(0)
        if batches == 0:
            problems.append("data: no full class-balanced batch can be formed; lower data.batch_size")
        return {"train_classes": len(task.train_classes), "train_images": len(task.train_images),
                "test_classes": len(task.test_classes), "test_images": len(task.test_images),
                "batches_per_epoch": batches}, task
    if recipe.kind == "text":
        from embedtrain.data import token_lengths
        from embedtrain.train.tasks.text import TextTask

        task = TextTask(recipe, log)
        task.read_training_data()
        task.check_data(engine.processes)
        if task.streams is None and recipe.data.length_grouping:  # characters stand in for tokens: by rank, not size
            task.lengths = [token_lengths(ds) for ds in task.datasets]
    else:
        from embedtrain.train.tasks.multimodal import MultimodalTask

        task = MultimodalTask(recipe, log)
        task.read_data()
        task.check_data(engine.processes)
    if task.streams is not None:  # nothing to scan: the shards, their rows, the readers
        readers = engine.processes * max(1, recipe.data.num_workers)
        return {"global_batch": task.global_batch, "readers": readers,
                "streams": [s.to_dict() for s in task.datasets]}, task
    accounts = task.data_accounts()
    problems += data_problems(accounts, recipe.data.max_dropped_share, task.global_batch)
    data = {"global_batch": task.global_batch, "datasets": [a.to_dict() for a in accounts]}
    if getattr(recipe.data, "mined_negatives", None) is not None:
        # each mining embeds every distinct query and positive once (the corpus is the positives) and scores every
        # row's query against the corpus
        queries = [len({k[0] for k in ds.row_keys}) for ds in task.datasets]
        corpus = [len({k[1] for k in ds.row_keys}) for ds in task.datasets]
        data["mined_negatives"] = {"texts_per_mining": sum(queries) + sum(corpus),
                                   "scores_per_mining": sum(len(ds) * c for ds, c in zip(task.datasets, corpus))}
    return data, task


def _chunks(recipe) -> Optional[dict[str, int]]:
    t = recipe.train
    if recipe.kind in ("clip", "vlm2vec"):
        q = t.gradient_cache_query_chunk_size or t.gradient_cache_chunk_size
        d = t.gradient_cache_document_chunk_size or t.gradient_cache_chunk_size
        return {"query": q, "positive": d, "negative": d} if (q or d) else None
    if recipe.kind == "text" and t.gradient_cache_chunk_size:
        c = t.gradient_cache_chunk_size
        return {"query": c, "positive": c, "negative": c}
    return None


def _step_work(recipe, task, shape: ModelShape, engine: Engine, settings: PlanSettings):
    """(how token lengths were found, the per-device inputs of each of the run's first batches)."""
    steps = recipe.train.max_steps or recipe.train.epochs * task.batches_in_epoch(0)
    if recipe.kind == "dml":
        backbone = shape.towers[0]
        return "patches", [[Work(backbone.name, "image", recipe.data.batch_size, backbone.tokens)]]
    per = recipe.data.batch_size
    if getattr(task, "streams", None) is not None and recipe.kind != "text":
        # a stream is not read ahead: each dataset's roles (text, image) with every text at its limit
        from types import SimpleNamespace

        from embedtrain.data.sampler import PlannedBatch

        stand_ins = [SimpleNamespace(roles=list(s.images.roles), num_negatives=s.num_negatives,
                                     texts={r: None if t is None else [] for r, (t, _) in s.images.roles.items()},
                                     images={r: None if i is None else [] for r, (_, i) in s.images.roles.items()})
                     for s in task.datasets]
        task = SimpleNamespace(datasets=stand_ins)
        plan = [PlannedBatch(d, tuple(range(per * engine.processes))) for d in range(len(stand_ins))]
        how, works = _multimodal_work(recipe, task, shape, plan, engine, per, at_limit=True)
        return f"{how} (streaming datasets are not read ahead)", works
    if getattr(task, "streams", None) is not None:  # a stream is not read ahead: every text at its token limit
        tower, m = shape.towers[0].name, recipe.model
        limit = {"query": m.query_max_length or m.max_length, "document": m.document_max_length or m.max_length}
        worst = max(task.datasets, key=lambda s: s.num_negatives)
        work = [Work(tower, "query", per, limit["query"]), Work(tower, "positive", per, limit["document"])]
        if worst.num_negatives:
            work.append(Work(tower, "negative", per * worst.num_negatives, limit["document"]))
        return "every text at the recipe's token limit (streaming datasets are not read ahead)", [work]
    plan = task._plan(0)[: min(steps, settings.max_batches)]
    if recipe.kind == "text":
        from embedtrain.train.step import length_groups

        needed: dict[int, set] = {}
        for b in plan:  # only the rows of the batches scanned are tokenized
            needed.setdefault(b.dataset, set()).update(b.rows)
        how, lengths = _text_lengths(recipe, task, shape, needed, settings.lengths == "max")
        tower = shape.towers[0].name
        works = []
        for b in plan:
            roles = lengths[b.dataset]
            per_rank = []
            for rank in range(engine.processes):
                rows = b.rows[rank * per:(rank + 1) * per]
                work = [Work(tower, role, per * len(v[rows[0]]), max(max(v[r]) for r in rows)) for role, v in roles.items()]
                if recipe.train.forward_token_budget:  # every role's texts regrouped, as the trainer does
                    texts = [n for v in roles.values() for r in rows for n in v[r]]
                    work = [Work(tower, "regrouped", len(g), max(texts[i] for i in g))
                            for g in length_groups(texts, recipe.train.forward_token_budget)]
                per_rank.append(work)
            works.append(max(per_rank, key=lambda w: sum(x.rows * x.length for x in w)))
        return how, works
    return _multimodal_work(recipe, task, shape, plan, engine, per, settings.lengths == "max")


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "tokenizer.model",
                   "spiece.model", "sentencepiece.bpe.model")


def _text_lengths(recipe, task, shape: ModelShape, needed: dict[int, set], at_limit: bool = False):
    """Per dataset, role -> {row: tokens of each text of the role} for the ``needed`` rows, capped at the role's
    limit (the model's tokenizer when it is local, else characters / CHARS_PER_TOKEN)."""
    from pathlib import Path

    m = recipe.model
    tokenizer, how = None, f"estimated from characters ({CHARS_PER_TOKEN} per token; no local tokenizer)"
    # a folder of config.json alone (recipes/model_configs) has no tokenizer: some classes would build an empty one
    if Path(shape.source).is_dir() and any((Path(shape.source) / f).is_file() for f in TOKENIZER_FILES):
        try:
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(shape.source)
            how = f"tokenizer of {shape.source}"
        except (OSError, ValueError):
            tokenizer = None
    limit = {"query": m.query_max_length or m.max_length, "document": m.document_max_length or m.max_length}
    if at_limit:
        tokenizer, how = None, "every text at the recipe's token limit (--lengths max)"
    mined = recipe.data.mined_negatives.num_negatives if recipe.data.mined_negatives else 0
    out = []
    for d, ds in enumerate(task.datasets):
        rows = sorted(needed.get(d, ()))
        picked = ds.rows.select(rows) if rows else None
        roles: dict[str, dict[int, tuple[int, ...]]] = {"query": {}, "positive": {}}
        negatives = [c for c in ds.role_columns if c.startswith("negative_")]
        if negatives or mined:
            roles["negative"] = {}
        per_column = {}
        for column in (ds.role_columns if rows else []):
            role = "query" if column == "query" else "document"
            prompt = ds.query_prompt if role == "query" else ds.document_prompt
            texts = [prompt + t for t in column_list(picked, column)]
            if at_limit:
                per_column[column] = [limit[role]] * len(rows)
            elif tokenizer is not None:
                per_column[column] = [len(x) for x in tokenizer(texts, truncation=True, max_length=limit[role])["input_ids"]]
            else:
                per_column[column] = [min(limit[role], math.ceil(len(t) / CHARS_PER_TOKEN) + 2) for t in texts]
        for i, r in enumerate(rows):
            roles["query"][r] = (per_column["query"][i],)
            roles["positive"][r] = (per_column["positive"][i],)
            if negatives or mined:  # a mined negative is another row's positive: counted at this row's positive length
                roles["negative"][r] = tuple(per_column[c][i] for c in negatives) + (per_column["positive"][i],) * mined
        out.append(roles)
    if mined:
        how += "; each mined negative at the length of its row's positive"
    return how, out


def _multimodal_work(recipe, task, shape: ModelShape, plan, engine: Engine, per: int, at_limit: bool = False):
    towers = {t.name: t for t in shape.towers}
    works = []
    if recipe.kind == "clip":
        image_tokens, context = towers["image"].tokens, towers["text"].tokens
        for b in plan:
            ds = task.datasets[b.dataset]
            w = []
            for role in ds.roles:
                n = per * (1 if role != "negative" else ds.num_negatives)
                if ds.images[role] is not None:
                    w.append(Work("image", role, n, image_tokens))
                if ds.texts[role] is not None:
                    w.append(Work("text", role, n, context))
            works.append(w)
        return "open_clip context length and patches", works
    m = recipe.model
    merged = (m.image_max_pixels or 12845056) // (28 * 28)  # visual tokens the language model sees per image
    for b in plan:
        ds = task.datasets[b.dataset]
        worst = None
        for rank in range(engine.processes):
            rows = b.rows[rank * per:(rank + 1) * per]
            w = []
            for role in ds.roles:
                texts, images = ds.texts[role], ds.images[role]
                text_tokens = m.max_length if at_limit else max(
                    (min(m.max_length, math.ceil(len(texts[r] or "") / CHARS_PER_TOKEN) + 8) for r in rows), default=8) \
                    if texts is not None else 8
                w.append(Work("language", role, len(rows), text_tokens + (merged if images is not None else 0)))
                if images is not None and "vision" in towers:
                    w.append(Work("vision", role, len(rows), merged * 4))
            if worst is None or sum(x.rows * x.length for x in w) > sum(x.rows * x.length for x in worst):
                worst = w
        works.append(worst)
    text = "text at model.max_length" if at_limit else f"text estimated from characters ({CHARS_PER_TOKEN} per token)"
    return f"{text} plus {merged} visual tokens per image (model.image_max_pixels)", works


def format_plan(plan: dict) -> list[str]:
    """The plan as the lines ``embedtrain plan`` prints."""
    gib = 1024 ** 3
    e, m, mem, c = plan["engine"], plan["model"], plan["memory_per_device"], plan["compute"]
    lines = [f"engine: {e['distributed_type']} on {e['processes']} process(es), mixed precision {e['mixed_precision']}"
             f" ({e['source']})"]
    d = plan["data"]
    if "datasets" in d:
        lines.append(f"data: global batch {d['global_batch']}")
        for a in d["datasets"]:
            drops = ", ".join(f"{n} by {rule}" for rule, n in a["dropped"].items()) or "none"
            held = f"; {a['held_out']:,} held out for the diagnostics probe" if a.get("held_out") else ""
            lines.append(f"  {a['name']}: {a['rows_read']:,} rows read, {a['rows_per_epoch']:,} trained per epoch in "
                         f"{a['batches_per_epoch']:,} batches; dropped: {drops}{held}")
        if "mined_negatives" in d:
            mn = d["mined_negatives"]
            lines.append(f"  mined negatives: {mn['minings']} mining(s), each a forward pass over "
                         f"{mn['texts_per_mining']:,} texts shared by the processes: "
                         f"{mn['flops_per_mining_main_device']:.3g} FLOPs on the main device at {mn['mean_tokens_per_text']} "
                         f"tokens per text (the scanned batches' mean) and the ranking of {mn['scores_per_mining']:.3g} "
                         f"scores, {mn['seconds_per_mining']:.3g} s each at the rate below (not in its per-step figures)")
    elif "streams" in d:
        lines.append(f"data: global batch {d['global_batch']}, streamed by {d['readers']} reader(s) "
                     "(processes x workers)")
        for st in d["streams"]:
            rows = "rows unknown until read" if st["rows"] is None else \
                f"{'about ' * st['rows_estimated']}{st['rows']:,} rows"
            note = "; fewer shards than readers: each reads every shard" if st["shards"] < d["readers"] else ""
            lines.append(f"  {st['name']}: {st['path']}, {st['format']}, {st['shards']} shard(s), {rows}{note}")
    else:
        lines.append(f"data: {d['train_classes']} classes ({d['train_images']} images) to train, "
                     f"{d['batches_per_epoch']} batches per epoch")
    lines.append(f"model: {m['total']:,} parameters ({m['base_total']:,} pretrained), {m['trainable']:,} trainable "
                 f"({100 * m['trainable'] / max(1, m['total']):.2f}%)")
    parts = ", ".join(f"{k} {v / gib:.2f}" for k, v in mem.items()
                      if type(v) is int and k not in ("total", "peak_batch"))
    lines.append(f"memory per device: {mem['total'] / gib:.2f} GiB ({parts} GiB); token lengths: {mem['token_lengths']}")
    lines.append(f"compute: {c['flops_per_step_per_device']:.3g} FLOPs per step per device; at {c['mfu']:.0%} of "
                 f"{c['device_tflops']:g} TFLOP/s: {c['seconds_per_step']:.3g} s per step, {c['hours']:.2f} h for "
                 f"{c['steps']:,} steps")
    k = plan["communication"]
    b = k["bytes_per_step"]
    if b["sent"]:
        kinds = ", ".join(f"{name.replace('_', '-')} {b[name] / 1e9:.3g}" for name in ("all_gather", "reduce_scatter",
                                                                                     "all_reduce") if b[name])
        lines.append(f"communication: {b['sent'] / 1e9:.3g} GB sent per step per device ({kinds} GB of buffers); at "
                     f"{k['link_gbs']:g} GB/s: {k['seconds_per_step']:.3g} s per step, {k['hours']:.2f} h for the run if "
                     "none of it overlaps compute")
    for p in plan["problems"]:
        lines.append(f"problem: {p}")
    return lines
