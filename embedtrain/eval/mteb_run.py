"""``embedtrain eval`` / ``scripts/evaluate_mteb.py``: evaluate a model with mteb.

Tasks come from mteb's registry (``--tasks``, ``--benchmark``, ``--task-types``, filtered by
``--languages``) and from local BEIR folders (``--local-task``). Results are written in mteb's own
format through its ``ResultCache`` rooted at ``--output`` (``results/<model>/<revision>/<task>.json``),
so a rerun reuses them unless ``--overwrite`` is given or the task's data changed. The run ends with
``summary.md``/``summary.csv`` (scores x 100), ``results.json`` (every score, the averages per task type, and
the instructions each model was evaluated with) and, with ``--compare``, ``comparison.md``/``.csv``.

``--instructions FILE`` gives each task's queries its own instruction (``embedtrain.eval.instructions``; a decoder
folder defaults to its NV-Embed table); ``--mmeb DIR`` scores a CLIP or VLM2Vec folder on local MMEB data
(``embedtrain.eval.mmeb``) and writes the same files.

Exit status: 0 when every task succeeded, 1 when some task failed (each failure is reported on one
line and the other tasks still run), 2 for a user error (``error: <message>`` on stderr).
"""

from __future__ import annotations

import argparse
import csv
import math
import sys
import typing
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from embedtrain.errors import EmbedtrainError

if TYPE_CHECKING:
    from mteb import AbsTask, ResultCache, TaskResult

    from embedtrain.eval.instructions import InstructionTable
    from embedtrain.eval.mteb_adapter import MtebEncoder


@dataclass
class Outcome:
    """One model on one task: a score (0-1, mean over splits and subsets) or an error line."""

    model: str
    revision: str
    task: str
    task_type: str
    metric: str
    score: float | None = None
    error: str | None = None


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface shared by ``embedtrain eval`` and ``scripts/evaluate_mteb.py``."""
    parser = argparse.ArgumentParser(
        prog="embedtrain eval",
        description="Evaluate an embedding model with mteb on registry tasks and local BEIR folders.",
    )
    parser.add_argument("--model", required=True, metavar="PATH_OR_HUB_ID", help="model folder, pkg://module/dir or Hub id")
    parser.add_argument("--tasks", nargs="+", default=[], metavar="NAME", help="mteb task names, e.g. SciFact NFCorpus")
    parser.add_argument("--benchmark", metavar="NAME", help='an mteb benchmark, e.g. "MTEB(eng, v2)"')
    parser.add_argument("--task-types", nargs="+", default=[], metavar="TYPE", help="all mteb tasks of these types, e.g. Retrieval STS")
    parser.add_argument("--local-task", nargs="+", default=[], metavar="FOLDER", help="BEIR folders (corpus.jsonl, queries.jsonl, qrels.tsv)")
    parser.add_argument("--languages", nargs="+", metavar="LANG", help="keep these languages of registry tasks (not local ones), e.g. eng or eng-Latn")
    parser.add_argument("--output", required=True, metavar="DIR", help="results folder (mteb cache layout) and summary files")
    parser.add_argument("--compare", metavar="OTHER_MODEL", help="also evaluate this model on the same tasks and write a comparison")
    parser.add_argument("--batch-size", type=int, default=128, help="texts per forward pass (default: 128)")
    parser.add_argument("--overwrite", action="store_true", help="rerun tasks even if results are cached")
    parser.add_argument("--instructions", metavar="FILE", help="YAML/JSON file mapping task names to query "
                        "instructions; 'nv-embed' for NV-Embed's MTEB table (the default for decoder folders), "
                        "'none' for the model's saved prompts")
    parser.add_argument("--mmeb", metavar="DIR", help="score a CLIP or VLM2Vec model on local MMEB data (one folder "
                        "per task, as in TIGER-Lab/MMEB-eval): precision@1 per task and category")
    parser.add_argument("--mmeb-images", metavar="DIR", help="folder the MMEB rows' image paths are relative to "
                        "(default: --mmeb)")
    parser.add_argument("--mmeb-tasks", nargs="+", default=[], metavar="NAME",
                        help="MMEB task folders or categories (classification, vqa, retrieval, grounding); "
                        "default: all")
    parser.add_argument("--compact", action="store_true", help="with --local-task: nDCG@10, Recall@10, bytes per "
                        "document and queries/s at every prefix and precision, on faiss indexes (no mteb)")
    parser.add_argument("--dims", nargs="+", type=int, default=None, metavar="D",
                        help="--compact: prefixes to evaluate (default: those the model was trained for, else its full size)")
    parser.add_argument("--precisions", nargs="+", default=None, metavar="P",
                        help="--compact: float32, int8, binary (default: the model's trained ones plus float32, else all)")
    parser.add_argument("--rescore-top-k", type=int, default=None, metavar="K",
                        help="--compact: documents binary search keeps for float rescoring (default: the model's, else 40)")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the evaluation; returns the exit status (0 ok, 1 some task failed, 2 user error)."""
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except EmbedtrainError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


def run(args: argparse.Namespace) -> int:
    """Evaluate ``args.model`` (and ``args.compare``) on the selected tasks and write the summaries."""
    if args.mmeb:
        from embedtrain.eval.mmeb import run_mmeb

        return run_mmeb(args)
    if args.compact:
        from embedtrain.eval.compact import run_compact

        return run_compact(args)
    if args.mmeb_images or args.mmeb_tasks:
        raise EmbedtrainError("--mmeb-images and --mmeb-tasks go with --mmeb DIR")
    if not (args.tasks or args.benchmark or args.task_types or args.local_task):
        raise EmbedtrainError("nothing to evaluate; give --tasks, --benchmark, --task-types or --local-task")
    if args.batch_size < 1:
        raise EmbedtrainError(f"--batch-size: {args.batch_size} must be at least 1")
    from embedtrain.eval.multimodal_run import model_kind, run_multimodal

    if model_kind(args.model):  # CLIP / VLM2Vec folders: image-text tasks through evaluate_retrieval
        if args.instructions:
            raise EmbedtrainError("--instructions: applies to text models; a multimodal model uses its saved templates")
        return run_multimodal(args)
    import mteb

    from embedtrain.eval.instructions import prompts_from_table
    from embedtrain.eval.mteb_adapter import MtebEncoder

    for spec in [args.model] + ([args.compare] if args.compare else []):
        check_model_spec(spec)
    tasks = select_tasks(args)
    output = Path(args.output)
    try:
        cache = mteb.ResultCache(output)
    except OSError as err:
        raise EmbedtrainError(f"--output {output}: cannot be created ({err.strerror or err})") from None

    specs = [args.model] + ([args.compare] if args.compare else [])
    tables = {spec: instruction_table(args.instructions, spec, tasks) for spec in specs}  # every check before loading
    outcomes: list[Outcome] = []
    labels: list[str] = []
    runs: list[dict] = []
    for spec in specs:
        table = tables[spec]
        prompts, experiment = None, None
        if table is not None:
            prompts = prompts_from_table(table, encoded_task_names(tasks))
            report_instructions(table, len(prompts))
            experiment = table.experiment_name()  # results cached per table, whichever of its tasks run
        model = MtebEncoder.from_pretrained(spec, task_prompts=prompts, experiment=experiment)
        meta = model.mteb_model_meta
        label = str(meta.name)
        if label in labels:
            label = f"{label}@{meta.revision}"
        labels.append(label)
        runs.append({"model": label, "revision": str(meta.revision), "source": spec,
                     "instructions": table.record() if table is not None else None})
        outcomes += evaluate_model(model, label, tasks, cache, batch_size=args.batch_size, overwrite=args.overwrite)
        del model  # free the first model before the second one is loaded

    write_summary(outcomes, output)
    write_results(output, runs, outcomes)
    table = summary_markdown(outcomes)
    if args.compare:
        write_comparison(outcomes, labels, output)
        table = comparison_markdown(outcomes, labels)
    print(table)
    failed = [o for o in outcomes if o.error is not None]
    if failed:
        print(f"{len(failed)} of {len(outcomes)} evaluations failed", file=sys.stderr)
    return 1 if failed else 0


def check_model_spec(spec: str) -> None:
    """Fail early (before any evaluation) on a local model path that does not exist."""
    from embedtrain.config import looks_local, resolve_path

    if looks_local(spec) and not Path(resolve_path(spec)).is_dir():
        raise EmbedtrainError(f"model {spec}: no such folder; give a model folder, pkg://module/dir or a Hub id")


# -- task selection ---------------------------------------------------------------------------
def _lookup_error(kind: str, err: KeyError) -> EmbedtrainError:
    message = str(err.args[0]) if err.args else str(err)
    return EmbedtrainError(f"{kind}: {message.removeprefix('KeyError: ')}")


def select_tasks(args: argparse.Namespace) -> list[AbsTask]:
    """Registry tasks (by name, benchmark, type; filtered by language) then local folders, deduplicated."""
    import mteb
    from mteb.abstasks.task_metadata import TaskType

    from embedtrain.errors import did_you_mean
    from embedtrain.eval.local_tasks import make_local_retrieval_task

    languages = args.languages or None
    selected: list[AbsTask] = []
    for name in args.tasks:
        try:
            selected.append(mteb.get_task(name, languages=languages))
        except KeyError as err:
            raise _lookup_error("--tasks", err) from None
    if args.benchmark:
        try:
            benchmark = mteb.get_benchmark(args.benchmark)
        except KeyError as err:
            raise _lookup_error("--benchmark", err) from None
        selected += mteb.filter_tasks(benchmark.tasks, languages=languages) if languages else list(benchmark.tasks)
    if args.task_types:
        known = typing.get_args(TaskType)
        for task_type in args.task_types:
            if task_type not in known:
                raise EmbedtrainError(f"--task-types: unknown type '{task_type}'{did_you_mean(task_type, known)}")
        selected += mteb.get_tasks(task_types=args.task_types, languages=languages)
    registry_names = {t.metadata.name for t in selected}
    for folder in args.local_task:
        task = make_local_retrieval_task(folder)
        name = task.metadata.name
        if name in registry_names or _is_registry_task(name):
            raise EmbedtrainError(
                f"--local-task {folder}: its name '{name}' is an mteb task; rename the folder so results do not mix"
            )
        selected.append(task)

    unique: dict[str, AbsTask] = {}
    for task in selected:
        name = task.metadata.name
        if name in unique and not isinstance(task, type(unique[name])):
            raise EmbedtrainError(f"two tasks are named '{name}'; rename one of the local folders")
        unique.setdefault(name, task)
    return list(unique.values())


def _is_registry_task(name: str) -> bool:
    import mteb

    try:
        mteb.get_task(name)
    except KeyError:
        return False
    return True


# -- instructions ------------------------------------------------------------------------------
def encoded_task_names(tasks: Sequence[AbsTask]) -> dict[str, list[str]]:
    """Each task's name -> the names mteb encodes it under (an aggregate task: its sub-tasks' names)."""
    names = {}
    for task in tasks:
        subtasks = getattr(task.metadata, "tasks", None)
        names[task.metadata.name] = [t.metadata.name for t in subtasks] if subtasks else [task.metadata.name]
    return names


def instruction_table(spec: str | None, model: str, tasks: Sequence[AbsTask]) -> InstructionTable | None:
    """The instruction table for ``model`` (``embedtrain.eval.instructions.resolve_instructions``), its task
    names checked: a name that is neither an mteb task nor an evaluated task is a one-line error."""
    from embedtrain.eval.instructions import resolve_instructions

    table = resolve_instructions(spec, model)
    if table is None:
        return None
    evaluated = {n for task, subtasks in encoded_task_names(tasks).items() for n in (task, *subtasks)}
    unknown = [name for name in table.instructions if name not in evaluated and not _is_registry_task(name)]
    if unknown:
        from embedtrain.errors import did_you_mean

        hint = did_you_mean(unknown[0], evaluated) if len(unknown) == 1 else ""
        raise EmbedtrainError(
            f"--instructions {table.source}: unknown task name(s) {', '.join(unknown)}{hint}; use mteb task names "
            "or the names of the --local-task folders"
        )
    return table


def report_instructions(table: InstructionTable, covered: int) -> None:
    """One line on the table in use, one on the tasks it leaves to the saved prompts (also in results.json)."""
    print(f"instructions: {table.source} ({covered} evaluated task(s) get their instruction)", file=sys.stderr)
    if table.tasks_without_instruction:
        print(f"instructions: no instruction for {', '.join(table.tasks_without_instruction)}; "
              "they use the model's saved prompts", file=sys.stderr)


# -- evaluation -------------------------------------------------------------------------------
def _cached_result_is_stale(cache: ResultCache, task: AbsTask, model: MtebEncoder) -> bool:
    """True when the cached result was computed on other data (mteb would reuse it anyway)."""
    try:
        cached = cache.load_task_result(task.metadata.name, model.mteb_model_meta)
    except (OSError, ValueError):
        return True
    return cached is not None and cached.dataset_revision != task.metadata.revision


def task_score(result: TaskResult, task: AbsTask) -> float:
    """Mean main score over the task's evaluated splits and subsets (0-1 scale)."""
    values = [
        float(entry["main_score"])
        for split in task.eval_splits
        for entry in result.scores.get(split, [])
        if entry.get("hf_subset") in task.hf_subsets
    ]
    if not values:
        raise ValueError(f"no scores for splits {', '.join(task.eval_splits)} in the result")
    return sum(values) / len(values)


def failure_line(err: BaseException) -> str:
    """One line describing why a task failed."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    message = lines[0] if lines else ""
    if isinstance(err, EmbedtrainError):
        return message
    text = f"{type(err).__name__}: {message}" if message else type(err).__name__
    if isinstance(err, ConnectionError):
        text += "; its data is not in the local Hugging Face cache, run once with the Hub reachable"
    return text


def evaluate_model(
    model: MtebEncoder,
    label: str,
    tasks: Sequence[AbsTask],
    cache: ResultCache,
    *,
    batch_size: int,
    overwrite: bool,
) -> list[Outcome]:
    """Run mteb on each task in turn; a failure is printed on one line and the next task runs."""
    import mteb
    from tqdm.auto import tqdm

    meta = model.mteb_model_meta
    outcomes = []
    progress = tqdm(tasks, desc=label, unit="task")
    for task in progress:
        md = task.metadata
        progress.set_postfix_str(md.name)
        outcome = Outcome(label, str(meta.revision), md.name, str(md.type), md.main_score)
        rerun = overwrite or _cached_result_is_stale(cache, task, model)
        try:
            result = mteb.evaluate(
                model,
                task,
                cache=cache,
                overwrite_strategy="always" if rerun else "only-missing",
                encode_kwargs={"batch_size": batch_size, "show_progress_bar": True},
                co2_tracker=False,
                prediction_folder=None,
                show_progress_bar=True,
            )
            if not result.task_results:  # mteb reports some failures instead of raising them
                raise EmbedtrainError("; ".join(e.exception for e in result.exceptions or []) or "mteb returned no result")
            outcome.score = task_score(result.task_results[0], task)
        except Exception as err:  # noqa: BLE001 - one failing task must not stop the others
            outcome.error = failure_line(err)
            tqdm.write(f"FAILED {md.name} ({label}): {outcome.error}", file=sys.stderr)
        outcomes.append(outcome)
    return outcomes


# -- summaries --------------------------------------------------------------------------------
def percent(score: float | None) -> str:
    """A 0-1 score as x 100 with 2 decimals ('' when missing)."""
    return "" if score is None or math.isnan(score) else f"{score * 100:.2f}"


def _markdown(header: list[str], rows: list[list[str]]) -> str:
    """A markdown table with padded columns."""
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"
    return "\n".join([line(header), "| " + " | ".join("-" * w for w in widths) + " |", *map(line, rows)])


def _write_csv(path: Path, header: list[str], rows: list[list[str]]) -> None:
    with path.open("w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)


SUMMARY_HEADER = ["model", "revision", "task", "type", "metric", "score"]


def summary_rows(outcomes: Sequence[Outcome]) -> list[list[str]]:
    """One row per model and task; the score is x 100 with 2 decimals, empty when the task failed."""
    return [[o.model, o.revision, o.task, o.task_type, o.metric, percent(o.score)] for o in outcomes]


def summary_markdown(outcomes: Sequence[Outcome]) -> str:
    """The summary table, with failed tasks listed under it."""
    rows = [[*r[:-1], r[-1] or "failed"] for r in summary_rows(outcomes)]
    text = _markdown(SUMMARY_HEADER, rows)
    failures = [f"- {o.task} ({o.model}): {o.error}" for o in outcomes if o.error is not None]
    return text + ("\n\nFailed:\n" + "\n".join(failures) if failures else "")


def write_summary(outcomes: Sequence[Outcome], output: Path) -> None:
    """``summary.md`` and ``summary.csv`` in ``output``."""
    (output / "summary.md").write_text(summary_markdown(outcomes) + "\n", encoding="utf-8")
    _write_csv(output / "summary.csv", SUMMARY_HEADER, summary_rows(outcomes))


def averages(outcomes: Sequence[Outcome]) -> list[dict]:
    """Mean score per model and task type (an MMEB category for MMEB tasks), then over all tasks; failed tasks
    are left out of the means and counted."""
    rows = []
    for model in dict.fromkeys(o.model for o in outcomes):
        mine = [o for o in outcomes if o.model == model]
        groups = {t: [o for o in mine if o.task_type == t] for t in dict.fromkeys(o.task_type for o in mine)}
        for group, members in [*groups.items(), ("all", mine)]:
            scores = [o.score for o in members if o.score is not None]
            rows.append({"model": model, "group": group, "score": sum(scores) / len(scores) if scores else None,
                         "tasks": len(scores), "failed": len(members) - len(scores)})
    return rows


def write_results(output: Path, runs: Sequence[dict], outcomes: Sequence[Outcome]) -> list[dict]:
    """``results.json``: ``models`` (label, revision, source, instructions, settings), ``results`` (one entry per
    model and task, scores 0-1) and ``averages`` (:func:`averages`); returns the averages."""
    import json
    from dataclasses import asdict

    means = averages(outcomes)
    data = {"models": list(runs), "results": [asdict(o) for o in outcomes], "averages": means}
    (output / "results.json").write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    return means


def comparison_rows(outcomes: Sequence[Outcome], labels: Sequence[str]) -> tuple[list[str], list[list[str]]]:
    """Header and rows: task, type, metric, one score column per model, delta (second - first, of the rounded scores)."""
    first, second = labels
    scores = {(o.model, o.task): o.score for o in outcomes}
    rows = []
    for o in outcomes:
        if o.model == first:
            a, b = percent(o.score), percent(scores.get((second, o.task)))
            delta = f"{float(b) - float(a):+.2f}" if a and b else ""
            rows.append([o.task, o.task_type, o.metric, a, b, delta])
    return ["task", "type", "metric", first, second, "delta"], rows


def comparison_markdown(outcomes: Sequence[Outcome], labels: Sequence[str]) -> str:
    """The side-by-side table (failed scores shown as 'failed')."""
    header, rows = comparison_rows(outcomes, labels)
    return _markdown(header, [[*r[:3], r[3] or "failed", r[4] or "failed", r[5]] for r in rows])


def write_comparison(outcomes: Sequence[Outcome], labels: Sequence[str], output: Path) -> None:
    """``comparison.md`` and ``comparison.csv`` in ``output``."""
    header, rows = comparison_rows(outcomes, labels)
    (output / "comparison.md").write_text(comparison_markdown(outcomes, labels) + "\n", encoding="utf-8")
    _write_csv(output / "comparison.csv", header, rows)
