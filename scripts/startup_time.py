"""Start-up time of ``embedtrain train`` on the quickstart, and the whole-process time of 30 quickstart steps
against sentence-transformers on the same work.

Three measurements, each run in a fresh process, one after another (never two at a time):

``first_step``
    Seconds from launching the process to the first training step of
    ``recipes/minilm/wordnet_quickstart.yaml`` (warm caches: the first, unmeasured run fills datasets' cache of
    the JSON file and of the token ids). The parent reads its clock just before it launches
    ``python scripts/startup_time.py --child ...``; the child runs the recipe through the Python API
    (``embedtrain.train(recipe, overrides, callbacks=...)``, what ``embedtrain train`` calls) with a callback
    whose ``on_step_begin`` reads the clock at the first step, takes the trainer's start-up phases
    (``trainer.task.startup``, the figures of the ``start-up: ...`` log line) and ends the process at once.
    Measured twice: with ``eval.before_training=false`` (the start-up alone) and with the recipe's
    evaluation before training (its seconds are the stage ``evaluation before training``). The time before
    the trainer (interpreter, imports, recipe) is the total less the trainer's own start-up.

``whole_process``
    Wall time of the whole process (launch to exit) for 30 steps of the quickstart setting: embedtrain's
    command line ``python -m embedtrain train recipes/minilm/wordnet_quickstart.yaml train.max_steps=30 ...``
    and sentence-transformers' trainer as ``scripts/bench_train.py`` drives it (its ``--child`` for the
    ``default`` variant: MultipleNegativesRankingLoss, NO_DUPLICATES batches, the same rows, lr, warmup,
    weight decay, clipping, seed, max length and scale 1/temperature). Runs alternate between the two.
    The differences in the work are listed under ``notes`` in the output.

The load average is recorded before and after every run: figures taken on a busy machine are not valid.

Examples::

    python scripts/startup_time.py --output benchmarks/startup.json
    python scripts/startup_time.py --runs 1 --eval-runs 0 --whole-runs 0   # a quick look
    python scripts/startup_time.py --recipe my.yaml --set model.name_or_path=m --model m --data d.jsonl --steps 2
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CHILD_STARTED = time.time()  # the child's first moment in Python (before any import of its own)

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _bench_common import (  # noqa: E402
    QUICKSTART,
    REPO,
    RESULT_MARKER,
    eprint,
    machine_info,
    median,
    offline_env,
    run_child,
    write_json,
)

RECIPE = "recipes/minilm/wordnet_quickstart.yaml"
WHOLE_STEPS = 30
# the same work as sentence-transformers' side does: no evaluation, no diagnostics probe, no plot
WHOLE_OVERRIDES = ["eval.tasks=[]", "eval.diagnostics.probe_rows=0", "output.plot=false"]

NOTES = [
    "first_step: seconds from the parent's clock just before launching the child process to the child's "
    "on_step_begin of step 1 (time.time() on both sides, the same machine); the child runs the recipe through "
    "embedtrain.train(path, overrides, callbacks), the function the command line calls.",
    "first_step.eval_off: eval.before_training=false. first_step.eval_on: the recipe as it is (its evaluation "
    "before training is the stage 'evaluation before training' of the phases). Both include the diagnostics "
    "probe's step-0 measurement (stage 'callbacks at train begin'), which the recipe keeps on.",
    "before_trainer_seconds: launch to the trainer's own clock (interpreter start, imports of torch and the "
    "loop, reading the recipe); the trainer's stages cover the rest up to step 1.",
    "Warm caches: one unmeasured run first, so datasets' Arrow cache of the JSON file and of the token ids exist "
    "(a first run ever also converts the JSON and tokenizes: see the tokenizing progress bar).",
    "whole_process.embedtrain also records what the command printed before its training loop (the training "
    "progress bar): first_output_seconds, and longest_silence_before_loop_seconds, the longest time without any "
    "output from the launch on (the child runs unbuffered, PYTHONUNBUFFERED=1, so lines arrive as printed).",
    "whole_process: launch to exit of one process. embedtrain: python -m embedtrain train "
    f"{RECIPE} train.max_steps={WHOLE_STEPS} " + " ".join(WHOLE_OVERRIDES) + " output.dir=<temp> "
    "output.overwrite=true; "
    "sentence-transformers: scripts/bench_train.py --child for variant 'default' with 30 steps and no "
    "evaluation (SentenceTransformerTrainer, MultipleNegativesRankingLoss with scale 1/temperature, "
    "NO_DUPLICATES batches, dataloader_drop_last, the same rows, lr, linear warmup ratio, weight decay, "
    "gradient clipping, seed and max length).",
    "Differences in the work, whole_process: embedtrain checks every row, tokenizes once before the loop "
    "(cached by datasets), groups rows of similar length (data.length_grouping, its default), and at the end "
    "writes a full checkpoint (weights, optimizer, scheduler, random states), the final model folder with its "
    "model card and results.json; sentence-transformers tokenizes in its collator at each step, batches at "
    "random, and saves nothing (save_strategy='no'). bench_train's child also samples its RSS every 10 ms and "
    "times its collator (both negligible next to a step). Each uses its own AdamW (see bench_train.py's notes).",
]


# -- child ----------------------------------------------------------------------------------------


def child_main(cfg: dict) -> None:
    """Run the recipe until step 1 begins, report the times and the trainer's phases, end the process."""
    offline_env()
    import embedtrain
    from embedtrain.train.callbacks import Callback

    class FirstStep(Callback):
        def on_step_begin(self, trainer, batch):
            now = time.time()
            result = {"child_started": CHILD_STARTED, "first_step": now,
                      "trainer_seconds": trainer.task.startup.seconds, "phases": trainer.task.startup.to_dict()}
            sys.stdout.write(RESULT_MARKER + json.dumps(result) + "\n")
            sys.stdout.flush()
            os._exit(0)  # the measurement ends here; nothing else of the run is needed

    embedtrain.train(cfg["recipe"], cfg["overrides"], callbacks=[FirstStep()], log=eprint)
    raise SystemExit("the run ended without a training step")


# -- parent -------------------------------------------------------------------------------------------


def _load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def first_step_run(args, overrides: list[str], workdir: Path) -> dict:
    out = workdir / "first_step"
    cfg = {"recipe": args.recipe, "overrides": args.set + overrides + [f"output.dir={out}", "output.overwrite=true"]}
    load_before = _load()
    launched = time.time()
    res = run_child([str(Path(__file__).resolve()), "--child", json.dumps(cfg)], args.timeout, args.verbose)
    shutil.rmtree(out, ignore_errors=True)
    if "error" in res:
        return {**res, "load_before": load_before, "load_after": _load()}
    total = res["first_step"] - launched
    return {
        "seconds_to_first_step": round(total, 3),
        "interpreter_seconds": round(res["child_started"] - launched, 3),
        "before_trainer_seconds": round(total - res["trainer_seconds"], 3),
        "trainer_seconds": round(res["trainer_seconds"], 3),
        "phases": res["phases"],
        "load_before": load_before,
        "load_after": _load(),
    }


def _timed_output(argv: list[str], env: dict, timeout: float) -> tuple[int, list[tuple[float, str]]]:
    """Run ``argv``; every piece of its stdout and stderr with the time it arrived (unbuffered child)."""
    import threading

    proc = subprocess.Popen(argv, cwd=str(REPO), env={**env, "PYTHONUNBUFFERED": "1"}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    pieces: list[tuple[float, str]] = []

    def read(stream) -> None:
        for chunk in iter(lambda: stream.read1(65536), b""):
            pieces.append((time.time(), chunk.decode(errors="replace")))

    readers = [threading.Thread(target=read, args=(s,), daemon=True) for s in (proc.stdout, proc.stderr)]
    for r in readers:
        r.start()
    try:
        code = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        code = proc.wait()
    for r in readers:
        r.join()
    return code, sorted(pieces, key=lambda p: p[0])


def whole_process_embedtrain(args, workdir: Path) -> dict:
    """The command line's whole process, and what it printed before its training loop began: the first output
    and the longest silence (seconds without any output, the progress lines' purpose)."""
    out = workdir / "whole_embedtrain"
    argv = [sys.executable, "-m", "embedtrain", "train", args.recipe, f"train.max_steps={args.steps}", *args.set,
            *WHOLE_OVERRIDES, f"output.dir={out}", "output.overwrite=true"]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    load_before = _load()
    start = time.time()
    code, pieces = _timed_output(argv, env, args.timeout)
    seconds = time.time() - start
    res = {"wall_seconds": round(seconds, 3), "load_before": load_before, "load_after": _load()}
    loop = next((t for t, text in pieces if "training:" in text), None)  # the training progress bar appears
    before = [start] + [t for t, _ in pieces if loop is None or t <= loop]
    res["first_output_seconds"] = round(pieces[0][0] - start, 3) if pieces else None
    res["loop_begins_seconds"] = round(loop - start, 3) if loop else None
    res["longest_silence_before_loop_seconds"] = round(max(b - a for a, b in zip(before, before[1:])), 3) \
        if len(before) > 1 else None
    if args.verbose:
        eprint("".join(text for _, text in pieces))
    if code != 0:
        res["error"] = f"exit status {code}"
        res["output_tail"] = "".join(text for _, text in pieces)[-2000:]
    else:
        results = json.loads((out / "results.json").read_text(encoding="utf-8"))
        res["steps"] = results.get("steps")
        startup = [json.loads(line) for line in (out / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
                   if "startup_seconds" in line]
        res["startup_seconds"] = startup[-1]["startup_seconds"]["total"] if startup else None
    shutil.rmtree(out, ignore_errors=True)
    return res


def whole_process_sentence_transformers(args, workdir: Path, index: int) -> dict:
    import bench_train

    bench = bench_train.parse_args(["--suite", "throughput", "--steps", str(args.steps), "--no-quality",
                                    "--model", args.model, "--data", args.data, "--batch-size", str(args.batch_size)])
    cfg = bench_train._child_config(bench, bench_train.ST, "default", bench.batch_size, args.steps, workdir, index,
                                    with_eval=False)
    load_before = _load()
    res = run_child([str(Path(bench_train.__file__).resolve()), "--child", json.dumps(cfg)], args.timeout,
                    args.verbose)
    out = {"wall_seconds": round(res["wall_seconds"], 3), "load_before": load_before, "load_after": _load()}
    if "error" in res:
        out.update(error=res["error"], stderr_tail=res.get("stderr_tail", "")[-2000:])
    else:
        out["steps"] = res.get("steps_done")
        out["examples_per_s"] = res.get("examples_per_s")
    return out


def summarize_first_step(runs: list[dict]) -> dict:
    good = [r for r in runs if "error" not in r]
    stages = {k for r in good for k in r["phases"]["stages"]}
    parts = {(s, p) for r in good for s, ps in r["phases"]["parts"].items() for p in ps}
    return {
        "runs": len(good),
        "failed": len(runs) - len(good),
        "median_seconds_to_first_step": median([r["seconds_to_first_step"] for r in good]),
        "median_before_trainer_seconds": median([r["before_trainer_seconds"] for r in good]),
        "median_interpreter_seconds": median([r["interpreter_seconds"] for r in good]),
        "median_trainer_seconds": median([r["trainer_seconds"] for r in good]),
        "median_stage_seconds": {s: median([r["phases"]["stages"].get(s) for r in good]) for s in sorted(stages)},
        "median_part_seconds": {f"{s}/{p}": median([r["phases"]["parts"].get(s, {}).get(p) for r in good])
                                for s, p in sorted(parts)},
        "all_runs": runs,
    }


def _save_partial(doc: dict, output) -> None:
    """The document so far (a run stopped midway keeps what it measured); the last write is the whole one."""
    if output:
        Path(output).parent.mkdir(parents=True, exist_ok=True)
        Path(output).write_text(json.dumps({**doc, "partial": True}, indent=2) + "\n", encoding="utf-8")


def parent_main(args) -> None:
    offline_env()
    workdir = Path(tempfile.mkdtemp(prefix="startup_time_"))
    doc: dict = {"command": "python scripts/startup_time.py " + " ".join(sys.argv[1:]), "recipe": args.recipe,
                 "overrides": args.set,
                 "machine": machine_info(), "load_average_before": _load(), "notes": NOTES}
    started = time.time()
    try:
        if args.runs or args.eval_runs:
            eprint("warming the caches (one unmeasured run) ...")
            warm = first_step_run(args, ["eval.before_training=false"], workdir)
            doc["warm_up_run"] = warm
        first: dict = {}
        for name, overrides, n in (("eval_off", ["eval.before_training=false"], args.runs),
                                   ("eval_on", [], args.eval_runs)):
            runs = []
            for i in range(n):
                eprint(f"first step, {name}, run {i + 1}/{n} ...")
                runs.append(first_step_run(args, overrides, workdir))
                eprint(f"  {runs[-1].get('seconds_to_first_step', runs[-1].get('error'))} s")
                first[name] = {"overrides": overrides, **summarize_first_step(runs)}
                doc["first_step"] = first
                _save_partial(doc, args.output)
        doc["first_step"] = first
        whole: dict = {"steps": args.steps, "embedtrain": [], "sentence_transformers": []}
        for i in range(args.whole_runs):
            eprint(f"whole process, {args.steps} steps, embedtrain, run {i + 1}/{args.whole_runs} ...")
            whole["embedtrain"].append(whole_process_embedtrain(args, workdir))
            eprint(f"  {whole['embedtrain'][-1]['wall_seconds']} s")
            eprint(f"whole process, {args.steps} steps, sentence-transformers, run {i + 1}/{args.whole_runs} ...")
            whole["sentence_transformers"].append(whole_process_sentence_transformers(args, workdir, i))
            eprint(f"  {whole['sentence_transformers'][-1]['wall_seconds']} s")
            doc["whole_process"] = whole
            _save_partial(doc, args.output)
        if args.whole_runs:
            for side in ("embedtrain", "sentence_transformers"):
                good = [r["wall_seconds"] for r in whole[side] if "error" not in r]
                whole[f"{side}_median_wall_seconds"] = median(good)
            e, s = whole["embedtrain_median_wall_seconds"], whole["sentence_transformers_median_wall_seconds"]
            whole["embedtrain_over_sentence_transformers"] = round(e / s, 3) if e and s else None
            doc["whole_process"] = whole
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    doc["seconds"] = round(time.time() - started, 1)
    doc["load_average_after"] = _load()
    write_json(doc, args.output)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--runs", type=int, default=5, help="measured runs to the first step, eval.before_training=false")
    p.add_argument("--eval-runs", type=int, default=3, help="measured runs to the first step with the evaluation "
                                                             "before training")
    p.add_argument("--whole-runs", type=int, default=3, help="30-step whole-process runs of each framework")
    p.add_argument("--steps", type=int, default=WHOLE_STEPS, help="training steps of the whole-process runs")
    p.add_argument("--recipe", default=RECIPE, help="the embedtrain recipe (default: the quickstart)")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                   help="overrides for every embedtrain run (e.g. model.name_or_path=...)")
    p.add_argument("--model", default=QUICKSTART["model"], help="sentence-transformers' side: the model")
    p.add_argument("--data", default=QUICKSTART["data"], help="sentence-transformers' side: the training pairs")
    p.add_argument("--batch-size", type=int, default=QUICKSTART["batch_size"], help="sentence-transformers' side")
    p.add_argument("--timeout", type=float, default=1800, help="seconds per run")
    p.add_argument("--verbose", action="store_true", help="show the children's output")
    p.add_argument("--output", default=None, help="write the JSON here too (e.g. benchmarks/startup.json)")
    return p.parse_args(argv)


if __name__ == "__main__":
    arguments = parse_args()
    if arguments.child:
        child_main(json.loads(arguments.child))
    else:
        parent_main(arguments)
