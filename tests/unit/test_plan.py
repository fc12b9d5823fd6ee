"""embedtrain plan's pieces: the engine read from an accelerate config, what each engine shards, and the command's
exit status and JSON."""

import json

import pytest

from embedtrain.cli import main
from embedtrain.plan.estimate import (Engine, Work, activation_bytes, engine_from_accelerate_config, estimate,
                                      step_communication)
from embedtrain.plan.model import ModelShape, Tower

from conftest import REPO, tiny_recipe


@pytest.mark.parametrize("config, kind, processes, shards", [
    ("multi_gpu.yaml", "MULTI_GPU", 8, (1, 1, 1)),
    ("fsdp.yaml", "FSDP", 8, (8, 8, 8)),
    ("deepspeed_zero2.yaml", "DEEPSPEED", 8, (1, 8, 8)),
    ("deepspeed_zero3.yaml", "DEEPSPEED", 8, (8, 8, 8)),
    ("fsdp_cpu.yaml", "FSDP", 2, (2, 2, 2)),
])
def test_engines_from_the_shipped_accelerate_configs(config, kind, processes, shards):
    e = engine_from_accelerate_config(str(REPO / "recipes" / "accelerate" / config), None, "bf16")
    assert (e.distributed_type, e.processes) == (kind, processes)
    assert (e.shards["weights"], e.shards["gradients"], e.shards["optimizer"]) == shards
    assert engine_from_accelerate_config(None, 4, "no").distributed_type == "MULTI_GPU"
    assert e.wrap == {"fsdp.yaml": "TRANSFORMER_BASED_WRAP", "fsdp_cpu.yaml": "NO_WRAP"}.get(config)


def _shape(trainable: int) -> ModelShape:
    tower = Tower("text", layers=2, hidden=8, intermediate=32, heads=2, kv_dim=8, gated=False, params=1000,
                  trainable=trainable, backward=True, fused_attention=True, family="vit")
    return ModelShape("test", 1000, 1000, trainable, 4000, 4 * trainable, 100, [tower])


def test_memory_parts_follow_the_engine():
    work = [Work("text", "query", rows=4, length=10)]
    one = estimate(_shape(1000), Engine(), work, "adamw", False, None).memory
    assert (one["weights"], one["gradients"], one["optimizer_states"]) == (4000, 4000, 8000)
    # activations: 2 layers x 40 tokens x (9h + 2f) float32 elements (the 'vit' block), no scores (fused attention)
    assert one["activations"] == 2 * 40 * (9 * 8 + 2 * 32) * 4
    # the peak is the higher of the forward pass's end (weights, states, activations) and the update
    # (weights, gradients, states, temporaries)
    assert one["total"] == 4000 + max(one["activations"] + 8000, 4000 + 8000 + 4000)
    fsdp = estimate(_shape(1000), Engine("FSDP", 4), work, "adamw", False, None).memory
    assert (fsdp["weights"], fsdp["gradients"], fsdp["optimizer_states"], fsdp["fsdp_gathered_blocks"]) == \
        (1000, 1000, 2000, 200)
    ddp = estimate(_shape(1000), Engine("MULTI_GPU", 4), work, "adamw", False, None).memory
    assert ddp["ddp_buckets"] == 4000 and ddp["weights"] == 4000
    # DDP on CPU processes (gloo) keeps the same buckets; one process has none
    assert estimate(_shape(1000), Engine("MULTI_CPU", 2), work, "adamw", False, None).memory == {**ddp}
    assert "ddp_buckets" not in estimate(_shape(1000), Engine("MULTI_CPU", 1), work, "adamw", False, None).memory
    sgd = estimate(_shape(1000), Engine(), work, "sgd", False, None).memory
    assert sgd["optimizer_states"] == 4000


def test_checkpointing_and_grad_cache_bound_activations():
    towers = {"text": _shape(10).towers[0]}
    work = [Work("text", "query", 64, 100), Work("text", "positive", 64, 100)]
    full = activation_bytes(towers, work, 4, checkpointing=False)
    ckpt = activation_bytes(towers, work, 4, checkpointing=True)
    chunked = activation_bytes(towers, work, 4, checkpointing=False, chunks={"query": 8, "positive": 8})
    assert ckpt < full and chunked == full // 16  # one chunk of 8 rows of one role, of 2 x 64 rows in all


def test_plan_command_exit_status_and_json(tiny_bert, tmp_path, capsys):
    labels = tmp_path / "labels.jsonl"
    labels.write_text("".join(json.dumps({"anchor": f"text {i}", "positive": ["a", "b", "c"][i % 3]}) + "\n"
                              for i in range(48)))
    recipe = tiny_recipe(tiny_bert, labels, tmp_path / "run")
    recipe["data"] = {"train": [{"path": str(labels), "name": "labels"}], "batch_size": 16}
    path = tmp_path / "recipe.yaml"
    path.write_text(json.dumps(recipe))
    assert main(["plan", str(path), "--output", str(tmp_path / "plan.json")]) == 0
    plan = json.loads((tmp_path / "plan.json").read_text())
    assert plan["data"]["datasets"][0]["rows_per_epoch"] == 48 and plan["problems"] == []
    # without false-negative masking the three label strings cannot share a batch: a problem, exit 2
    assert main(["plan", str(path), "loss.mask_false_negatives=false"]) == 2
    assert "problem: data.train[0] (labels): yields no full batch of 16 rows" in capsys.readouterr().out


def test_forward_token_budget_plans_the_regrouped_chunks(tiny_bert, pairs_file, tmp_path):
    """The plan regroups each scanned batch's texts as the trainer does: the same real tokens, less padding, so
    less activation memory and fewer FLOPs; a budget below the longest text still plans every text."""
    path = tmp_path / "recipe.yaml"
    path.write_text(json.dumps(tiny_recipe(tiny_bert, pairs_file, tmp_path / "run")))
    plans = {}
    for budget in ("null", "48", "1"):
        out = tmp_path / f"plan-{budget}.json"
        assert main(["plan", str(path), f"train.forward_token_budget={budget}", "--output", str(out)]) == 0
        plans[budget] = json.loads(out.read_text())
    flops = {b: p["compute"]["flops_per_step_per_device"] for b, p in plans.items()}
    memory = {b: p["memory_per_device"]["activations"] for b, p in plans.items()}
    assert flops["48"] < flops["null"] and memory["48"] < memory["null"]
    # one text per chunk: no padding at all, the least compute of the three
    assert flops["1"] < flops["48"] and memory["1"] < memory["48"]


def test_mined_negatives_are_planned_at_their_rows_positive_length(tiny_bert, pairs_file, tmp_path, capsys):
    """A mined negative is another row's positive, unknown before training: the plan counts it at the length of its
    row's positive, which is what a dataset whose negative column repeats the positive gets planned as."""
    rows = [json.loads(line) for line in pairs_file.read_text().splitlines()]
    copied = tmp_path / "copied.jsonl"
    copied.write_text("".join(json.dumps({**r, "negative": r["positive"]}) + "\n" for r in rows))
    plans = {}
    for name, data, mined in (("mined", pairs_file, {"num_negatives": 1, "every": 4}), ("copied", copied, None)):
        recipe = tiny_recipe(tiny_bert, data, tmp_path / "run", train={"max_steps": 10})
        recipe["data"]["train"][0]["negative_columns"] = [] if mined else ["negative"]
        recipe["data"]["mined_negatives"] = mined
        recipe["data"]["length_grouping"] = False  # grouping counts a dataset's own negatives: the same batches
        path = tmp_path / f"{name}.yaml"
        path.write_text(json.dumps(recipe))
        assert main(["plan", str(path), "--output", str(tmp_path / f"{name}.json")]) == 0
        plans[name] = json.loads((tmp_path / f"{name}.json").read_text())
    for part in ("compute", "memory_per_device"):
        key = "flops_per_step_per_device" if part == "compute" else "activations"
        assert plans["mined"][part][key] == plans["copied"][part][key]
    # steps 0, 4 and 8 mine; each mining embeds the 256 distinct queries and 256 distinct positives, and scores each
    # of the 256 rows against the 256 positives
    mined = plans["mined"]["data"]["mined_negatives"]
    assert (mined["minings"], mined["texts_per_mining"], mined["scores_per_mining"]) == (3, 512, 256 * 256)
    tower = plans["mined"]["model"]["towers"][0]
    length = mined["mean_tokens_per_text"]
    forward = 2.0 * tower["params"] * 512 * length + 4.0 * tower["layers"] * 512 * length ** 2 * tower["hidden"]
    assert mined["flops_per_mining_main_device"] == pytest.approx(forward + 2.0 * 256 * 256 * tower["hidden"])
    assert 4 <= length <= 32  # the tiny recipe's texts: a few words each, max_length 32
    assert "mined negatives: 3 mining(s), each a forward pass over 512 texts" in capsys.readouterr().out


def test_communication_per_engine_and_step_kind():
    """Buffers per step on a model of 4000 bytes, 3600 of them in blocks (2000 trainable, 1800 of them in blocks);
    two roles of 8 rows. tests/integration/test_plan_communication.py holds the same rules to a real step."""
    shape = _shape(500)
    shape.towers[0].block_bytes, shape.towers[0].block_trainable_bytes = 3600, 1800
    work = [Work("text", "query", 8, 10), Work("text", "positive", 8, 10)]
    chunks = {"query": 4, "positive": 4}  # 2 chunks per role: 4 backward passes
    assert step_communication(shape, Engine(), work, None)["sent"] == 0  # one process
    ddp = step_communication(shape, Engine("MULTI_GPU", 4), work, chunks)
    assert (ddp["all_reduce"], ddp["sent"]) == (2000, 2 * 3 * 2000 // 4)  # once a step, GradCache or not
    whole = step_communication(shape, Engine("FSDP", 4, wrap="NO_WRAP"), work, None)
    assert (whole["all_gather"], whole["reduce_scatter"]) == (4000, 2000)  # gathered once, kept to the backward
    blocks = step_communication(shape, Engine("FSDP", 4, wrap="TRANSFORMER_BASED_WRAP"), work, None)
    # blocks: 2 forward + 2 backward calls; the root (400 bytes) once; one reduce-scatter of every trainable byte
    assert (blocks["all_gather"], blocks["reduce_scatter"]) == (3600 * 4 + 400, 2000)
    cached = step_communication(shape, Engine("FSDP", 4, wrap="TRANSFORMER_BASED_WRAP"), work, chunks)
    # 4 chunks, each: first pass, replay, backward; the root once per replay; a reduce-scatter per replay
    assert (cached["all_gather"], cached["reduce_scatter"]) == (3600 * 12 + 400 * 4, 2000 * 4)
    assert cached["sent"] == 3 * (cached["all_gather"] + cached["reduce_scatter"]) // 4
    zero2 = step_communication(shape, Engine("DEEPSPEED", 4, zero_stage=2), work, None)
    assert (zero2["reduce_scatter"], zero2["all_gather"]) == (2000, 2000)
    zero3 = step_communication(shape, Engine("DEEPSPEED", 4, zero_stage=3), work, None)
    assert zero3 == blocks


def test_plan_reports_communication_and_refuses_bad_rates(tiny_bert, pairs_file, tmp_path, capsys):
    path = tmp_path / "recipe.yaml"
    path.write_text(json.dumps(tiny_recipe(tiny_bert, pairs_file, tmp_path / "run")))
    out = tmp_path / "plan.json"
    assert main(["plan", str(path), "--devices", "2", "--link-gbs", "100", "--output", str(out)]) == 0
    c = json.loads(out.read_text())["communication"]
    assert c["bytes_per_step"]["all_reduce"] > 0 and c["seconds_per_step"] == c["bytes_per_step"]["sent"] / 100e9
    assert "communication: " in capsys.readouterr().out
    for flag, value in (("--link-gbs", "0"), ("--mfu", "1.5"), ("--device-tflops", "-1")):
        assert main(["plan", str(path), flag, value]) == 2
        assert f"{flag} " in capsys.readouterr().err


def test_plan_lists_what_the_engine_cannot_run(tiny_bert, pairs_file, tmp_path, capsys):
    """What `embedtrain train` would refuse under the accelerate config's engine (before loading the model) is a
    plan problem: averaging under sharding, a learnable temperature under DeepSpeed (FSDP takes it)."""
    from embedtrain.train.accelerator import engine_problems

    path = tmp_path / "recipe.yaml"
    path.write_text(json.dumps(tiny_recipe(tiny_bert, pairs_file, tmp_path / "run")))
    fsdp, zero3 = (str(REPO / "recipes" / "accelerate" / f) for f in ("fsdp.yaml", "deepspeed_zero3.yaml"))
    assert main(["plan", str(path), "train.ema_decay=0.99", "--accelerate-config", fsdp]) == 2
    assert ("problem: train.ema_decay: an exponential moving average of the weights is not available under FSDP"
            in capsys.readouterr().out)
    assert main(["plan", str(path), "loss.learnable_temperature=true", "--accelerate-config", fsdp]) == 0
    capsys.readouterr()
    assert main(["plan", str(path), "loss.learnable_temperature=true", "train.average_last_checkpoints=3",
                 "train.save_every=5", "--accelerate-config", zero3]) == 2
    out = capsys.readouterr().out
    assert "problem: loss: a learnable temperature or bias (log_scale) is not available under DeepSpeed" in out
    assert "problem: train.average_last_checkpoints: averaging checkpoints is not available under DEEPSPEED" in out

    class Train:
        ema_decay, average_last_checkpoints = None, 1

    assert engine_problems("MULTI_GPU", Train, ["log_scale"]) == []
    assert engine_problems("FSDP", Train, ["log_scale"]) == []


def test_plan_counts_lora_on_a_text_encoder_and_shards_it(tiny_bert, pairs_file, tmp_path, capsys):
    """LoRA on a sentence-transformers text encoder: the plan counts only the adapters as trainable, and plans it
    under FSDP with no problem (the folder is merged from the gathered weights: tests/integration/test_fsdp.py)."""
    path = tmp_path / "recipe.yaml"
    path.write_text(json.dumps(tiny_recipe(tiny_bert, pairs_file, tmp_path / "run")))
    lora = "model.lora={r: 4, alpha: 8, target_modules: [query, value]}"
    out = tmp_path / "plan.json"
    assert main(["plan", str(path), lora, "--output", str(out)]) == 0
    params = json.loads(out.read_text())["model"]
    hidden, layers = 32, 2  # tests/conftest.py's tiny BERT
    assert params["trainable"] == layers * 2 * (4 * hidden + hidden * 4)  # A (4 x 32) and B (32 x 4), query and value
    fsdp = str(REPO / "recipes" / "accelerate" / "fsdp.yaml")
    capsys.readouterr()
    assert main(["plan", str(path), lora, "--accelerate-config", fsdp]) == 0
    printed = capsys.readouterr().out
    assert "FSDP" in printed and "problem" not in printed
