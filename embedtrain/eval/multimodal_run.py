"""``embedtrain eval`` for multimodal model folders (CLIP in open_clip's layout, VLM2Vec) on local
image-text tasks: BEIR folders whose rows carry images, scored with :func:`evaluate_retrieval`
(Recall@1/5/10, nDCG@10 and MRR@10 in both directions). Writes ``<output>/multimodal_results.json``
and ``<output>/summary.md``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from embedtrain.errors import EmbedtrainError

METRICS = ("recall@1", "recall@5", "recall@10", "ndcg@10", "mrr@10")


def model_kind(spec: str) -> str | None:
    """'clip' or 'vlm2vec' for a local multimodal model folder, else None (text models, Hub ids).
    A folder whose embedtrain.json is damaged is an error, not a text model."""
    from embedtrain.config import looks_local, resolve_path
    from embedtrain.models.folders import find_model_kind

    if not looks_local(spec):
        return None
    kind = find_model_kind(resolve_path(spec))
    return kind if kind in ("clip", "vlm2vec") else None


def load_multimodal_encoder(spec: str):
    if model_kind(spec) is not None:  # a saved folder: the one loader
        from embedtrain.models.loading import load_model

        return load_model(spec)
    from embedtrain.models.vlm import load_vlm_encoder

    return load_vlm_encoder(spec, finetune="full")


def run_multimodal(args: argparse.Namespace) -> int:
    """Evaluate ``args.model`` on ``args.local_task`` folders; registry tasks are text-only here."""
    from embedtrain.config import EvalTaskConfig, task_name
    from embedtrain.eval.retrieval import evaluate_retrieval, load_beir

    if args.tasks or args.benchmark or args.task_types or args.compare:
        raise EmbedtrainError(f"--model {args.model}: a multimodal model is evaluated on --local-task folders only")
    if not args.local_task:
        raise EmbedtrainError("nothing to evaluate; give --local-task folders (BEIR layout, rows may carry an image)")
    tasks = [load_beir(folder, task_name(EvalTaskConfig(path=folder))) for folder in args.local_task]
    encoder = load_multimodal_encoder(args.model)
    results = {}
    for data in tasks:
        templates = encoder.templates  # the model's own (those of its first training dataset)
        results[data.name] = evaluate_retrieval(encoder, data, templates.get("query"), templates.get("document"),
                                                batch_size=args.batch_size, show_progress=True)
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    (output / "multimodal_results.json").write_text(json.dumps({"model": args.model, "results": results}, indent=2),
                                                    encoding="utf-8")
    lines = ["| task | direction | " + " | ".join(METRICS) + " |", "|---|---|" + "---|" * len(METRICS)]
    for task, scores in results.items():
        for direction in sorted({k.split("/")[0] for k in scores if "/" in k}):
            cells = [f"{100 * scores[f'{direction}/{m}']:.2f}" if f"{direction}/{m}" in scores else "" for m in METRICS]
            lines.append(f"| {task} | {direction} | " + " | ".join(cells) + " |")
        if not any("/" in k for k in scores):
            lines.append(f"| {task} | | " + " | ".join(f"{100 * scores[m]:.2f}" if m in scores else "" for m in METRICS)
                         + " |")
    table = "\n".join(lines)
    (output / "summary.md").write_text(table + "\n", encoding="utf-8")
    print(table)
    return 0
