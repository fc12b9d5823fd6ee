"""Train the same short recipes with this checkout and with another revision; compare the saved weights.

A change meant to move no numbers (a refactor) should give bit-identical models. For each kind of model
(text encoder, MoE, NV-Embed decoder, CLIP, VLM2Vec, metric learning) the script runs a shortened shipped
recipe, one CPU thread, once with ``git worktree`` of ``--rev`` and once with this checkout, then reports the
largest absolute weight difference over every tensor of the saved model and whether the final scores are
equal. Prints JSON and writes it to ``--output``.

    python scripts/compare_revisions.py --rev 8a35721 --output benchmarks/parity_one_trainer.json
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

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _bench_common import write_json  # noqa: E402
THREAD = ["train.torch_threads=1"]
CASES = {
    "text": ("recipes/minilm/wordnet_quickstart.yaml", ["train.max_steps=4", "data.train.0.max_rows=640",
                                                        "eval.tasks=[]", "train.log_every=1"]),
    "moe": ("recipes/moe/wordnet_foldoc.yaml", ["train.max_steps=4", "data.train.0.max_rows=320",
                                                "data.train.1.max_rows=320", "eval.tasks=[]", "train.log_every=1"]),
    "nv_embed": ("recipes/nv_embed_tiny/stage1.yaml", ["train.max_steps=6"]),
    "clip": ("recipes/clip/emoji_clip_tiny.yaml", []),
    "vlm2vec": ("recipes/qwen2-vl-2b/vlm2vec_tiny_cpu.yaml", []),  # + model.name_or_path (a tiny Qwen2-VL)
    "dml": ("recipes/dml/vpt_proxies_emoji.yaml", ["train.max_steps=6", "train.eval_every=3"]),  # + the CLIP tower
}


def run_case(repo: Path, name: str, out: Path, tiny_vlm: Path, clip_model: Path, log_dir: Path) -> Path:
    recipe, overrides = CASES[name]
    command, extra = "train", [f"output.dir={out}"]
    if name == "vlm2vec":
        extra.append(f"model.name_or_path={tiny_vlm}")
    if name == "dml":
        # metric-learning recipes before `kind: dml` ran with `embedtrain dml` and kept backbone/tuning at the top
        old_form = "kind: dml" not in (repo / recipe).read_text(encoding="utf-8")
        prefix = "" if old_form else "model."
        command = "dml" if old_form else "train"
        extra += [f"{prefix}backbone.name_or_path={clip_model}", f"{prefix}tuning.prompt_depth=1"]
    env = dict(os.environ, PYTHONPATH=str(repo), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "embedtrain", command, recipe, *overrides, *THREAD, *extra, "--overwrite"],
                          cwd=repo, env=env, capture_output=True, text=True)
    (log_dir / f"{out.parent.name}-{name}.log").write_text(proc.stdout + proc.stderr, encoding="utf-8")
    if proc.returncode:
        raise SystemExit(f"{name} failed in {repo}:\n{proc.stderr[-3000:]}")
    return out


def weights(model_dir: Path) -> dict:
    from safetensors.torch import load_file

    out = {}
    for path in sorted(model_dir.rglob("*.safetensors")):
        for key, value in load_file(str(path)).items():
            out[f"{path.relative_to(model_dir)}:{key}"] = value
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rev", required=True, help="the revision to compare with (commit, branch or tag)")
    parser.add_argument("--cases", nargs="*", default=list(CASES), choices=list(CASES))
    parser.add_argument("--work", default=None, help="folder for the runs (default: a temporary one)")
    parser.add_argument("--output", default=None, help="write the JSON report here too")
    args = parser.parse_args(argv)

    work = Path(args.work or tempfile.mkdtemp(prefix="compare-revisions-"))
    work.mkdir(parents=True, exist_ok=True)
    old_repo = work / "revision"
    if old_repo.exists():
        subprocess.run(["git", "worktree", "remove", "--force", str(old_repo)], cwd=REPO, check=False)
        shutil.rmtree(old_repo, ignore_errors=True)
    subprocess.run(["git", "worktree", "add", "--detach", "-f", str(old_repo), args.rev], cwd=REPO, check=True,
                   capture_output=True)
    rev = subprocess.run(["git", "rev-parse", "--short", args.rev], cwd=REPO, capture_output=True, text=True).stdout.strip()
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    tiny_vlm = work / "tiny-qwen2-vl"
    if "vlm2vec" in args.cases and not tiny_vlm.is_dir():
        subprocess.run([sys.executable, "-m", "embedtrain.models.tiny_vlm", str(tiny_vlm)], cwd=REPO, check=True,
                       capture_output=True, env=dict(os.environ, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1"))
    cases = list(args.cases)
    if "dml" in cases and "clip" not in cases:
        cases.insert(cases.index("dml"), "clip")  # the metric-learning runs use the CLIP run's vision tower
    report = {"revision": rev, "checkout": head, "threads": 1, "cases": {}}
    try:
        for name in cases:
            start = time.time()
            outs = {}
            for side, repo in (("revision", old_repo), ("checkout", REPO)):
                outs[side] = run_case(repo, name, work / side / name, tiny_vlm, work / side / "clip" / "model", work)
            a, b = weights(outs["revision"] / "model"), weights(outs["checkout"] / "model")
            same = a.keys() == b.keys()
            worst = max(float((a[k].float() - b[k].float()).abs().max()) for k in a) if same else None
            ra = json.loads((outs["revision"] / "results.json").read_text())
            rb = json.loads((outs["checkout"] / "results.json").read_text())
            report["cases"][name] = {"recipe": CASES[name][0], "tensors": len(a), "same_tensor_names": same,
                                     "max_abs_weight_difference": worst, "final_scores_equal": ra["final"] == rb["final"],
                                     "final": rb["final"], "seconds": round(time.time() - start, 1)}
            print(name, json.dumps(report["cases"][name]), file=sys.stderr, flush=True)
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", str(old_repo)], cwd=REPO, check=False,
                       capture_output=True)
    write_json(report, args.output)
    return 0 if all(c["max_abs_weight_difference"] == 0.0 and c["final_scores_equal"] for c in report["cases"].values()) \
        else 1


if __name__ == "__main__":
    sys.exit(main())
