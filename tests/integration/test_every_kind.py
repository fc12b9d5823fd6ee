"""One trainer for every kind of model: the same kill-and-resume guarantee and the same Hub push for each.

For every kind (text, MoE, decoder with LoRA + latent attention, a causal decoder with LoRA, CLIP, tiny VLM2Vec,
metric learning with a class-balanced sampler whose batches per epoch vary), a run is SIGKILLed in the middle of a
checkpoint write, resumed with ``--resume auto``, and must end with the weights of an uninterrupted
run (1e-6: the same float32 operations in the same order, on one thread, so only a bug moves them).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from huggingface_hub import constants

from embedtrain.config import recipe_from_dict
from embedtrain.train import checkpoint as ckpt
from embedtrain.train.loop import _position, train

from conftest import REPO, kill_tree, subprocess_env
from kinds_support import KINDS, STEPS, build_assets, recipe_data, saved_weights
from multimodal_support import tiny_vlm  # noqa: F401  (a fixture)
from tests.unit.hub.hub_server import FakeHub

pytestmark = pytest.mark.slow  # a subprocess and two short trainings per kind

KILL_AT = 6  # killed while writing the step-6 checkpoint: the resume starts from step 4


@pytest.fixture(autouse=True)
def _restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def assets(tmp_path_factory, tiny_vlm):  # noqa: F811
    return build_assets(tmp_path_factory.mktemp("every-kind"), tiny_vlm)


def _kill_during_checkpoint(recipe_path: Path, out: Path, log: Path) -> None:
    """Start ``embedtrain train`` in its own session, SIGKILL it while it writes the step-KILL_AT checkpoint."""
    env = subprocess_env(**{ckpt.PAUSE_ENV: f"120@{KILL_AT}"})
    with log.open("w") as f:
        proc = subprocess.Popen([sys.executable, "-m", "embedtrain", "train", str(recipe_path)], cwd=REPO, env=env,
                                stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        partial = out / "checkpoints" / f".tmp-step-{KILL_AT:07d}" / ckpt.STATE_FILE
        end = time.time() + 600
        try:
            while not partial.is_file():
                assert proc.poll() is None, f"exited {proc.returncode} before the kill point:\n{log.read_text()[-3000:]}"
                assert time.time() < end, f"kill point not reached:\n{log.read_text()[-3000:]}"
                time.sleep(0.05)
        finally:
            if proc.poll() is None:
                kill_tree(proc.pid)  # workers of a launcher too (each in a session of its own)
            proc.wait(timeout=60)


@pytest.fixture
def fake_hub(monkeypatch, tmp_path):
    """A fake Hub on 127.0.0.1 that huggingface_hub talks to, with a token from the environment."""
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_OIDC_RESOURCE", "HUGGING_FACE_HUB_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_TOKEN", "hf_testtoken_SECRET123")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_TELEMETRY", True)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-stored-token"))
    with FakeHub() as hub:
        monkeypatch.setattr(constants, "ENDPOINT", hub.url)
        yield hub


@pytest.mark.parametrize("kind", KINDS)
def test_killed_and_resumed_run_ends_with_the_uninterruptedsaved_weights(kind, assets, tmp_path, fake_hub):
    # the uninterrupted run also pushes its model: every kind goes through the trainer's one push
    data = recipe_data(kind, assets, tmp_path / "full")
    data["output"]["push_to_hub"] = f"alice/{kind}"
    lines = []
    full = train(recipe_from_dict(data), log=lines.append)
    assert full.steps == STEPS and not full.stopped
    assert [c.repo_id for c in fake_hub.commits] == [f"alice/{kind}"]
    pushed = fake_hub.commits[0].files
    local = {p.relative_to(full.model_dir).as_posix() for p in full.model_dir.rglob("*") if p.is_file()}
    assert local <= set(pushed), local - set(pushed)
    assert any(line.startswith("pushed to ") for line in lines)
    assert not any("SECRET123" in line for line in lines)

    if kind == "dml":  # the case that a divmod over a fixed epoch length resumed at the wrong batch
        from embedtrain.train.tasks import task_for

        task = task_for(recipe_from_dict(recipe_data(kind, assets, tmp_path / "probe")))
        task.read_data()
        lengths = [task.batches_in_epoch(e) for e in range(4)]
        # resuming after step 4: counting epoch by epoch and dividing by the first epoch's length disagree
        assert len(set(lengths)) > 1 and _position(task.batches_in_epoch, 4) != divmod(4, lengths[0]), lengths

    out = tmp_path / "interrupted"
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe_data(kind, assets, out)), encoding="utf-8")
    _kill_during_checkpoint(path, out, tmp_path / "log.txt")
    assert [s for s, _ in ckpt.list_checkpoints(out)] == [2, 4]
    assert ckpt.incomplete_checkpoints(out)  # the half-written step-6 folder

    resumed = train(recipe_from_dict(recipe_data(kind, assets, out)), resume="auto", log=lambda *_: None)
    assert resumed.steps == STEPS
    a, b = saved_weights(full.model_dir), saved_weights(resumed.model_dir)
    assert a.keys() == b.keys()
    worst = max(float((a[k].float() - b[k].float()).abs().max()) for k in a)
    assert worst <= 1e-6, worst
    steps = [json.loads(l)["step"] for l in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in l]
    assert steps == list(range(1, STEPS + 1))  # every step logged once, in order
    results = json.loads((out / "results.json").read_text())
    assert results["kind"] == recipe_from_dict(recipe_data(kind, assets, out)).kind and results["steps"] == STEPS
