"""Command line: embedtrain train | dml | plan | eval | merge | mine | push | info | report | inspect. Thin dispatch;
nothing imports this module."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Optional

from embedtrain.errors import EmbedtrainError, print_error


def _quiet_libraries() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def cmd_train(args: argparse.Namespace) -> int:
    """Train a recipe of any kind (text, clip, vlm2vec, dml)."""
    from embedtrain.config import load_recipe

    overrides = list(args.overrides) + (["output.overwrite=true"] if args.overwrite else [])
    recipe = load_recipe(args.recipe, overrides)  # every recipe problem, before anything loads
    _quiet_libraries()
    from embedtrain.train.loop import train

    result = train(recipe, resume=args.resume)
    from accelerate import PartialState

    if not PartialState().is_main_process:
        return 0
    if result.stopped:
        print(f"stopped at step {result.steps}; resume with: embedtrain train {args.recipe} --resume auto "
              + " ".join(args.overrides))
        return 0
    for line in result.summary:
        print(line)
    print(f"trained {result.steps} steps in {result.seconds / 60:.1f} min; model saved to {result.model_dir}")
    return 0


def cmd_eval(args: argparse.Namespace, rest: list[str]) -> int:
    _quiet_libraries()
    from embedtrain.eval.mteb_run import main

    return main(rest)


def cmd_merge(args: argparse.Namespace, rest: list[str]) -> int:
    _quiet_libraries()
    from embedtrain.train.merge_run import main

    return main(rest)


def cmd_plan(args: argparse.Namespace) -> int:
    """Plan a recipe: data accounted for, parameters, memory per device, FLOPs and time; no weights read."""
    import json

    from embedtrain.config import load_recipe
    from embedtrain.plan import PlanSettings, format_plan, make_plan

    recipe = load_recipe(args.recipe, list(args.overrides))
    _quiet_libraries()
    plan = make_plan(recipe, PlanSettings(
        accelerate_config=args.accelerate_config, devices=args.devices, device_memory_gb=args.device_memory,
        device_tflops=args.device_tflops, mfu=args.mfu, link_gbs=args.link_gbs, model_config=args.model_config,
        lengths=args.lengths), log=print)
    plan = {"recipe_path": args.recipe, "overrides": list(args.overrides), **plan}
    for line in format_plan(plan):
        print(line)
    if args.output:
        from pathlib import Path

        from embedtrain.train.checkpoint import atomic_write_text

        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(Path(args.output), json.dumps(plan, indent=2) + "\n")
        print(f"plan written to {args.output}")
    return 2 if plan["problems"] else 0


def cmd_mine(args: argparse.Namespace) -> int:
    _quiet_libraries()
    from embedtrain.models.instructions import instruction_prefix
    from embedtrain.train.mining import mine_hard_negatives

    if args.instruction and args.query_prompt:
        raise EmbedtrainError("--instruction and --query-prompt: give one of them")
    query_prompt = instruction_prefix(args.instruction) if args.instruction else args.query_prompt
    report = mine_hard_negatives(
        args.teacher, args.data, args.output, query_column=args.query_column, positive_column=args.positive_column,
        corpus=args.corpus, top_k=args.top_k, num_negatives=args.num_negatives, factor=args.factor,
        query_prompt=query_prompt, document_prompt=args.document_prompt, max_length=args.max_length,
        batch_size=args.batch_size, max_rows=args.max_rows, split=args.split, subset=args.subset, device=args.device,
        cache=args.cache, chunk_rows=args.chunk_rows, keep_cache=args.keep_cache,
    )
    if report is None:  # a process of a multi-process launch other than the main one
        return 0
    columns = ", ".join(f"negative_{i + 1}" for i in range(args.num_negatives))
    print(f"wrote {args.output}; read it in a recipe with: {{path: {args.output}, negative_columns: [{columns}]}}")
    return 0 if report.rows_out else 2


def cmd_push(args: argparse.Namespace) -> int:
    from embedtrain.hub.push import push_model

    url = push_model(args.model_dir, args.repo_id, private=args.private, revision=args.revision)
    print(f"pushed {args.model_dir} to {url}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from embedtrain.train.report import write_report

    path, plots = write_report(args.run_dir, args.output)
    print(f"wrote {path} ({len(plots)} plots: {', '.join(p['id'] for p in plots)})")
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    import json

    _quiet_libraries()
    from embedtrain.eval.diagnostics import format_diagnostics
    from embedtrain.eval.inspect_model import inspect_model

    values = inspect_model(args.model, args.texts, args.query_column, args.positive_column, args.batch_size,
                           args.max_rows)
    if args.json:
        print(json.dumps(values, indent=2))
    else:
        counted = f"{values['pairs']} pairs" if "pairs" in values else f"{values['rows']} texts"
        figures = {k: v for k, v in values.items() if k not in ("model", "texts", "pairs", "rows")}
        print(f"{args.model} on {counted} of {args.texts}: {format_diagnostics(figures)}")
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    import dataclasses
    import typing

    from embedtrain.config import RECIPE_TYPES, field_docs
    from embedtrain.losses import LOSSES
    from embedtrain.models.pooling import POOLERS

    kind = getattr(args, "kind", None) or "text"
    if kind == "text":
        print(f"losses: {', '.join(LOSSES.names())}")
        print(f"pooling: {', '.join(POOLERS.names())}")

    def show(title: str, cls: type, queue: list) -> None:
        docs, hints = field_docs(cls), typing.get_type_hints(cls)
        print(f"\n{title}:")
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
            nested = [t for t in (typing.get_args(hints[f.name]) or (hints[f.name],)) if dataclasses.is_dataclass(t)]
            if nested:  # a sub-section (or a list of entries, or an optional one), listed after this one
                each = "[*]" if typing.get_origin(hints[f.name]) is list else ""
                queue += [(f"{title}.{f.name}{each}", t) for t in nested]
                print(f"  {f.name}: see {title}.{f.name}{each}  # {docs.get(f.name, '')}")
            else:
                print(f"  {f.name} = {default!r}  # {docs.get(f.name, '')}")

    print(f"recipe kind: {kind} (kinds: {', '.join(RECIPE_TYPES)}; embedtrain info --kind KIND)")
    hints = typing.get_type_hints(RECIPE_TYPES[kind])
    for section in dataclasses.fields(RECIPE_TYPES[kind]):
        if section.name == "kind":
            continue
        queue: list = []
        show(section.name, hints[section.name], queue)
        while queue:
            title, cls = queue.pop(0)
            show(title, cls, queue)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="embedtrain", description="Train embedding models from YAML recipes.",
                                     epilog="--debug (any command): print the full traceback behind a one-line error")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, what in (("train", "train a recipe of any kind (text, clip, vlm2vec, dml): embedtrain train RECIPE"),
                       ("dml", "the same as train (kept for metric-learning recipes)")):
        p = sub.add_parser(name, help=what)
        p.add_argument("recipe", help="YAML recipe")
        p.add_argument("overrides", nargs="*", help="dotted overrides such as train.lr=1e-5 output.dir=runs/x")
        p.add_argument("--resume", nargs="?", const="auto", default=None,
                       help="continue from the newest complete checkpoint of output.dir ('auto') or from PATH")
        p.add_argument("--overwrite", action="store_true", help="replace an existing output.dir")
    p = sub.add_parser("plan", help="check a recipe before it runs: data, parameters, memory, FLOPs; no weights read")
    p.add_argument("recipe", help="YAML recipe")
    p.add_argument("overrides", nargs="*", help="dotted overrides such as data.batch_size=32")
    p.add_argument("--accelerate-config", default=None, help="the accelerate config the run will use (engine, processes)")
    p.add_argument("--devices", type=int, default=None, help="processes (default: the accelerate config's, else 1)")
    p.add_argument("--device-memory", type=float, default=None, help="GB per device: a peak above it is a problem")
    p.add_argument("--device-tflops", type=float, default=989.0, help="dense bf16 TFLOP/s per device (H100: 989)")
    p.add_argument("--mfu", type=float, default=0.4, help="share of the peak FLOP/s the run reaches (default 0.4)")
    p.add_argument("--link-gbs", type=float, default=450.0,
                   help="GB/s each device sends to the others (default 450: H100 NVLink 4 in one node, each way)")
    p.add_argument("--model-config", default=None, help="a local copy of the model's config.json (for a Hub model)")
    p.add_argument("--lengths", choices=["data", "max"], default="data",
                   help="token lengths: each text's own ('data'), or every text at the recipe's limit ('max')")
    p.add_argument("--output", default=None, help="also write the plan as JSON here")
    sub.add_parser("eval", help="evaluate on MTEB / local tasks (embedtrain eval --help)", add_help=False)
    sub.add_parser("merge", help="merge task models: embedtrain merge RECIPE [key=value ...] (--help)", add_help=False)
    p = sub.add_parser("mine", help="mine hard negatives with a teacher model (positive-aware, NV-Embed)")
    p.add_argument("--teacher", required=True, help="model that scores candidates: folder, pkg:// path or Hub id")
    p.add_argument("--data", required=True, help="(query, positive) rows: .jsonl/.json/.csv/.parquet or Hub dataset id")
    p.add_argument("--output", required=True, help="where to write the mined rows (.jsonl)")
    p.add_argument("--query-column", default="anchor")
    p.add_argument("--positive-column", default="positive")
    p.add_argument("--corpus", nargs="*", default=[], help="extra candidate texts: BEIR corpus.jsonl or .txt files")
    p.add_argument("--top-k", type=int, default=30, help="candidates per query, best first (default 30)")
    p.add_argument("--num-negatives", type=int, default=4, help="negatives kept per row, hardest first (default 4)")
    p.add_argument("--factor", type=float, default=0.95,
                   help="keep candidates scoring below factor x the positive's score (default 0.95)")
    p.add_argument("--instruction", default=None, help="task description: queries get 'Instruct: ...\nQuery: '")
    p.add_argument("--query-prompt", default="", help="text put before each query (instead of --instruction)")
    p.add_argument("--document-prompt", default="", help="text put before each corpus text")
    p.add_argument("--max-length", type=int, default=None, help="token limit of the teacher")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--max-rows", type=int, default=None)
    p.add_argument("--split", default="train", help="split of a Hub dataset")
    p.add_argument("--subset", default=None, help="configuration of a Hub dataset")
    p.add_argument("--device", default=None,
                   help="e.g. cuda (default: CPU); under torchrun / accelerate launch each process takes its own GPU")
    p.add_argument("--cache", default=None,
                   help="folder for the embeddings, written chunk by chunk; running the same command again after a "
                        "stop reads them back (default: OUTPUT.cache)")
    p.add_argument("--chunk-rows", type=int, default=16384, help="texts per cached chunk of embeddings (default 16384)")
    p.add_argument("--keep-cache", action="store_true", help="keep the embeddings once the output is written")
    p = sub.add_parser("push", help="upload a saved model folder to the Hugging Face Hub")
    p.add_argument("model_dir")
    p.add_argument("--repo-id", required=True, help="user/name")
    p.add_argument("--private", action="store_true", help="create the repository as private")
    p.add_argument("--revision", default=None, help="branch to push to (created if missing)")
    p = sub.add_parser("info", help="list losses, pooling modes and every recipe field with its default")
    p.add_argument("--kind", choices=["text", "clip", "vlm2vec", "dml"], default="text",
                   help="the recipe kind whose fields to list (default: text)")
    p = sub.add_parser("report", help="write RUN_DIR/report.html: curves, diagnostics, recipe and model card in one page")
    p.add_argument("run_dir", help="a training run's output.dir")
    p.add_argument("--output", default=None, help="where to write the page (default RUN_DIR/report.html)")
    p = sub.add_parser("inspect", help="label-free diagnostics (RankMe, alignment, uniformity) of a saved model")
    p.add_argument("model", help="a saved model folder (any kind that embeds text) or pkg:// path")
    p.add_argument("--texts", required=True,
                   help="a text file (one text per line) or a .jsonl of pairs (query/positive columns)")
    p.add_argument("--query-column", default="query", help="the .jsonl's query column (default query)")
    p.add_argument("--positive-column", default="positive", help="the .jsonl's positive column (default positive)")
    p.add_argument("--max-rows", type=int, default=None, help="use only the first N rows")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--json", action="store_true", help="print the figures as JSON")
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # --debug (anywhere on the line, or EMBEDTRAIN_DEBUG=1): the full traceback behind a one-line error
    debug = "--debug" in argv or os.environ.get("EMBEDTRAIN_DEBUG", "") not in ("", "0")
    argv = [a for a in argv if a != "--debug"]
    parser = build_parser()
    try:
        if argv and argv[0] == "eval":
            return cmd_eval(argparse.Namespace(), argv[1:])
        if argv and argv[0] == "merge":
            return cmd_merge(argparse.Namespace(), argv[1:])
        args = parser.parse_args(argv)
        commands = {"train": cmd_train, "dml": cmd_train, "plan": cmd_plan, "mine": cmd_mine, "push": cmd_push,
                    "info": cmd_info, "report": cmd_report, "inspect": cmd_inspect}
        return commands[args.command](args)
    except EmbedtrainError as err:
        if debug:
            import traceback

            traceback.print_exc()
        return print_error(err)


def run() -> None:
    """The process entry (the ``embedtrain`` command and ``python -m embedtrain``): :func:`main`, then
    :func:`embedtrain.process.exit_process` (a process of a multi-process launch leaves without
    tearing the interpreter down, which torch's gloo backend can crash)."""
    from embedtrain.process import exit_process

    exit_process(main())


if __name__ == "__main__":
    run()
