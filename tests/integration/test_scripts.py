"""scripts/bench_train.py and scripts/profile_train.py run end to end on a tiny model and print the
JSON documents they promise (few steps; the figures themselves are not checked, only their presence
and consistency)."""

import json
import math
import os
import subprocess
import sys

import pytest

from conftest import REPO, build_tiny_bert, write_beir, write_pairs

pytestmark = pytest.mark.slow  # several fresh processes, each importing torch and transformers


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench")
    return {
        "model": str(build_tiny_bert(root / "model")),
        "data": str(write_pairs(root / "pairs.jsonl", rows=160)),
        "eval": str(write_beir(root / "eval")),
        "root": root,
    }


def run_script(script: str, args: list[str], output) -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / script), *args, "--output", str(output)],
                          cwd=REPO, capture_output=True, text=True, timeout=1200, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    doc = json.loads(proc.stdout)
    assert json.loads(output.read_text()) == doc
    return doc


def positive(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def check_machine(machine: dict) -> None:
    for key in ("cpu_count", "torch_threads", "torch"):
        assert machine.get(key), key


def check_run(run: dict, framework: str, variant: str, batch_size: int, steps: int, timed: int) -> None:
    assert "error" not in run, run.get("stderr_tail")
    assert (run["framework"], run["variant"], run["batch_size"]) == (framework, variant, batch_size)
    assert run["steps"] == steps and run["steps_done"] == steps and run["timed_steps"] == timed
    assert positive(run["examples_per_s"]) and positive(run["compute_examples_per_s"])
    assert len(run["step_seconds"]) == timed and all(positive(s) for s in run["step_seconds"])
    assert positive(run["peak_rss_mb"]) and run["peak_rss_mb"] >= run["baseline_rss_mb"]
    assert run["peak_increase_mb"] is not None and run["steps_peak_increase_mb"] is not None
    roles = {"all roles"} if variant == "token_budget" else {"query", "positive", "negative"}
    assert 0 < run["tokens"]["real_share"] <= 1 and set(run["tokens"]["per_role"]) == roles
    assert run["optimizer"]
    if framework == "embedtrain":  # the script observes the run through the trainer's callbacks: one hook per step
        assert run["hooks"]["step_begin"] == run["hooks"]["step_end"] == steps, run["hooks"]


def test_scale_suite(tiny):
    out = tiny["root"] / "scale.json"
    doc = run_script("bench_train.py", [
        "--suite", "scale", "--model", tiny["model"], "--data", tiny["data"], "--batch-sizes", "4", "8",
        "--steps", "2", "--warmup", "1", "--chunk", "4", "--max-length", "32", "--threads", "1"], out)
    assert doc["suite"] == "scale" and doc["failed"] == 0
    check_machine(doc["machine"])
    runs = {(r["framework"], r["variant"], r["batch_size"]): r for r in doc["results"]}
    assert len(runs) == 8
    for (framework, variant, batch_size), run in runs.items():
        check_run(run, framework, variant, batch_size, steps=3, timed=2)
        assert run["chunk"] == (4 if variant in ("gradcache", "cmnrl") else None)
        assert run["torch_threads"] == 1
    speed = doc["ratios"]["examples_per_s"]
    assert positive(speed["embedtrain-plain/st-mnrl@8"]) and positive(speed["embedtrain-gradcache/st-cmnrl@4"])
    assert positive(doc["ratios"]["memory"]["embedtrain: gradcache@8 / plain@4 peak_rss_mb"])


def test_throughput_suite(tiny):
    out = tiny["root"] / "throughput.json"
    doc = run_script("bench_train.py", [
        "--suite", "throughput", "--model", tiny["model"], "--data", tiny["data"], "--eval", tiny["eval"],
        "--batch-size", "8", "--steps", "4", "--warmup", "1", "--repeats", "1", "--max-length", "32",
        "--threads", "1", "--token-budget", "32"], out)
    assert doc["suite"] == "throughput" and doc["failed"] == 0
    check_machine(doc["machine"])
    assert [(r["framework"], r["variant"]) for r in doc["results"]] == [
        ("embedtrain", "default"), ("embedtrain", "token_budget"), ("sentence-transformers", "default"),
        ("sentence-transformers", "speed")]
    for run in doc["results"]:
        check_run(run, run["framework"], run["variant"], 8, steps=4, timed=3)
        assert 0 <= run["ndcg@10"] <= 1 and run["quality"]["eval_seconds"] > 0
    runs = {r["variant"]: r for r in doc["results"] if r["framework"] == "embedtrain"}
    # the same batches, regrouped by length across roles: the same real tokens, less padding
    assert runs["token_budget"]["tokens"]["real_tokens_per_step"] == runs["default"]["tokens"]["real_tokens_per_step"]
    assert runs["token_budget"]["tokens"]["tokens_per_step"] < runs["default"]["tokens"]["tokens_per_step"]
    speed = next(r for r in doc["results"] if r["variant"] == "speed")["speed_options"]
    assert {"batch_sampler", "unpad_inputs", "length_grouping"} <= set(speed)
    if not doc["machine"]["cuda"]:
        assert speed["unpad_inputs"]["applied"] is False and "flash" in speed["unpad_inputs"]["reason"]
    assert len(doc["summary"]) == 4 and all(s["runs"] == 1 for s in doc["summary"])
    assert positive(doc["ratios"]["embedtrain token_budget/default examples_per_s"])
    assert positive(doc["ratios"]["embedtrain/st-default examples_per_s"])
    assert "embedtrain-st-default ndcg@10 difference" in doc["ratios"]


@pytest.mark.parametrize("grouping", ["on", "off"])
def test_profile(tiny, grouping):
    out = tiny["root"] / f"profile-{grouping}.json"
    doc = run_script("profile_train.py", [
        "--model", tiny["model"], "--data", tiny["data"], "--batch-size", "8", "--steps", "2", "--warmup", "1",
        "--max-length", "32", "--length-grouping", grouping, "--peak-gflops", "10", "--threads", "1"], out)
    check_machine(doc["machine"])
    assert doc["config"]["length_grouping"] == grouping
    phases = doc["phases_seconds"]
    for phase in ("tokenize", "collate", "forward", "loss", "backward", "optimizer"):
        assert positive(phases[phase]["mean"]), phase
    shares = [phases[p]["share_of_train_step"] for p in ("forward", "loss", "backward", "optimizer")]
    assert abs(sum(shares) - 1) < 1e-6
    assert doc["model"]["layers"] == 2 and doc["model"]["hidden"] == 32
    assert 0 < doc["tokens"]["real_share"] <= 1
    assert set(doc["tokens"]["per_role"]) == {"query", "positive", "negative"}
    flops = doc["flops_per_step"]
    assert flops["padded"] >= flops["real"] > 0
    assert doc["peak_flops_per_s"] == 10e9 and positive(doc["mfu"]) and doc["hfu"] >= doc["mfu"]
    assert positive(doc["optimizer_alternatives_seconds"]["fused"])


def test_reports_name_paths_in_the_checkout_relative_to_it(tmp_path, capsys, monkeypatch):
    """What a benchmark script writes says what was run, not where this copy of the repository lives."""
    monkeypatch.syspath_prepend(str(REPO / "scripts"))
    from _bench_common import write_json

    out = tmp_path / "report.json"
    write_json({"data": str(REPO / "data" / "wordnet" / "eval"), "runs": [f"wrote {REPO}/runs/x.jsonl", str(REPO)],
                "elsewhere": str(tmp_path), "steps": 3}, str(out))
    doc = json.loads(out.read_text())
    assert doc == {"data": "data/wordnet/eval", "runs": ["wrote runs/x.jsonl", "."], "elsewhere": str(tmp_path),
                   "steps": 3}
    assert json.loads(capsys.readouterr().out) == doc
