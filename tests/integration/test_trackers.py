"""Metrics reach accelerate's trackers (TensorBoard) and the PNG curves are drawn."""

from embedtrain.config import recipe_from_dict
from embedtrain.train.loop import train

from conftest import tiny_recipe


def test_tensorboard_events_and_curves(tiny_bert, pairs_file, beir_dir, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    recipe = tiny_recipe(tiny_bert, pairs_file, out, beir_dir, train={"max_steps": 4, "eval_every": 2, "log_every": 1},
                         output={"report_to": ["tensorboard"], "plot": True})
    train(recipe_from_dict(recipe), log=lambda *_: None)
    events = list(out.rglob("events.out.tfevents.*"))
    assert events
    acc = EventAccumulator(str(events[0].parent)).Reload()
    assert "loss" in acc.Tags()["scalars"]
    assert [e.step for e in acc.Scalars("loss")] == [1, 2, 3, 4]
    assert any(t.startswith("eval/tiny/ndcg@10") for t in acc.Tags()["scalars"])
    png = out / "training_curves.png"
    assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
