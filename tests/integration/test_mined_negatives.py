"""Hard negatives mined by the model being trained (data.mined_negatives), on a tiny BERT: mined with the weights
of their step, kept in checkpoints so that a resumed run is the run, and shared by two processes (DDP and FSDP)."""

import copy
import json
import shutil
import subprocess
from collections import Counter

import numpy as np
import pytest
import yaml
from safetensors.torch import load_file

from embedtrain.config import recipe_from_dict
from embedtrain.train.callbacks import Callback
from embedtrain.train.loop import train
from embedtrain.train.mining import mine_during_training

from conftest import REPO, accelerate_launch, subprocess_env, tiny_recipe

MINED = {"num_negatives": 1, "every": 3, "top_k": 5}


def recipe(tiny_bert, pairs_file, out, **train_settings):
    r = tiny_recipe(tiny_bert, pairs_file, out, train={"max_steps": 7, "lr": 3e-3, **train_settings})
    r["data"]["mined_negatives"] = dict(MINED)
    return r


class Watch(Callback):
    """Keeps the weights after step 3 and the candidates the batch after it was collated with."""

    def __init__(self):
        self.weights = self.again = None
        self.tables = {}

    def on_step_begin(self, trainer, batch):
        mined, ds = trainer.task.collator.mined[0], trainer.task.datasets[0]
        self.tables.setdefault(mined.step, mined.candidates.copy())
        # the batch (collated in a DataLoader worker when there are any) took each row's mined negative from the
        # candidates of the latest mining: the last of the row's two negatives (after the file's own)
        row_of = {k[1]: r for r, k in enumerate(ds.row_keys)}
        last = batch["negative_ids"].view(len(batch["positive_ids"]), 2)[:, 1]
        for positive, negative in zip(batch["positive_ids"].tolist(), last.tolist()):
            ranked = mined.candidates[row_of[positive]]
            assert negative in {int(mined.corpus.keys[c]) for c in ranked if c >= 0}

    def on_step_end(self, trainer, figures):
        if figures["step"] == 3:
            self.weights = copy.deepcopy(trainer.accelerator.unwrap_model(trainer.model).state_dict())

    def on_train_end(self, trainer, result):
        model = trainer.accelerator.unwrap_model(trainer.model)
        model.load_state_dict(self.weights)
        task = trainer.task
        tables, _ = mine_during_training(lambda i, texts, role: task._encode(model, i, texts, role, ""), task.datasets,
                                         trainer.recipe.data.mined_negatives, 3, trainer.recipe.train.seed,
                                         trainer.accelerator)
        self.again = tables[0].candidates


@pytest.mark.parametrize("workers", [0, 1])
def test_negatives_are_mined_with_the_weights_of_their_step(tiny_bert, pairs_file, tmp_path, workers,
                                                            one_torch_thread):
    watch = Watch()
    r = recipe(tiny_bert, pairs_file, tmp_path / "run")
    r["data"]["num_workers"] = workers  # a worker collates with the candidates it was started with: one per mining
    result = train(recipe_from_dict(r), log=lambda *_: None, callbacks=[watch])
    assert sorted(watch.tables) == [0, 3, 6]  # mined at the start, then every 3 steps
    # the batches after step 3 were built from candidates equal to a mining with the weights after step 3
    assert np.array_equal(watch.tables[3], watch.again)
    assert not np.array_equal(watch.tables[0], watch.tables[3])  # and the weights changed them
    assert (watch.tables[3] >= 0).all()  # every row has top_k candidates (random ones after the rule's)
    results = json.loads((result.output_dir / "results.json").read_text())["mined_negatives"]
    assert [m["step"] for m in results["minings"]] == [0, 3, 6]
    assert results["every"] == 3 and results["minings"][0]["datasets"]["pairs"]["rows"] == 256


@pytest.mark.parametrize("killed_after", [3, 4])
def test_a_resumed_run_keeps_its_mined_negatives(tiny_bert, pairs_file, tmp_path, killed_after, one_torch_thread):
    """Killed after step 3 (mining with step 3's weights is still to come) or step 4 (the checkpoint holds what was
    mined at step 3, from weights no checkpoint has): the resumed run ends with the uninterrupted run's weights."""
    settings = {"save_every": 1, "keep_last": 10}
    full = train(recipe_from_dict(recipe(tiny_bert, pairs_file, tmp_path / "full", **settings)), log=lambda *_: None)
    interrupted = tmp_path / "interrupted"
    shutil.copytree(tmp_path / "full", interrupted)
    shutil.rmtree(interrupted / "model")
    (interrupted / "results.json").unlink()
    for later in range(killed_after + 1, 8):
        shutil.rmtree(interrupted / "checkpoints" / f"step-{later:07d}")
    assert (interrupted / "checkpoints" / f"step-{killed_after:07d}" / "mined_negatives.safetensors").is_file()
    lines = []
    resumed = train(recipe_from_dict(recipe(tiny_bert, pairs_file, interrupted, **settings)), resume="auto",
                    log=lambda *a: lines.append(" ".join(map(str, a))))
    assert any(("read from the checkpoint (mined at step 3)" if killed_after == 4 else
                "mining with the weights of step 3") in line for line in lines), lines
    a = load_file(str(full.model_dir / "model.safetensors"))
    b = load_file(str(resumed.model_dir / "model.safetensors"))
    # 1e-6: a resumed run repeats the same operations in the same order (as tests/integration/test_train.py)
    assert max(float((a[k] - b[k]).abs().max()) for k in a) <= 1e-6
    minings = json.loads((interrupted / "results.json").read_text())["mined_negatives"]["minings"]
    assert [m["step"] for m in minings] == [0, 3, 6]


def test_a_damaged_mined_negatives_file_is_one_line(tiny_bert, pairs_file, tmp_path, one_torch_thread, capsys):
    from embedtrain.cli import main

    out = tmp_path / "run"
    r = recipe(tiny_bert, pairs_file, out, max_steps=2, save_every=1, keep_last=5)
    train(recipe_from_dict(r), log=lambda *_: None)
    (out / "checkpoints" / "step-0000002").rename(out / "checkpoints" / "kept")
    (out / "checkpoints" / "step-0000001" / "mined_negatives.safetensors").write_bytes(b"not a safetensors file")
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(r))
    capsys.readouterr()
    assert main(["train", str(path), "--resume", "auto"]) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]  # after the loading bars
    assert len(errors) == 1 and "mined_negatives.safetensors cannot be read" in errors[0], err
    assert "Traceback" not in err


@pytest.mark.slow
@pytest.mark.parametrize("config", ["multi_cpu.yaml", "fsdp_cpu.yaml"])
def test_two_processes_share_one_choice_of_mined_negatives(tiny_bert, pairs_file, tmp_path, config):
    r = recipe(tiny_bert, pairs_file, tmp_path / "run", max_steps=4)
    r["data"]["mined_negatives"]["every"] = 2
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(r))
    cmd = accelerate_launch(config) + [str(REPO / "tests" / "integration" / "dist_mined_worker.py"), str(path),
                                       str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=subprocess_env(), timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["engine"]["processes"] == 2
    assert results["engine"]["distributed_type"] == ("FSDP" if config == "fsdp_cpu.yaml" else "MULTI_CPU")
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    # one table: the main process ranked the candidates from both processes' embeddings and sent them
    assert ranks[0]["candidates"] == ranks[1]["candidates"] and ranks[0]["mined_at"] == 2
    # texts embedded in two shares equal texts embedded whole; float32 with different padding per batch: a few
    # ulps of values below 1
    assert max(r["encode_shared_max_diff"] for r in ranks) <= 1e-5
    # every step's global batch: each process's slice; a document repeats only where the run counted a repeat
    repeats = 0
    for b0, b1 in zip(ranks[0]["batches"], ranks[1]["batches"]):
        documents = Counter(b0["positive_ids"] + b1["positive_ids"] + b0["negative_ids"] + b1["negative_ids"])
        repeats += sum(n - 1 for n in documents.values())
        assert len(b0["negative_ids"]) == len(b0["positive_ids"]) * 2  # the file's negative and a mined one
    assert len(ranks[0]["batches"]) == 4
    assert repeats == results["mined_negatives"]["negatives_repeated"]
    assert [m["step"] for m in results["mined_negatives"]["minings"]] == [0, 2]


EXPECTED = ("error: data.train[0] (pairs) row 1: only 0 of the 1 distinct positives may be its negative, fewer than "
            "data.mined_negatives.num_negatives (1); lower it or add rows")


@pytest.mark.slow
def test_a_mining_error_stops_both_processes_with_its_line(tiny_bert, tmp_path):
    """Only the main process ranks the candidates: when it cannot (one distinct positive, every row's own, leaves no
    negative to mine), the other process must stop with the same error instead of waiting for candidates."""
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps({"anchor": f"question number {i}", "positive": "the answer"}) + "\n"
                            for i in range(32)))
    r = tiny_recipe(tiny_bert, data, tmp_path / "run", train={"max_steps": 2})
    r["data"]["train"][0]["negative_columns"] = []
    r["data"]["mined_negatives"] = {"num_negatives": 1}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(r))
    proc = subprocess.run(accelerate_launch("multi_cpu.yaml") + ["-m", "embedtrain", "train", str(path)],
                          capture_output=True, text=True, env=subprocess_env(), timeout=300, cwd=REPO)
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    # each process stops on the line (the launcher may end the second before it prints it), none on a lost connection
    assert errors in ([EXPECTED], 2 * [EXPECTED]), proc.stderr[-2000:]
    assert "Connection closed by peer" not in proc.stderr
