"""scripts/startup_time.py runs end to end on a tiny model and writes the JSON it promises (one run of each kind;
the figures themselves are not checked, only their presence and consistency)."""

import json
import math
import os
import subprocess
import sys

import pytest
import yaml

from conftest import REPO, build_tiny_bert, tiny_recipe, write_beir, write_pairs

pytestmark = pytest.mark.slow  # several fresh processes, each importing torch and transformers


def positive(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def test_startup_time_script_end_to_end(tmp_path):
    model = build_tiny_bert(tmp_path / "model")
    data = write_pairs(tmp_path / "pairs.jsonl", rows=400)
    recipe = tiny_recipe(model, data, tmp_path / "unused", write_beir(tmp_path / "eval"))
    recipe["eval"]["diagnostics"] = {"probe_rows": 16}  # 400 rows: a probe of 16 pairs (at most 5% of the rows)
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    output = tmp_path / "startup.json"
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "startup_time.py"), "--recipe", str(tmp_path / "recipe.yaml"),
         "--runs", "1", "--eval-runs", "1", "--whole-runs", "1", "--steps", "2", "--model", str(model),
         "--data", str(data), "--batch-size", "8", "--output", str(output)],
        cwd=REPO, capture_output=True, text=True, timeout=1200, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    doc = json.loads(proc.stdout)
    assert json.loads(output.read_text()) == doc
    assert len(doc["load_average_before"]) == 3 and len(doc["load_average_after"]) == 3

    off, on = doc["first_step"]["eval_off"], doc["first_step"]["eval_on"]
    for summary in (off, on):
        assert summary["runs"] == 1 and summary["failed"] == 0
        run = summary["all_runs"][0]
        assert positive(run["seconds_to_first_step"]) and positive(run["trainer_seconds"])
        # launch -> trainer -> step 1: the parts add up (before_trainer is the remainder, so never negative)
        assert run["before_trainer_seconds"] >= 0
        assert math.isclose(run["before_trainer_seconds"] + run["trainer_seconds"], run["seconds_to_first_step"],
                            abs_tol=2e-3)  # each figure is rounded to milliseconds
        stages = run["phases"]["stages"]
        assert math.isclose(sum(stages.values()), run["phases"]["total"], abs_tol=1e-2)  # 3 decimals per stage
        assert {"reading data", "building the model", "epoch plan", "callbacks at train begin"} <= set(stages)
        assert "loading model" in run["phases"]["parts"]["building the model"]
        assert "diagnostics at step 0" in run["phases"]["parts"]["callbacks at train begin"]
    assert "evaluation before training" in on["all_runs"][0]["phases"]["stages"]
    assert "evaluation before training" not in off["all_runs"][0]["phases"]["stages"]

    whole = doc["whole_process"]
    assert whole["steps"] == 2
    for side in ("embedtrain", "sentence_transformers"):
        (run,) = whole[side]
        assert "error" not in run, run
        assert positive(run["wall_seconds"]) and run["steps"] == 2
        assert positive(whole[f"{side}_median_wall_seconds"])
    ours = whole["embedtrain"][0]
    assert positive(ours["startup_seconds"])
    # the command printed before its loop began (at least the start-up line) and the loop began before it ended
    assert 0 < ours["first_output_seconds"] <= ours["loop_begins_seconds"] < ours["wall_seconds"]
    assert 0 < ours["longest_silence_before_loop_seconds"] <= ours["loop_begins_seconds"]
    assert positive(whole["embedtrain_over_sentence_transformers"])
