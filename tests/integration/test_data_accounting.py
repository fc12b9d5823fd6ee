"""A training run accounts for every row: a label-string dataset trains in full, and a dataset that would be
dropped is an error before the first step, with nothing written."""

import json

import pytest

from embedtrain.config import recipe_from_dict
from embedtrain.errors import EmbedtrainError
from embedtrain.train.loop import train

from conftest import tiny_recipe

LABELS = ["joy", "anger", "fear"]


@pytest.fixture()
def label_pairs(tmp_path):
    path = tmp_path / "emotion.jsonl"
    path.write_text("".join(json.dumps({"anchor": f"message {i} says something", "positive": LABELS[i % 3]}) + "\n"
                            for i in range(64)))
    return path


def recipe(tiny_bert, label_pairs, out, **loss):
    r = tiny_recipe(tiny_bert, label_pairs, out, train={"max_steps": 4}, loss=loss)
    r["data"] = {"train": [{"path": str(label_pairs), "name": "emotion"}], "batch_size": 16}
    return r


def test_label_strings_train_every_row_and_results_say_so(tiny_bert, label_pairs, tmp_path, one_torch_thread):
    run = train(recipe_from_dict(recipe(tiny_bert, label_pairs, tmp_path / "run")), log=lambda *_: None)
    assert run.steps == 4
    (data,) = json.loads((tmp_path / "run" / "results.json").read_text())["data"]
    assert (data["name"], data["rows_read"], data["rows_per_epoch"], data["batches_per_epoch"]) == ("emotion", 64, 64, 4)
    assert data["dropped"] == {} and data["lost_share"] == 0.0


def test_a_dataset_that_yields_no_batch_stops_the_run_before_it_starts(tiny_bert, label_pairs, tmp_path,
                                                                       one_torch_thread):
    # without masking, documents must be unique in a batch: three labels cannot fill a batch of 16
    r = recipe(tiny_bert, label_pairs, tmp_path / "run", mask_false_negatives=False)
    with pytest.raises(EmbedtrainError, match=r"^data.train\[0\] \(emotion\): yields no full batch of 16 rows"):
        train(recipe_from_dict(r), log=lambda *_: None)
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
