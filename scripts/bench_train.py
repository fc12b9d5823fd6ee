"""Training speed and memory: embedtrain against sentence-transformers' trainer.

Two suites; each configuration runs in a fresh child process (clean peak memory), the parent
collects one JSON document (stdout and ``--output``) and prints a Markdown table to stderr.

``--suite scale``
    examples/s and peak memory of embedtrain (plain, and GradCache with
    ``train.gradient_cache_chunk_size``) and of sentence-transformers (MultipleNegativesRankingLoss,
    and CachedMultipleNegativesRankingLoss with ``mini_batch_size`` = the same chunk) at several
    batch sizes, query + positive + hard negative. ``--warmup`` steps, then ``--steps`` timed steps.

``--suite throughput``
    the quickstart setting (all-MiniLM-L6-v2, WordNet with hard negatives, batch 64, 100 steps,
    lr 2e-4 with 10% linear warmup, temperature 0.05 = scale 20, 128 tokens): embedtrain, sentence-
    transformers with its recommended settings for MNRL (NO_DUPLICATES batches), and sentence-
    transformers with the speed options it offers (each recorded as applied or not, with the reason).
    ``--repeats`` interleaved runs (A, B, C, A, B, C, ...); the first ``--warmup`` steps of each run
    are not timed. After each run the saved model is scored on the held-out WordNet split (nDCG@10)
    by the same code for both frameworks (embedtrain's ``load_text_encoder`` + ``evaluate_retrieval``).

What is timed
    ``examples_per_s`` is the median over timed steps of batch / (end of step k - end of step k-1):
    everything a step costs in the loop, the data pipeline included (embedtrain: collation of token
    ids tokenized once before the loop; sentence-transformers: tokenization in its collator, every
    step). ``compute_examples_per_s`` leaves the data pipeline out (step begin to step end:
    forward, loss, backward, clipping, optimizer). Model loading, one-time tokenization and saving
    are never timed. embedtrain's figure comes from its metrics.jsonl (``log_every=1``).

Peak memory (CPU)
    ``peak_rss_mb``: the process's peak RSS up to the end of the training loop (``ru_maxrss``,
    saving and evaluation excluded); ``peak_increase_mb``: that peak minus the RSS right after the
    model was loaded (RSS sampled every 10 ms, combined with ``ru_maxrss``); ``steps_peak_increase_mb``:
    the peak during the training steps minus the RSS just before the first step. On CUDA also
    ``cuda_peak_mb`` (``torch.cuda.max_memory_allocated``).

Examples::

    python scripts/bench_train.py --suite scale --output runs/bench/scale.json
    python scripts/bench_train.py --suite throughput --repeats 3 --output runs/bench/throughput.json
    python scripts/bench_train.py --suite scale --batch-sizes 8 16 --steps 2 --max-rows 2000
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _bench_common import (  # noqa: E402
    QUICKSTART,
    MemoryMonitor,
    emit_result,
    eprint,
    machine_info,
    markdown_table,
    mean,
    median,
    offline_env,
    ratio,
    run_child,
    sync,
    write_json,
)

EMBEDTRAIN, ST = "embedtrain", "sentence-transformers"
SCALE_VARIANTS = [(EMBEDTRAIN, "plain"), (EMBEDTRAIN, "gradcache"), (ST, "mnrl"), (ST, "cmnrl")]
THROUGHPUT_VARIANTS = [(EMBEDTRAIN, "default"), (EMBEDTRAIN, "token_budget"), (ST, "default"), (ST, "speed")]


# ==========================================================================================
# Child: one configuration
# ==========================================================================================


def _token_stats(role_masks: dict[str, Any]) -> dict[str, tuple[int, int]]:
    """role -> (real tokens, computed tokens incl. padding) of one collated batch."""
    return {role: (int(mask.sum()), int(mask.numel())) for role, mask in role_masks.items() if mask is not None}


def _summarize_tokens(batches: list[dict[str, tuple[int, int]]]) -> dict[str, Any]:
    if not batches:
        return {}
    roles = sorted({r for b in batches for r in b})
    out: dict[str, Any] = {"per_role": {}}
    real_total = padded_total = 0
    for role in roles:
        real = sum(b[role][0] for b in batches if role in b)
        padded = sum(b[role][1] for b in batches if role in b)
        real_total, padded_total = real_total + real, padded_total + padded
        out["per_role"][role] = {"real_share": real / padded if padded else None,
                                 "real_tokens_per_step": real / len(batches),
                                 "tokens_per_step": padded / len(batches)}
    out["real_tokens_per_step"] = real_total / len(batches)
    out["tokens_per_step"] = padded_total / len(batches)
    out["real_share"] = real_total / padded_total if padded_total else None
    return out


def _timing(batch_size: int, warmup: int, ends: list[float], begins: list[float], start: Optional[float],
            data_seconds: list[float]) -> dict[str, Any]:
    """Per-step cadence (end to end) and compute (begin to end) after the warm-up steps."""
    out: dict[str, Any] = {}
    if ends:
        prev = [start] + ends[:-1]
        cadence = [e - p for e, p in zip(ends, prev) if p is not None]
        offset = len(ends) - len(cadence)
        cadence = [c for i, c in enumerate(cadence) if i + offset >= warmup]
        out["step_seconds"] = cadence
        out["examples_per_s"] = median([batch_size / c for c in cadence if c > 0])
    if ends and begins and len(begins) == len(ends):
        compute = [e - b for e, b in zip(ends, begins)][warmup:]
        out["compute_step_seconds"] = compute
        out["compute_examples_per_s"] = median([batch_size / c for c in compute if c > 0])
    timed_data = data_seconds[warmup:] if len(data_seconds) > warmup else data_seconds
    out["data_seconds_per_step"] = mean(timed_data)
    return out


def _evaluate_saved(model_dir: Path, cfg: dict) -> dict[str, Any]:
    """Score a saved model folder on a BEIR folder with embedtrain's retrieval evaluation (both
    frameworks go through exactly this function)."""
    from embedtrain.eval.retrieval import evaluate_retrieval, load_beir
    from embedtrain.models import load_text_encoder

    encoder = load_text_encoder(str(model_dir), max_length=cfg["max_length"])
    data = load_beir(cfg["eval"])
    start = time.perf_counter()
    scores = evaluate_retrieval(encoder, data, batch_size=cfg["eval_batch_size"])
    return {**scores, "eval_seconds": time.perf_counter() - start}


def child_embedtrain(cfg: dict, workdir: Path) -> dict[str, Any]:
    """Drive embedtrain.train on one recipe and observe it through the trainer's callbacks:

    - ``on_train_begin`` (model loaded and prepared) -> RSS baseline after the load; the optimizer's kind
      (fused / foreach / for-loop AdamW);
    - ``on_step_begin`` (the batch is on the device) -> step begin, the step-window baseline, the padded
      shapes of the batch and the time the loader took to deliver it (``trainer.data_seconds``);
    - ``on_step_end`` (after the optimizer step) -> step end; the last one closes the memory windows
      (saving is not measured).
    """
    import embedtrain
    from embedtrain.config import recipe_from_dict
    from embedtrain.train.loop import Callback

    total = cfg["total_steps"]
    begins: list[float] = []
    ends: list[float] = []
    data_seconds: list[float] = []
    tokens: list[dict] = []
    optimizer_kind: dict[str, Any] = {}
    out_dir = workdir / "run"

    with MemoryMonitor() as mon:
        class Observe(Callback):
            def on_train_begin(self, trainer):
                mon.open("load")
                opt = getattr(trainer.optimizer, "optimizer", trainer.optimizer)  # accelerate's wrapper
                optimizer_kind.update(name=type(opt).__name__, fused=opt.defaults.get("fused"),
                                      foreach=opt.defaults.get("foreach"))

            def on_step_begin(self, trainer, batch):
                if not begins:
                    mon.open("steps")
                # the padding this step computes, counted before the step's clock starts
                if cfg.get("token_budget"):  # every role's rows regrouped: count the chunks' tokens
                    from embedtrain.train.step import length_sorted_chunks

                    chunks, _ = length_sorted_chunks([batch[r] for r in ("query", "positive", "negative")
                                                      if batch[r] is not None], cfg["token_budget"])
                    tokens.append({"all roles": (sum(int(c["attention_mask"].sum()) for c in chunks),
                                                 sum(c["attention_mask"].numel() for c in chunks))})
                else:
                    tokens.append(_token_stats({r: (batch[r] or {}).get("attention_mask")
                                                for r in ("query", "positive", "negative")}))
                sync()
                begins.append(time.perf_counter())
                data_seconds.append(trainer.data_seconds)

            def on_step_end(self, trainer, figures):
                sync()
                ends.append(time.perf_counter())
                if len(ends) >= total:  # the last step: close the memory windows before saving
                    mon.close("steps")
                    mon.close("load")

        recipe = recipe_from_dict({
            "model": {"name_or_path": cfg["model"], "max_length": cfg["max_length"], "pooling": "mean",
                      "normalize": True},
            "data": {
                "train": [{"path": cfg["data"], "name": "bench", "query_column": cfg["query_column"],
                           "positive_column": cfg["positive_column"], "negative_columns": [cfg["negative_column"]],
                           "max_rows": cfg["max_rows"]}],
                "batch_size": cfg["batch_size"],
                "length_grouping": cfg["length_grouping"],
            },
            "loss": {"name": "infonce", "temperature": cfg["temperature"]},
            "train": {"lr": cfg["lr"], "max_steps": total, "warmup_ratio": cfg["warmup_ratio"], "scheduler": "linear",
                      "weight_decay": cfg["weight_decay"], "max_grad_norm": cfg["max_grad_norm"], "seed": cfg["seed"],
                      "log_every": 1, "torch_threads": cfg["threads"],
                      "gradient_cache_chunk_size": cfg["chunk"] if cfg["variant"] == "gradcache" else None,
                      "forward_token_budget": cfg.get("token_budget")},
            # no diagnostics probe: the sentence-transformers side trains on every row and measures nothing
            "eval": {"tasks": [], "diagnostics": {"probe_rows": 0}},
            "output": {"dir": str(out_dir), "plot": False, "overwrite": True},
        })
        loop_start = time.perf_counter()
        result = embedtrain.train(recipe, log=lambda *a: eprint(*a), callbacks=[Observe()])
        mon.close("steps")
        mon.close("load")
        seconds = time.perf_counter() - loop_start

    lines = [json.loads(l) for l in (out_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines() if '"loss"' in l]
    per_step = {l["step"]: l for l in lines if "examples_per_s" in l}
    warmup = cfg["warmup"]
    timed = [per_step[s] for s in sorted(per_step) if s > warmup]
    metrics_eps = [l["examples_per_s"] for l in timed]
    res: dict[str, Any] = {
        "steps_done": result.steps,
        "train_call_seconds": seconds,
        "optimizer": optimizer_kind or None,
        "loss_first": lines[0].get("loss") if lines else None,
        "loss_last": timed[-1]["loss"] if timed else None,
    }
    res.update(_timing(cfg["batch_size"], warmup, ends, begins, None, data_seconds))
    # the primary figure: embedtrain's own metrics.jsonl (log_every=1, one line per step)
    res["examples_per_s_hooks"] = res.get("examples_per_s")
    res["examples_per_s"] = median(metrics_eps)
    res["step_seconds"] = [cfg["batch_size"] / e for e in metrics_eps]
    res["tokens"] = _summarize_tokens(tokens[warmup:] or tokens)
    res["memory"] = {"load": mon.result("load"), "steps": mon.result("steps")}
    res["hooks"] = {"step_begin": len(begins), "step_end": len(ends), "collate": len(data_seconds)}
    if cfg.get("eval"):
        res["quality"] = _evaluate_saved(result.model_dir, cfg)
    return res


def _st_speed_options(model, cfg: dict, cuda: bool) -> tuple[dict[str, Any], Any]:
    """The speed options sentence-transformers 6 offers, each applied where it can be, else why not."""
    import inspect

    from sentence_transformers.base.sampler import BatchSamplers
    from sentence_transformers.base.trainer import BaseTrainer

    options: dict[str, Any] = {}
    try:
        import xxhash  # noqa: F401  (needed by no_duplicates_hashed)

        sampler = BatchSamplers.NO_DUPLICATES_HASHED
        options["batch_sampler"] = {"applied": True, "value": "no_duplicates_hashed",
                                    "reason": "duplicate check on precomputed xxhash row hashes"}
    except ImportError:
        sampler = BatchSamplers.NO_DUPLICATES
        options["batch_sampler"] = {"applied": False, "value": "no_duplicates",
                                    "reason": "no_duplicates_hashed needs the xxhash package"}

    transformer = model[0]
    transformer.unpad_inputs = True  # falls back (with a warning) when the prerequisites are missing
    applied = bool(getattr(transformer, "can_flatten_inputs", False))
    options["unpad_inputs"] = {
        "applied": applied,
        "attn_implementation": getattr(getattr(transformer, "config", None), "_attn_implementation", None),
        "reason": "inputs concatenated without padding (flash attention varlen)" if applied else (
            "needs flash attention with variable-length kernels (attn_implementation flash_attention_2); "
            + ("not available on CPU" if not cuda else "not available in this environment")),
    }
    if not applied:
        transformer.unpad_inputs = None

    methods = ("get_train_dataloader", "_build_dataloader", "get_batch_sampler")
    source = "".join(inspect.getsource(getattr(BaseTrainer, n)) for n in methods if hasattr(BaseTrainer, n))
    reads_strategy = "train_sampling_strategy" in source or "group_by_length" in source
    options["length_grouping"] = {
        "applied": False,
        "reason": ("sentence-transformers builds training batches with its own batch sampler "
                   "(batch_sampler / no_duplicates / no_duplicates_hashed / group_by_label, none by length); "
                   "transformers' train_sampling_strategy='group_by_length' is "
                   + ("read by its dataloader code, but not combined with no-duplicate batches" if reads_strategy
                      else "never consulted by its get_train_dataloader"))
    }
    options["dataloader_num_workers"] = {
        "applied": cfg["st_workers"] > 0, "value": cfg["st_workers"],
        "reason": "tokenization in worker processes, overlapping the step" if cfg["st_workers"] > 0
        else "left at 0 (set --st-speed-workers; on a 2-core machine workers compete with torch's threads)",
    }
    return options, sampler


def child_sentence_transformers(cfg: dict, workdir: Path) -> dict[str, Any]:
    import datasets
    import torch
    from sentence_transformers import (
        SentenceTransformer,
        SentenceTransformerTrainer,
        SentenceTransformerTrainingArguments,
    )
    from sentence_transformers.base.sampler import BatchSamplers
    from sentence_transformers.sentence_transformer.losses import (
        CachedMultipleNegativesRankingLoss,
        MultipleNegativesRankingLoss,
    )
    from transformers import TrainerCallback

    from embedtrain.config import resolve_path

    if cfg["threads"]:
        torch.set_num_threads(cfg["threads"])
    cuda = torch.cuda.is_available()
    total, warmup, batch_size = cfg["total_steps"], cfg["warmup"], cfg["batch_size"]

    # the same rows as embedtrain reads: query, positive, one hard negative
    datasets.disable_progress_bars()
    raw = datasets.load_dataset("json", data_files=resolve_path(cfg["data"]), split="train")
    if cfg["max_rows"]:
        raw = raw.select(range(min(cfg["max_rows"], len(raw))))
    train_dataset = datasets.Dataset.from_dict({
        "anchor": raw[cfg["query_column"]], "positive": raw[cfg["positive_column"]],
        "negative": raw[cfg["negative_column"]],
    })

    begins: list[float] = []
    ends: list[float] = []
    data_seconds: list[float] = []
    tokens: list[dict] = []
    marks: dict[str, Optional[float]] = {"train_begin": None}

    with MemoryMonitor() as mon:
        model = None
        load_note = None
        if cfg["variant"] == "speed" and cuda:  # unpad_inputs needs flash attention; try it where it may exist
            try:
                model = SentenceTransformer(resolve_path(cfg["model"]), device="cuda",
                                            model_kwargs={"attn_implementation": "flash_attention_2"})
            except (ImportError, ValueError, OSError, RuntimeError) as err:
                load_note = f"flash_attention_2 could not be loaded: {str(err).splitlines()[0][:160]}"
        if model is None:
            model = SentenceTransformer(resolve_path(cfg["model"]), device="cuda" if cuda else "cpu")
        model.max_seq_length = cfg["max_length"]
        mon.open("load")

        options: dict[str, Any] = {}
        sampler = BatchSamplers.NO_DUPLICATES
        if cfg["variant"] == "speed":
            options, sampler = _st_speed_options(model, cfg, cuda)
            if load_note:
                options["unpad_inputs"]["reason"] += f" ({load_note})"
        scale = 1.0 / cfg["temperature"]
        if cfg["variant"] == "cmnrl":
            loss = CachedMultipleNegativesRankingLoss(model, scale=scale, mini_batch_size=cfg["chunk"])
        else:
            loss = MultipleNegativesRankingLoss(model, scale=scale)

        class StepTimer(TrainerCallback):
            def on_train_begin(self, args, state, control, **kwargs):
                marks["train_begin"] = time.perf_counter()

            def on_step_begin(self, args, state, control, **kwargs):
                if not begins:
                    mon.open("steps")
                sync()
                begins.append(time.perf_counter())

            def on_step_end(self, args, state, control, **kwargs):
                sync()
                ends.append(time.perf_counter())
                if state.global_step >= total:
                    mon.close("steps")
                    mon.close("load")

        args = SentenceTransformerTrainingArguments(
            output_dir=str(workdir / "st"),
            per_device_train_batch_size=batch_size,
            max_steps=total,
            learning_rate=cfg["lr"],
            warmup_steps=cfg["warmup_ratio"],  # a float below 1 is a ratio in transformers 5
            lr_scheduler_type="linear",
            weight_decay=cfg["weight_decay"],
            max_grad_norm=cfg["max_grad_norm"],
            seed=cfg["seed"],
            batch_sampler=sampler,
            dataloader_drop_last=True,
            dataloader_num_workers=cfg["st_workers"] if cfg["variant"] == "speed" else 0,
            save_strategy="no",
            eval_strategy="no",
            logging_strategy="no",
            report_to="none",
            disable_tqdm=True,
            use_cpu=not cuda,
        )
        trainer = SentenceTransformerTrainer(model=model, args=args, train_dataset=train_dataset, loss=loss,
                                             callbacks=[StepTimer()])

        class TimedCollator:
            """Times sentence-transformers' collator (it tokenizes) and records the padded shapes."""

            def __init__(self, inner):
                self.inner = inner

            def __call__(self, features):
                start = time.perf_counter()
                batch = self.inner(features)
                data_seconds.append(time.perf_counter() - start)
                masks = {k[: -len("_attention_mask")]: v for k, v in batch.items() if k.endswith("_attention_mask")}
                tokens.append(_token_stats({"query" if r == "anchor" else r: m for r, m in masks.items()}))
                return batch

            def __getattr__(self, name):
                return getattr(self.inner, name)

        if cfg["variant"] != "speed" or cfg["st_workers"] == 0:  # a wrapper would not report from workers
            trainer.data_collator = TimedCollator(trainer.data_collator)
        loop_start = time.perf_counter()
        trainer.train()
        mon.close("steps")
        mon.close("load")
        seconds = time.perf_counter() - loop_start

    res: dict[str, Any] = {"steps_done": trainer.state.global_step, "train_call_seconds": seconds,
                           "optimizer": str(getattr(args.optim, "value", args.optim)),
                           "batch_sampler": str(getattr(sampler, "value", sampler))}
    if options:
        res["speed_options"] = options
    res.update(_timing(batch_size, warmup, ends, begins, marks["train_begin"], data_seconds))
    res["tokens"] = _summarize_tokens(tokens[warmup:] or tokens)
    res["memory"] = {"load": mon.result("load"), "steps": mon.result("steps")}
    if cfg.get("eval"):
        model_dir = workdir / "model"
        model.save(str(model_dir))
        res["quality"] = _evaluate_saved(model_dir, cfg)
    return res


def child_main(cfg: dict) -> None:
    offline_env()
    workdir = Path(cfg["workdir"])
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        run = child_embedtrain if cfg["framework"] == EMBEDTRAIN else child_sentence_transformers
        res = run(cfg, workdir)
    finally:
        if not cfg.get("keep"):
            shutil.rmtree(workdir, ignore_errors=True)
    mem_load = (res.get("memory") or {}).get("load") or {}
    mem_steps = (res.get("memory") or {}).get("steps") or {}
    res.update({
        "framework": cfg["framework"],
        "variant": cfg["variant"],
        "batch_size": cfg["batch_size"],
        "chunk": cfg["chunk"] if cfg["variant"] in ("gradcache", "cmnrl") else None,
        "steps": cfg["total_steps"],
        "timed_steps": cfg["total_steps"] - cfg["warmup"],
        "baseline_rss_mb": mem_load.get("start_rss_mb"),
        "peak_rss_mb": mem_load.get("ru_maxrss_mb"),
        "peak_increase_mb": mem_load.get("peak_increase_mb"),
        "steps_peak_increase_mb": mem_steps.get("peak_increase_mb"),
        "cuda_peak_mb": mem_load.get("cuda_peak_mb"),
        "ndcg@10": (res.get("quality") or {}).get("ndcg@10"),
        "repeat": cfg.get("repeat"),
    })
    import torch

    res["torch_threads"] = torch.get_num_threads()
    emit_result(res)


# ==========================================================================================
# Parent: configurations, children, summary
# ==========================================================================================


def _child_config(args, framework: str, variant: str, batch_size: int, total: int, workdir: Path, index: int,
                  with_eval: bool, repeat: Optional[int] = None) -> dict:
    return {
        "framework": framework, "variant": variant, "batch_size": batch_size, "total_steps": total,
        "warmup": args.warmup, "model": args.model, "data": args.data, "query_column": args.query_column,
        "positive_column": args.positive_column, "negative_column": args.negative_column,
        "max_rows": args.max_rows, "lr": args.lr, "warmup_ratio": args.warmup_ratio,
        "weight_decay": args.weight_decay, "max_grad_norm": args.max_grad_norm, "temperature": args.temperature,
        "max_length": args.max_length, "seed": args.seed, "chunk": args.chunk, "threads": args.threads,
        "eval": args.eval if with_eval else None, "eval_batch_size": args.eval_batch_size,
        "length_grouping": not args.no_length_grouping, "st_workers": args.st_speed_workers,
        "token_budget": args.token_budget if variant == "token_budget" else None,
        "workdir": str(workdir / f"{index:03d}-{framework}-{variant}-{batch_size}"), "keep": args.keep,
        "repeat": repeat,
    }


def _run(args, cfg: dict, i: int, n: int) -> dict:
    label = f"{cfg['framework']}/{cfg['variant']} batch {cfg['batch_size']}"
    if cfg.get("repeat") is not None:
        label += f" repeat {cfg['repeat'] + 1}"
    eprint(f"[{i + 1}/{n}] {label} ...")
    res = run_child([str(Path(__file__).resolve()), "--child", json.dumps(cfg)], args.timeout, args.verbose)
    for key in ("framework", "variant", "batch_size", "repeat"):
        res.setdefault(key, cfg[key])
    if "error" in res:
        eprint(f"  failed: {res['error']}\n{res.get('stderr_tail', '')[-1500:]}")
    else:
        eprint(f"  {res.get('examples_per_s') or 0:.1f} examples/s, peak RSS {res.get('peak_rss_mb') or 0:.0f} MB"
               + (f", nDCG@10 {100 * res['ndcg@10']:.2f}" if res.get("ndcg@10") is not None else ""))
    return res


def _find(results: list[dict], framework: str, variant: str, batch_size: int) -> Optional[dict]:
    return next((r for r in results if r["framework"] == framework and r["variant"] == variant
                 and r["batch_size"] == batch_size and "error" not in r), None)


def _get(res: Optional[dict], key: str) -> Optional[float]:
    return res.get(key) if res else None


def summarize_scale(args, results: list[dict]) -> tuple[dict, str]:
    ratios: dict[str, Any] = {"examples_per_s": {}, "memory": {}}
    for b in args.batch_sizes:
        for ours, theirs in (("plain", "mnrl"), ("gradcache", "cmnrl")):
            a, s = _find(results, EMBEDTRAIN, ours, b), _find(results, ST, theirs, b)
            ratios["examples_per_s"][f"embedtrain-{ours}/st-{theirs}@{b}"] = ratio(_get(a, "examples_per_s"),
                                                                                 _get(s, "examples_per_s"))
            ratios["examples_per_s"][f"embedtrain-{ours}/st-{theirs}@{b} (compute only)"] = ratio(
                _get(a, "compute_examples_per_s"), _get(s, "compute_examples_per_s"))
    lo, hi = min(args.batch_sizes), max(args.batch_sizes)
    for framework, plain, cached in ((EMBEDTRAIN, "plain", "gradcache"), (ST, "mnrl", "cmnrl")):
        big, small = _find(results, framework, cached, hi), _find(results, framework, plain, lo)
        name = "embedtrain" if framework == EMBEDTRAIN else "st"
        for key in ("peak_rss_mb", "peak_increase_mb", "steps_peak_increase_mb", "cuda_peak_mb"):
            value = ratio(_get(big, key), _get(small, key))
            if value is not None:
                ratios["memory"][f"{name}: {cached}@{hi} / {plain}@{lo} {key}"] = value
        plain_big = _find(results, framework, plain, hi)
        for key in ("peak_increase_mb", "steps_peak_increase_mb"):
            value = ratio(_get(big, key), _get(plain_big, key))
            if value is not None:
                ratios["memory"][f"{name}: {cached}@{hi} / {plain}@{hi} {key}"] = value
    rows = sorted(results, key=lambda r: (r["batch_size"], r["framework"], r["variant"]))
    table = markdown_table(
        [dict(r, tokens_per_step=(r.get("tokens") or {}).get("tokens_per_step"),
              real_share=(r.get("tokens") or {}).get("real_share"), status=r.get("error", "ok")) for r in rows],
        [("framework", "framework", 0), ("variant", "variant", 0), ("batch_size", "batch", 0),
         ("examples_per_s", "examples/s", 1), ("compute_examples_per_s", "examples/s (compute)", 1),
         ("data_seconds_per_step", "data s/step", 3), ("tokens_per_step", "tokens/step", 0),
         ("real_share", "real-token share", 2), ("peak_rss_mb", "peak RSS MB", 0),
         ("peak_increase_mb", "peak over loaded MB", 0), ("steps_peak_increase_mb", "peak over step-0 MB", 0),
         ("status", "status", 0)])
    return ratios, table


def summarize_throughput(args, results: list[dict]) -> tuple[dict, list[dict], str]:
    summary = []
    for framework, variant in _selected(args, THROUGHPUT_VARIANTS):
        runs = [r for r in results if r["framework"] == framework and r["variant"] == variant and "error" not in r]
        summary.append({
            "framework": framework, "variant": variant, "runs": len(runs),
            "examples_per_s": median([r.get("examples_per_s") for r in runs]),
            "examples_per_s_runs": [r.get("examples_per_s") for r in runs],
            "compute_examples_per_s": median([r.get("compute_examples_per_s") for r in runs]),
            "data_seconds_per_step": median([r.get("data_seconds_per_step") for r in runs]),
            "peak_rss_mb": median([r.get("peak_rss_mb") for r in runs]),
            "peak_increase_mb": median([r.get("peak_increase_mb") for r in runs]),
            "ndcg@10": median([r.get("ndcg@10") for r in runs]),
            "ndcg@10_runs": [r.get("ndcg@10") for r in runs],
            "real_share": median([(r.get("tokens") or {}).get("real_share") for r in runs]),
            "tokens_per_step": median([(r.get("tokens") or {}).get("tokens_per_step") for r in runs]),
            "speed_options": next((r["speed_options"] for r in runs if r.get("speed_options")), None),
        })
    by = {(s["framework"], s["variant"]): s for s in summary}
    ours = by.get((EMBEDTRAIN, "default"))
    ratios: dict[str, Any] = {}
    budget = by.get((EMBEDTRAIN, "token_budget"))
    ratios["embedtrain token_budget/default examples_per_s"] = ratio(_get(budget, "examples_per_s"),
                                                                     _get(ours, "examples_per_s"))
    ratios["embedtrain token_budget/st-default examples_per_s"] = ratio(_get(budget, "examples_per_s"),
                                                                        _get(by.get((ST, "default")), "examples_per_s"))
    for variant in ("default", "speed"):
        theirs = by.get((ST, variant))
        ratios[f"embedtrain/st-{variant} examples_per_s"] = ratio(_get(ours, "examples_per_s"),
                                                                  _get(theirs, "examples_per_s"))
        ratios[f"embedtrain/st-{variant} compute_examples_per_s"] = ratio(_get(ours, "compute_examples_per_s"),
                                                                          _get(theirs, "compute_examples_per_s"))
        ratios[f"embedtrain/st-{variant} peak_rss_mb"] = ratio(_get(ours, "peak_rss_mb"), _get(theirs, "peak_rss_mb"))
        if _get(ours, "ndcg@10") is not None and _get(theirs, "ndcg@10") is not None:
            ratios[f"embedtrain-st-{variant} ndcg@10 difference"] = ours["ndcg@10"] - theirs["ndcg@10"]
    table = markdown_table(
        [dict(s, ndcg=100 * s["ndcg@10"] if s["ndcg@10"] is not None else None) for s in summary],
        [("framework", "framework", 0), ("variant", "variant", 0), ("runs", "runs", 0),
         ("examples_per_s", "examples/s (median)", 1), ("compute_examples_per_s", "examples/s (compute)", 1),
         ("data_seconds_per_step", "data s/step", 3), ("tokens_per_step", "tokens/step", 0),
         ("real_share", "real-token share", 2), ("peak_rss_mb", "peak RSS MB", 0),
         ("peak_increase_mb", "peak over loaded MB", 0), ("ndcg", "nDCG@10", 2)])
    return ratios, summary, table


def _selected(args, variants):
    return [(f, v) for f, v in variants
            if f in args.frameworks and (f != ST or v not in ("default", "speed") or v in args.st_variants)
            and (f != EMBEDTRAIN or v not in ("default", "token_budget") or v in args.et_variants)]


NOTES = [
    "Each configuration ran in a fresh process; the first --warmup steps of each are not timed.",
    "examples_per_s: median over timed steps of batch / (step end - previous step end), data pipeline included; "
    "compute_examples_per_s: step begin to step end (forward, loss, backward, clipping, optimizer).",
    "embedtrain tokenizes once before the loop (not timed) and collates token ids per step; sentence-transformers "
    "tokenizes in its collator every step (inside examples_per_s, reported as data_seconds_per_step).",
    "embedtrain groups rows of similar length into batches (data.length_grouping, its default) unless "
    "--no-length-grouping; sentence-transformers batches are random. tokens.tokens_per_step and real_share show "
    "the padding each computed.",
    "embedtrain 'token_budget' embeds the rows of all three roles together in length-sorted chunks of at most "
    "--token-budget tokens (train.forward_token_budget); its tokens are counted over those chunks. The batches, "
    "and so the rows each step trains on, are the same as embedtrain 'default'.",
    "Both: same rows, lr, linear warmup ratio, weight decay, gradient clipping, seed, max length, scale 1/temperature; "
    "each framework keeps its own AdamW implementation ('optimizer' in each row: transformers' default is the "
    "fused kernel; embedtrain's build_optimizer uses torch.optim.AdamW's default, a per-tensor loop on CPU).",
    "nDCG@10: the saved model folder of each run scored by embedtrain's load_text_encoder + evaluate_retrieval "
    "(the same code for both frameworks).",
]


def parent_main(args) -> None:
    offline_env()
    if args.steps is None:
        args.steps = 3 if args.suite == "scale" else QUICKSTART["steps"]
    if args.suite == "throughput" and args.steps <= args.warmup:
        raise SystemExit(f"--steps ({args.steps}) must exceed --warmup ({args.warmup})")
    own_workdir = args.workdir is None
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="bench_train_"))
    workdir.mkdir(parents=True, exist_ok=True)
    configs: list[dict] = []
    if args.suite == "scale":
        total = args.warmup + args.steps
        for b in args.batch_sizes:
            for framework, variant in _selected(args, SCALE_VARIANTS):
                configs.append(_child_config(args, framework, variant, b, total, workdir, len(configs), args.quality))
    else:
        for repeat in range(args.repeats):
            for framework, variant in _selected(args, THROUGHPUT_VARIANTS):
                configs.append(_child_config(args, framework, variant, args.batch_size, args.steps, workdir,
                                             len(configs), not args.no_quality, repeat))
    machine = machine_info()
    started = time.time()
    results = [_run(args, cfg, i, len(configs)) for i, cfg in enumerate(configs)]
    if own_workdir and not args.keep:
        shutil.rmtree(workdir, ignore_errors=True)
    doc: dict[str, Any] = {
        "suite": args.suite,
        "config": {k: v for k, v in vars(args).items() if k not in ("child", "verbose")},
        "machine": machine,
        "load_average_after": machine_info()["load_average"],
        "seconds": time.time() - started,
        "notes": NOTES,
    }
    if args.suite == "scale":
        ratios, table = summarize_scale(args, results)
        doc.update(results=results, ratios=ratios)
    else:
        ratios, summary, table = summarize_throughput(args, results)
        doc.update(summary=summary, results=results, ratios=ratios)
    doc["failed"] = sum(1 for r in results if "error" in r)
    write_json(doc, args.output)
    eprint("\n" + table)
    if ratios:
        eprint("\n" + "\n".join(f"- {k}: {v:.3f}" if isinstance(v, float) else f"- {k}: {v}"
                                for group in ([ratios] if args.suite == "throughput" else ratios.values())
                                for k, v in group.items()))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--suite", choices=["scale", "throughput"], default="scale")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--model", default=QUICKSTART["model"],
                   help="model folder or pkg:// path (default: all-MiniLM-L6-v2)")
    p.add_argument("--data", default=QUICKSTART["data"], help="training pairs (.jsonl)")
    p.add_argument("--eval", default=QUICKSTART["eval"], help="BEIR folder for nDCG@10 after each throughput run")
    p.add_argument("--query-column", default=QUICKSTART["query_column"])
    p.add_argument("--positive-column", default=QUICKSTART["positive_column"])
    p.add_argument("--negative-column", default=QUICKSTART["negative_column"])
    p.add_argument("--max-rows", type=int, default=None, help="use only the first N training rows (default: all)")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[32, 128, 512, 1024], help="scale suite")
    p.add_argument("--batch-size", type=int, default=QUICKSTART["batch_size"], help="throughput suite")
    p.add_argument("--chunk", type=int, default=32,
                   help="GradCache chunk: train.gradient_cache_chunk_size and CMNRL mini_batch_size")
    p.add_argument("--steps", type=int, default=None,
                   help="scale: timed steps after --warmup (default 3); throughput: optimizer steps in all, "
                        "the first --warmup untimed (default 100, the quickstart)")
    p.add_argument("--warmup", type=int, default=1, help="steps left out of the timing")
    p.add_argument("--repeats", type=int, default=3, help="throughput: interleaved runs per variant")
    p.add_argument("--frameworks", nargs="+", default=[EMBEDTRAIN, ST], choices=[EMBEDTRAIN, ST])
    p.add_argument("--lr", type=float, default=QUICKSTART["lr"])
    p.add_argument("--warmup-ratio", type=float, default=QUICKSTART["warmup_ratio"])
    p.add_argument("--weight-decay", type=float, default=QUICKSTART["weight_decay"])
    p.add_argument("--max-grad-norm", type=float, default=QUICKSTART["max_grad_norm"])
    p.add_argument("--temperature", type=float, default=QUICKSTART["temperature"], help="ST scale = 1/temperature")
    p.add_argument("--max-length", type=int, default=QUICKSTART["max_length"])
    p.add_argument("--seed", type=int, default=QUICKSTART["seed"])
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--no-length-grouping", action="store_true", help="embedtrain: data.length_grouping=false")
    p.add_argument("--et-variants", nargs="+", choices=["default", "token_budget"], default=["default", "token_budget"],
                   help="throughput: which embedtrain runs to make (token_budget: train.forward_token_budget)")
    p.add_argument("--token-budget", type=int, default=1024,
                   help="throughput, embedtrain 'token_budget': train.forward_token_budget")
    p.add_argument("--st-variants", nargs="+", choices=["default", "speed"], default=["default", "speed"],
                   help="throughput: which sentence-transformers runs to make")
    p.add_argument("--st-speed-workers", type=int, default=0,
                   help="throughput, sentence-transformers 'speed': dataloader_num_workers")
    p.add_argument("--no-quality", action="store_true", help="throughput: skip nDCG@10")
    p.add_argument("--quality", action="store_true", help="scale: also measure nDCG@10")
    p.add_argument("--eval-batch-size", type=int, default=128)
    p.add_argument("--timeout", type=float, default=3 * 3600, help="seconds per configuration")
    p.add_argument("--workdir", default=None, help="run folders (default: a temporary folder, removed)")
    p.add_argument("--keep", action="store_true", help="keep run folders and saved models")
    p.add_argument("--verbose", action="store_true", help="show the children's logs")
    p.add_argument("--output", default=None, help="also write the JSON document here")
    args = p.parse_args(argv)
    if args.warmup < 0:
        p.error("--warmup must be 0 or more")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.child:
        child_main(json.loads(args.child))
    else:
        parent_main(args)


if __name__ == "__main__":
    main()
