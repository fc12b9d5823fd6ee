"""``embedtrain merge RECIPE [key=value ...] [--overwrite]``: merge task models and compare them.

Reads a merge recipe (:mod:`embedtrain.config.merge`), loads the base and the task models, runs
every merge method (searching Self Positioning's coefficients on the probe data), evaluates the
base, each task model and each merge on the recipe's retrieval tasks, and writes:

- ``<output.dir>/models/<label>/``: each merged model as a sentence-transformers folder;
- ``report.json``: every metric of every model and task, means, and the Self Positioning
  coefficients with their search history;
- ``report.md``: the table of ``eval.metric`` (x100) and the coefficients;
- ``merge_recipe.yaml``: the resolved recipe.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
import yaml

from embedtrain.config import (
    METRICS,
    MergeRecipe,
    dataset_name,
    given_params,
    load_merge_recipe,
    method_label,
    resolve_path,
    searches,
    task_model_name,
    task_name,
    to_dict,
)
from embedtrain.data import read_pairs
from embedtrain.errors import EmbedtrainError, print_error
from embedtrain.eval.retrieval import evaluate_retrieval, load_beir
from embedtrain.losses import InfoNCELoss
from embedtrain.merge import MERGE_METHODS, check_mergeable, method_params
from embedtrain.models import load_text_encoder
from embedtrain.train.self_positioning import build_probe_batches, search_self_positioning


def merge_methods() -> dict[str, list[str]]:
    """Each registered merge method's name and the parameters it takes (the recipe checks need them)."""
    return {name: method_params(name) for name in MERGE_METHODS.names()}


@dataclass
class MergeReport:
    """What ``embedtrain merge`` produced; metrics on a 0-1 scale."""

    output_dir: str
    metric: str
    tasks: list[str]
    models: list[dict] = field(default_factory=list)
    """One entry per row: name, kind (base | task | merge), method, params, path, scores {task: {metric}}, mean."""
    self_positioning: dict[str, dict] = field(default_factory=dict)
    """Per Self Positioning label: alphas {model: a}, lambda, probe losses, search settings, history."""
    seconds: float = 0.0


def _check_output_dir(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise EmbedtrainError(f"output.dir: {out} is a file; choose a folder")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise EmbedtrainError(
            f"output.dir: {out} already exists and is not empty; choose another output.dir or pass --overwrite to replace it"
        )


def _evaluate(encoder, tasks, batch_size: int) -> tuple[dict, dict]:
    scores = {}
    for cfg, data in tasks:
        scores[data.name] = evaluate_retrieval(encoder, data, cfg.query_prompt or None, cfg.document_prompt or None,
                                               batch_size=batch_size)
    mean = {m: sum(s[m] for s in scores.values()) / len(scores) for m in METRICS} if scores else {}
    return scores, mean


def _state_of(encoder) -> dict[str, torch.Tensor]:
    """A CPU copy of the backbone's weights (the merges run on the CPU, next to the task models)."""
    return {k: v.detach().to("cpu", copy=True) for k, v in encoder.backbone.state_dict().items()}


def run_merge(recipe: MergeRecipe, log: Callable[[str], None] = print) -> MergeReport:
    """Run every merge of ``recipe`` and write the report (see module docstring)."""
    t0 = time.time()
    r = recipe
    out = Path(r.output.dir)
    _check_output_dir(out, r.output.overwrite)
    if r.search.torch_threads:
        torch.set_num_threads(r.search.torch_threads)

    # -- inputs: data first (cheap, and its errors should come before the models load) ----------
    tasks = [(t, load_beir(resolve_path(t.path), task_name(t))) for t in r.eval.tasks]
    probe_sets = []
    if any(searches(m) for m in r.methods):
        probe_sets = [
            read_pairs(ds.path, f"probe.datasets[{i}]", dataset_name(ds), ds.query_column, ds.positive_column,
                       ds.negative_columns, ds.query_prompt, ds.document_prompt, ds.weight, ds.split, ds.max_rows)
            for i, ds in enumerate(r.probe.datasets)
        ]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    log(f"loading the base {r.base.name_or_path}")
    encoder = load_text_encoder(r.base.name_or_path, max_length=r.base.max_length).to(device)
    base_state = _state_of(encoder)  # a copy: the encoder's weights are replaced by each merge below
    names = [task_model_name(m) for m in r.models]
    task_encoders = []
    for name, m in zip(names, r.models):
        log(f"loading task model {name} from {m.path}")
        task_encoders.append(load_text_encoder(m.path, max_length=r.base.max_length))
    task_states = [{k: v.detach() for k, v in e.backbone.state_dict().items()} for e in task_encoders]
    check_mergeable(base_state, task_states, names)
    probe_batches = (build_probe_batches(probe_sets, encoder.tokenizer, encoder.max_length_for, r.probe.batch_size,
                                         r.probe.seed) if probe_sets else [])

    # -- output folder: only now, after every input check ------------------------------------
    if out.exists() and r.output.overwrite:
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "merge_recipe.yaml").write_text(yaml.safe_dump(to_dict(r), sort_keys=False), encoding="utf-8")
    report = MergeReport(str(out), r.eval.metric, [data.name for _, data in tasks])

    def write_report() -> None:
        report.seconds = time.time() - t0
        (out / "report.json").write_text(json.dumps(asdict(report), indent=2), encoding="utf-8")
        (out / "report.md").write_text(render_markdown(report), encoding="utf-8")

    def add_row(name: str, kind: str, scores: dict, mean: dict, **extra) -> None:
        report.models.append({"name": name, "kind": kind, **extra, "scores": scores, "mean": mean})
        if mean:
            log(f"{name}: mean {r.eval.metric} {100 * mean[r.eval.metric]:.2f} "
                f"({', '.join(f'{t} {100 * s[r.eval.metric]:.2f}' for t, s in scores.items())})")
        write_report()  # after every row, so an interrupted run keeps what it measured

    # -- the models being merged -------------------------------------------------------------
    if tasks:
        log(f"evaluating {r.base.name}")
    add_row(r.base.name, "base", *_evaluate(encoder, tasks, r.eval.batch_size), path=r.base.name_or_path)
    for name, m, task_encoder in zip(names, r.models, task_encoders):
        if tasks:
            log(f"evaluating {name}")
        add_row(name, "task", *_evaluate(task_encoder.to(device), tasks, r.eval.batch_size), path=m.path)
        task_encoder.to("cpu")
    del task_encoders

    # -- the merges --------------------------------------------------------------------------
    for m in r.methods:
        label = method_label(m)
        params = given_params(m.params)
        started = time.time()
        if searches(m):
            s = r.search
            encoder.backbone.load_state_dict(base_state)  # the search starts from θ0
            found = search_self_positioning(
                encoder, task_states, probe_batches, steps=s.steps, lr=s.lr, mu=s.mu, optimizer=s.optimizer,
                momentum=s.momentum, init_lambda=s.init_lambda, iterations=params.get("iterations", 10),
                chunk_size=s.chunk_size, loss_fn=InfoNCELoss(s.temperature, gather_across_processes=False),
                max_grad_norm=s.max_grad_norm, names=names, log=log, log_every=s.log_every,
            )
            params.update(alphas=found.alphas, lam=found.lam)
            report.self_positioning[label] = {
                "alphas": dict(zip(names, found.alphas)),
                "lambda": found.lam,
                "probe_loss_start": found.probe_loss_start,
                "probe_loss_end": found.probe_loss_end,
                "search": asdict(s),
                "probe_rows": sum(len(ds) for ds in probe_sets),
                "seconds": found.seconds,
                "history": found.history,
            }
        elif m.name == "self_positioning":
            total = sum(params["alphas"])  # the merge normalises them
            report.self_positioning[label] = {"alphas": {n: a / total for n, a in zip(names, params["alphas"])},
                                              "lambda": params["lam"], "searched": False}
        log(f"merging: {label} ({m.name}{', ' if params else ''}"
            f"{', '.join(f'{k}={_short(v)}' for k, v in params.items())})")
        merged = MERGE_METHODS.get(m.name)(base_state, task_states, **params)
        encoder.backbone.load_state_dict(merged)
        del merged
        path = None
        if r.output.save_models:
            path = out / "models" / label
            encoder.save(path)
            path = str(path.relative_to(out))
        merge_seconds = time.time() - started
        if tasks:
            log(f"evaluating {label}")
        scores, mean = _evaluate(encoder, tasks, r.eval.batch_size)
        add_row(label, "merge", scores, mean, method=m.name, params=params, path=path, merge_seconds=merge_seconds)

    write_report()
    return report


def _short(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, list):
        return "[" + ", ".join(_short(v) for v in value) + "]"
    return str(value)


def render_table(report: MergeReport | dict) -> str:
    """The Markdown table of ``report.metric`` (x100): one row per model, one column per task, and the mean."""
    rep = asdict(report) if isinstance(report, MergeReport) else report
    metric, tasks = rep["metric"], rep["tasks"]
    lines = [
        "| model | kind | " + " | ".join(tasks) + (" | mean |" if tasks else ""),
        "|---|---|" + "---|" * (len(tasks) + (1 if tasks else 0)),
    ]
    for row in rep["models"]:
        kind = row["kind"] if row["kind"] != "merge" else f"merge ({row['method']})"
        cells = [f"{100 * row['scores'][t][metric]:.2f}" for t in tasks]
        cells += [f"{100 * row['mean'][metric]:.2f}"] if tasks else []
        lines.append(f"| {row['name']} | {kind} | " + " | ".join(cells) + (" |" if cells else ""))
    return "\n".join(lines) + "\n"


def render_markdown(report: MergeReport | dict) -> str:
    rep = asdict(report) if isinstance(report, MergeReport) else report
    parts = [f"# Model merging: {rep['metric']} (x100)\n\n", render_table(rep)]
    for label, sp in rep["self_positioning"].items():
        alphas = ", ".join(f"{name} {a:.3f}" for name, a in sp["alphas"].items())
        parts.append(f"\n## Self Positioning coefficients: {label}\n")
        parts.append(f"- alphas: {alphas}\n- lambda: {sp['lambda']:.4f}\n")
        if "probe_loss_start" in sp:
            s = sp["search"]
            parts.append(
                f"- probe loss: {sp['probe_loss_start']:.4f} at equal alphas and lambda {s['init_lambda']} -> "
                f"{sp['probe_loss_end']:.4f} after {s['steps']} {s['optimizer']} steps (lr {s['lr']}, mu {s['mu']}) "
                f"on {sp['probe_rows']} probe rows, {sp['seconds']:.0f} s\n"
            )
        else:
            parts.append("- given in the recipe (no search)\n")
    parts.append(f"\nTotal time: {rep['seconds'] / 60:.1f} min.\n")
    return "".join(parts)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="embedtrain merge", description="Merge task models and compare them.")
    parser.add_argument("recipe", help="YAML merge recipe (recipes/merge/*.yaml)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides such as search.steps=20 output.dir=runs/x")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output.dir")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Command-line entry: every recipe problem on its own line and exit status 2 for user errors."""
    args = build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    overrides = list(args.overrides) + (["output.overwrite=true"] if args.overwrite else [])
    try:
        recipe = load_merge_recipe(args.recipe, overrides, methods=merge_methods())
        import transformers

        transformers.utils.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
        report = run_merge(recipe)
    except EmbedtrainError as err:
        return print_error(err)
    print(render_table(report), end="")
    print(f"report: {Path(report.output_dir) / 'report.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
