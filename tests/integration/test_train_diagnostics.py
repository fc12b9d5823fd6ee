"""Diagnostics in a real short training: the probe held out, measured on schedule, kept across a resume;
`embedtrain inspect` on the saved model."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from embedtrain.cli import main
from embedtrain.config import recipe_from_dict
from embedtrain.eval.diagnostics import diagnose
from embedtrain.train.loop import train

from conftest import tiny_recipe, write_pairs

DIAGNOSTICS = {"probe_rows": 40, "every": 4}


@pytest.fixture(scope="module")
def probe_pairs(tmp_path_factory):
    return write_pairs(tmp_path_factory.mktemp("probe-pairs") / "train.jsonl", rows=800)  # 5% = 40 probe rows


def run(recipe: dict, resume=None, log=lambda *_: None):
    return train(recipe_from_dict(recipe), resume=resume, log=log)


def lines(run_dir):
    return [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_the_probe_is_held_out_and_measured_on_schedule_and_a_resume_keeps_it(
        tiny_bert, probe_pairs, beir_dir, tmp_path, one_torch_thread):
    common = dict(train={"max_steps": 8, "save_every": 4, "keep_last": 5, "eval_every": 6},
                  eval={"diagnostics": DIAGNOSTICS})
    said = []
    run(tiny_recipe(tiny_bert, probe_pairs, tmp_path / "full", beir_dir, **common), log=said.append)
    assert any(s.startswith("diagnostics probe: 40 pairs held out of training") for s in said)
    diag = [l for l in lines(tmp_path / "full") if "diag/rankme" in l]
    # step 0 (with the baseline), every 4 steps, at the evaluation of step 6 and at the end (8, once)
    assert [l["step"] for l in diag] == [0, 4, 6, 8]
    assert all(set(l) >= {"diag/uniformity", "diag/alignment", "diag/random_cosine", "diag/similarity_gap"} for l in diag)
    results = json.loads((tmp_path / "full" / "results.json").read_text())
    assert results["diagnostics_probe"]["rows"] == 40 and results["diagnostics_probe"]["excluded_training_rows"] >= 40
    state = json.loads((tmp_path / "full" / "checkpoints" / "step-0000004" / "trainer_state.json").read_text())
    assert state["diagnostics"] == {"probe_pairs": 40,
                                    **{k[len("diag/"):]: v for k, v in diag[0].items() if k.startswith("diag/")}}

    # the same run killed after step 4's checkpoint, resumed: the same rows held out, the same weights
    interrupted = tmp_path / "interrupted"
    run(tiny_recipe(tiny_bert, probe_pairs, interrupted, beir_dir, **common))
    shutil.rmtree(interrupted / "model")
    (interrupted / "results.json").unlink()
    shutil.rmtree(interrupted / "checkpoints" / "step-0000008")
    run(tiny_recipe(tiny_bert, probe_pairs, interrupted, beir_dir, **common), resume="auto")
    assert json.loads((interrupted / "results.json").read_text())["diagnostics_probe"] == results["diagnostics_probe"]
    a, b = (load_file(str(d / "model" / "model.safetensors")) for d in (tmp_path / "full", interrupted))
    # 1e-6: a resumed run repeats the same operations in the same order (as the plain resume test)
    assert max(float((a[k] - b[k]).abs().max()) for k in a) <= 1e-6
    again = [l for l in lines(interrupted) if "diag/rankme" in l]
    assert [l["step"] for l in again] == [0, 4, 6, 8]
    # the same weights give the same probe figures (to the 1e-6 of the weights, through a tiny model)
    assert again[-1]["diag/rankme"] == pytest.approx(diag[-1]["diag/rankme"], rel=1e-4)


def test_inspect_prints_the_diagnostics_of_a_saved_model(tiny_bert, probe_pairs, tmp_path, capsys, one_torch_thread):
    from embedtrain.models.loading import load_model

    run(tiny_recipe(tiny_bert, probe_pairs, tmp_path / "run", train={"max_steps": 2}, eval={"diagnostics": DIAGNOSTICS}))
    model_dir = tmp_path / "run" / "model"
    assert main(["inspect", str(model_dir), "--texts", str(probe_pairs), "--query-column", "anchor",
                 "--max-rows", "50", "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    rows = [json.loads(l) for l in probe_pairs.read_text().splitlines()[:50]]
    model = load_model(model_dir)
    q = model.encode([r["anchor"] for r in rows], role="query", batch_size=64)
    p = model.encode([r["positive"] for r in rows], role="document", batch_size=64)
    expected = diagnose(torch.cat([q, p]), q, p)
    assert shown["pairs"] == 50
    # the same forward passes in the same batches: equal up to float64 summation order (1e-9)
    assert {k: shown[k] for k in expected} == pytest.approx(expected, rel=1e-9)

    texts = tmp_path / "texts.txt"
    texts.write_text("a red tree\n\nthe network\ncomputer data\n")
    assert main(["inspect", str(model_dir), "--texts", str(texts)]) == 0
    assert "on 3 texts" in capsys.readouterr().out
    assert main(["inspect", str(model_dir), "--texts", str(probe_pairs)]) == 2  # no 'query' column
    assert "no text in column 'query'" in capsys.readouterr().err


def test_too_few_rows_for_a_probe_is_said_once_and_recorded(tiny_bert, pairs_file, tmp_path):
    said = []
    run(tiny_recipe(tiny_bert, pairs_file, tmp_path / "run", train={"max_steps": 2}), log=said.append)
    off = [s for s in said if s.startswith("diagnostics")]
    assert len(off) == 1 and "training rows are too few to hold out a probe of 16 or more pairs" in off[0], off
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert "too few to hold out a probe" in results["diagnostics_probe"]["off"]


def test_label_strings_make_no_probe_and_the_run_says_why(tiny_bert, tmp_path):
    rows = tmp_path / "labels.jsonl"
    labels = ["red", "green", "blue", "black"]
    rows.write_text("".join(json.dumps({"anchor": f"thing number {i}", "positive": labels[i % 4],
                                        "negative": labels[(i + 1) % 4]}) + "\n" for i in range(400)))
    said = []
    run(tiny_recipe(tiny_bert, rows, tmp_path / "run", train={"max_steps": 2}), log=said.append)
    off = [s for s in said if s.startswith("diagnostics")]
    assert len(off) == 1 and "fewer than 16 pairs could be held out without taking more than 5%" in off[0], off
