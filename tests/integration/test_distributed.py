"""Two real CPU processes (torchrun, gloo) against one process holding the whole batch."""

import json
import subprocess
import sys

import pytest
import torch
import yaml
from safetensors.torch import load_file

from embedtrain.models import load_text_encoder

from conftest import REPO, accelerate_launch, free_port, tiny_recipe
from compact_int8_support import ROWS as INT8_ROWS, compact_int8_loss, embeddings
from helpers_parity import CONFIGS, grads, make_batch, slice_batch, step

ROWS = 4


def _env():
    from conftest import subprocess_env

    return subprocess_env()


def test_two_processes_equal_one_process_with_twice_the_batch(tiny_bert_no_dropout, tmp_path):
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port())]
    worker = str(REPO / "tests" / "integration" / "dist_parity_worker.py")
    proc = subprocess.run(torchrun + [worker, str(tiny_bert_no_dropout), str(tmp_path), str(ROWS)],
                          capture_output=True, text=True, env=_env(), timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    losses = json.loads((tmp_path / "losses.json").read_text())
    assert losses["distributed_type"] == "DistributedType.MULTI_CPU"
    for name, cfg in CONFIGS.items():
        model = load_text_encoder(str(tiny_bert_no_dropout), max_length=32)
        model.train()
        batch = make_batch(model.tokenizer, 2 * ROWS)
        ref_loss = step(model, slice_batch(batch, 0, 2 * ROWS), dict(cfg, chunk=None, budget=None))  # one plain batch
        ref = grads(model)
        got = load_file(str(tmp_path / f"{name}.safetensors"))
        # 1e-5: the same float32 sums, gathered and all-reduced in another order than one process takes them
        assert abs(losses[name] - ref_loss) < 1e-5, (name, losses[name], ref_loss)
        assert got.keys() == ref.keys()
        for k in ref:
            assert torch.allclose(got[k], ref[k], atol=1e-5, rtol=1e-4), (name, k, float((got[k] - ref[k]).abs().max()))


@pytest.mark.slow
def test_multi_cpu_accelerate_config_trains_and_saves(tiny_bert, pairs_file, tmp_path):
    from sentence_transformers import SentenceTransformer

    recipe = tiny_recipe(tiny_bert, pairs_file, tmp_path / "run", train={"max_steps": 4, "save_every": 2})
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    cmd = accelerate_launch("multi_cpu.yaml") + ["-m", "embedtrain", "train", str(path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "model saved to" in proc.stdout
    engine = json.loads((tmp_path / "run" / "results.json").read_text())["engine"]
    assert (engine["distributed_type"], engine["processes"]) == ("MULTI_CPU", 2)  # really two processes
    st = SentenceTransformer(str(tmp_path / "run" / "model"), device="cpu")
    assert st.encode(["small tree"]).shape == (1, 32)
    # only the main process wrote: one metrics file, checkpoints at steps 2 and 4
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["step-0000002", "step-0000004"]


@pytest.mark.slow
def test_clip_with_both_towers_and_grad_cache_on_two_processes_equals_one_process(tmp_path):
    """GradCache's last replay touches the image tower only; every trained parameter must still be reduced.
    1e-5: float32 sums of a few hundred terms taken in another order on each side (gather, chunks, all-reduce)."""
    from multimodal_support import write_image_text_rows

    data = write_image_text_rows(tmp_path / "data", n=8)
    worker = str(REPO / "tests" / "integration" / "dist_clip_worker.py")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port())]
    proc = subprocess.run(torchrun + [worker, str(data), str(tmp_path), "2"], capture_output=True, text=True,
                          env=_env(), timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = subprocess.run([sys.executable, worker, str(data), str(tmp_path), "1"], capture_output=True, text=True,
                          env=_env(), timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got, ref = load_file(str(tmp_path / "distributed.safetensors")), load_file(str(tmp_path / "reference.safetensors"))
    assert json.loads((tmp_path / "distributed.json").read_text())["type"] == "DistributedType.MULTI_CPU"
    assert got.keys() == ref.keys()
    assert any(".visual." in k for k in ref) and any(".transformer." in k for k in ref)  # both towers trained
    for k in ref:
        assert torch.allclose(got[k], ref[k], atol=1e-5, rtol=1e-4), (k, float((got[k] - ref[k]).abs().max()))
    a, b = (json.loads((tmp_path / f"{n}.json").read_text())["loss"] for n in ("distributed", "reference"))
    assert abs(a - b) < 1e-5


def test_a_duplicate_text_on_two_processes_is_masked_as_a_false_negative(tmp_path):
    """Global documents are [rank 0's 3 positives, rank 1's 3]; row 1 of each process has the same positive text,
    so each must not see the other's copy as a negative, while every other document stays a candidate."""
    worker = str(REPO / "tests" / "integration" / "dist_masking_worker.py")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port())]
    proc = subprocess.run(torchrun + [worker, str(tmp_path / "masks.json")], capture_output=True, text=True,
                          env=_env(), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    masks = json.loads((tmp_path / "masks.json").read_text())
    assert [m["targets"] for m in masks] == [[0, 1, 2], [3, 4, 5]]
    for rank, other in ((0, 4), (1, 1)):
        keep = masks[rank]["keep"]
        assert keep[1][other] is False  # the same text on the other process
        assert all(keep[r][c] for r in range(3) for c in range(6) if (r, c) != (1, other))


def test_int8_terms_quantize_with_the_whole_batchs_ranges_on_two_processes(tmp_path):
    """Two processes each holding half of the rows give the loss and gradients of one process holding all of them:
    each int8 term takes its ranges over every process's rows, as one process would over its batch."""
    worker = str(REPO / "tests" / "integration" / "dist_compact_int8_worker.py")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port())]
    proc = subprocess.run(torchrun + [worker, str(tmp_path / "out.safetensors")], capture_output=True, text=True,
                          env=_env(), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = load_file(str(tmp_path / "out.safetensors"))
    full = {k: v.clone().requires_grad_(True) for k, v in embeddings().items()}
    loss = compact_int8_loss()(**full)["loss"]
    loss.backward()
    # 1e-6: float32 means of a loss of about 3 over 4 rows and then 2 processes, against one mean over 8 rows (a few
    # ulps); a process quantizing with its own rows' ranges instead moves the loss by about 1e-3
    assert abs((got["0.loss"] + got["1.loss"]) / 2 - loss.detach()) < 1e-6
    for k, v in full.items():
        # each process's gradient is that of the sum of both processes' losses (twice the mean's) for its own rows
        two = torch.cat([got[f"0.{k}"], got[f"1.{k}"]]) / 2
        assert two.shape == (INT8_ROWS, v.shape[1])
        assert torch.allclose(two, v.grad, atol=1e-6, rtol=1e-5), (k, float((two - v.grad).abs().max()))
