"""The diagnostics callback: when it measures, what it records, and its collapse warnings."""

import json
from types import SimpleNamespace

import torch

from embedtrain.data.probe import Probe
from embedtrain.eval.diagnostics import diagnose
from embedtrain.train.diagnostics import DiagnosticsCallback
from embedtrain.train.loop import TrainState
from embedtrain.train.startup import StartupPhases


class FakeTrainer:
    """What the callback uses of a Trainer: the task's probe, the probe's embeddings, state, record and log."""

    def __init__(self, embeddings, total_steps=100):
        self.embeddings = embeddings  # step -> (queries, positives)
        self.task = SimpleNamespace(probe=Probe(queries=[["q"]], positives=[["p"]]), probe_off=None,
                                    startup=StartupPhases(lambda *_: None))  # its progress lines: not checked here
        self.recipe = SimpleNamespace(kind="text", output=SimpleNamespace(report_to=[]))
        self.state, self.total_steps, self.lines, self.logged, self.step = TrainState(), total_steps, [], [], 0

    def probe_embeddings(self):
        return self.embeddings(self.step)

    def record(self, entry, track=True):
        self.lines.append(json.loads(json.dumps(entry)))

    def log(self, *parts):
        self.logged.append(" ".join(map(str, parts)))


def spread(n=64, d=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.nn.functional.normalize(torch.randn(n, d, generator=g), dim=1)
    return q, torch.nn.functional.normalize(q + 0.3 * torch.randn(n, d, generator=g), dim=1)


def test_measures_at_step_zero_every_n_steps_at_evaluations_and_at_the_end_once_each():
    trainer = FakeTrainer(lambda step: spread(), total_steps=23)
    callback = DiagnosticsCallback(every=10, rank_warning=0.5, uniformity_warning=0.5)
    callback.on_evaluate(trainer, {"x": 1.0})  # the baseline evaluation (state.step is 0)
    callback.on_train_begin(trainer)  # measured already: not again
    for step in range(1, 24):
        trainer.step = step
        callback.on_step_end(trainer, {"step": step})
        if step in (10, 15):
            callback.on_evaluate(trainer, {"x": 1.0})
    assert [line["step"] for line in trainer.lines] == [0, 10, 15, 20, 23]
    q, p = spread()
    expected = {f"diag/{k}": v for k, v in diagnose(torch.cat([q, p]), q, p).items()}
    assert trainer.lines[0] == {"step": 0, **expected}
    assert trainer.state.diagnostics == {"probe_pairs": 64, **{k[len("diag/"):]: v for k, v in expected.items()}}
    assert not any("WARNING" in line for line in trainer.logged)


def test_a_collapse_warns_in_the_log_and_in_the_metrics_line():
    def embeddings(step):
        if step < 5:
            return spread()
        # from step 5 on every text sits near one point: rank and uniformity collapse
        base = torch.nn.functional.normalize(torch.ones(64, 32) + 0.01 * spread()[0], dim=1)
        return base, base.clone()

    trainer = FakeTrainer(embeddings)
    callback = DiagnosticsCallback(every=5, rank_warning=0.5, uniformity_warning=0.5)
    callback.on_train_begin(trainer)  # no baseline evaluation: step 0 is measured here
    for step in range(1, 11):
        trainer.step = step
        callback.on_step_end(trainer, {"step": step})
    assert [line["step"] for line in trainer.lines] == [0, 5, 10]
    assert "diag/warning" not in trainer.lines[0]
    warning = trainer.lines[1]["diag/warning"]
    assert "effective rank" in warning and "uniformity" in warning
    assert any(line.startswith("step 5: diagnostics") and "WARNING: effective rank" in line for line in trainer.logged)


def test_a_resumed_run_warns_against_the_saved_step_zero_values():
    trainer = FakeTrainer(lambda step: spread(seed=step))
    trainer.state.diagnostics = {"rankme": 1e6, "uniformity": -100.0}  # as loaded from a checkpoint
    trainer.state.step = 40
    callback = DiagnosticsCallback(every=5, rank_warning=0.5, uniformity_warning=0.5)
    callback.on_train_begin(trainer)  # resumed: no step-0 measurement
    trainer.step = 45
    callback.on_step_end(trainer, {"step": 45})
    assert [line["step"] for line in trainer.lines] == [45]
    assert "below 0.5 x its step-0 value 1000000.0" in trainer.lines[0]["diag/warning"]
    assert trainer.state.diagnostics["rankme"] == 1e6
    assert trainer.logged[0].startswith("step 45: diagnostics")  # the same probe: nothing to say at the start


def test_a_resume_with_another_probe_says_so():
    trainer = FakeTrainer(lambda step: spread())
    trainer.state.diagnostics, trainer.state.step = {"rankme": 10.0, "uniformity": -1.0, "probe_pairs": 256}, 40
    trainer.task.probe.queries = [["q"] * 100]  # this start holds out 100 pairs
    DiagnosticsCallback(every=5, rank_warning=0.5, uniformity_warning=0.5).on_train_begin(trainer)
    assert trainer.lines == [] and "the probe now has 100 pairs, the checkpoint's run held out 256" in trainer.logged[0]


def test_a_task_without_probe_says_so_once():
    trainer = FakeTrainer(lambda step: None)
    trainer.task.probe = None  # and no reason given when the data was read
    callback = DiagnosticsCallback(every=1, rank_warning=0.5, uniformity_warning=0.5)
    for step in range(1, 4):
        callback.on_step_end(trainer, {"step": step})
    assert trainer.lines == [] and len(trainer.logged) == 1 and "kind text" in trainer.logged[0]
