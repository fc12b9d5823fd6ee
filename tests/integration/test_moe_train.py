"""Short real trainings of a tiny BERT upcycled into domain experts (model.moe): each batch reaches its
dataset's expert only, the router learns the domains, GradCache and resume stay exact, bad recipes fail
on one line, and two processes train an MoE under DDP."""

import json
import random
import shutil
import subprocess
import sys

import pytest
import torch
import yaml
from safetensors.torch import load_file

from embedtrain.cli import main
from embedtrain.config import recipe_from_dict
from embedtrain.models import load_text_encoder
from embedtrain.models.moe import upcycle_encoder
from embedtrain.train.loop import train

from conftest import REPO, free_port, subprocess_env, tiny_recipe, write_beir
from helpers_parity import grads, make_batch, slice_batch, step

NATURE = "small large animal plant tree fruit water river city red blue green light dark".split()
TECH = "tool machine computer program data network word language number open close write read build".split()


def write_domain_pairs(path, words, rows, seed):
    """Pairs whose texts use only ``words`` (so the router can tell the domains apart)."""
    rng = random.Random(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for i in range(rows):
            key = [rng.choice(words) for _ in range(3)]
            f.write(json.dumps({
                "anchor": " ".join(key + [rng.choice(words) for _ in range(rng.randint(1, 5))]),
                "positive": " ".join(reversed(key)) + f" {i}",
                "negative": " ".join(rng.choice(words) for _ in range(3)) + f" n{i}",
            }) + "\n")
    return path


@pytest.fixture(scope="module")
def domains(tmp_path_factory):
    root = tmp_path_factory.mktemp("moe-data")
    return {
        "nature": write_domain_pairs(root / "nature" / "train.jsonl", NATURE, 96, seed=1),
        "tech": write_domain_pairs(root / "tech" / "train.jsonl", TECH, 96, seed=2),
        "eval": write_beir(root / "eval"),
    }


def moe_recipe(model, domains, out, moe=None, **sections):
    recipe = tiny_recipe(model, domains["nature"], out, **sections)
    recipe["data"]["train"] = [
        {"path": str(domains[name]), "name": name, "negative_columns": ["negative"]} for name in ("nature", "tech")
    ]
    recipe["data"]["mixing"] = "round_robin"
    recipe["model"]["moe"] = {} if moe is None else moe
    return recipe


def run(recipe, resume=None):
    return train(recipe_from_dict(recipe), resume=resume, log=lambda *_: None)


def test_enforced_training_specialises_the_experts(tiny_bert, domains, tmp_path):
    from sentence_transformers import SentenceTransformer

    recipe = moe_recipe(tiny_bert, domains, tmp_path / "run", moe={"router_lr": 0.05},
                        train={"max_steps": 24, "lr": 1e-3, "log_every": 6})
    recipe["eval"]["tasks"] = [{"path": str(domains["eval"]), "name": "by-domain", "domain": "nature"},
                               {"path": str(domains["eval"]), "name": "by-router"}]
    result = run(recipe)
    assert {"by-domain/ndcg@10", "by-router/ndcg@10"} <= set(result.final)

    lines = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    logged = [l for l in lines if "loss" in l]
    assert all(l["moe/share/nature"] == l["moe/share/tech"] == 0.5 for l in logged)  # round robin, 4 steps a line
    assert logged[-1]["moe/router_accuracy"] >= 0.9, logged[-1]

    dense = load_file(str(tiny_bert / "model.safetensors"))
    saved = load_file(str(result.model_dir / "model.safetensors"))
    for layer in (0, 1):
        prefix = f"encoder.layer.{layer}.intermediate.experts"
        for e in (0, 1):
            assert not torch.equal(saved[f"{prefix}.{e}.up.weight"], dense[f"encoder.layer.{layer}.intermediate.dense.weight"])
        assert not torch.allclose(saved[f"{prefix}.0.up.weight"], saved[f"{prefix}.1.up.weight"])

    model = load_text_encoder(str(result.model_dir))
    assert model.predict_domains(["river tree water", "computer program data"], role="query") == ["nature", "tech"]
    st = SentenceTransformer(str(result.model_dir), device="cpu", trust_remote_code=True)
    texts = ["green river light", "open the network"]
    for domain in ("nature", "tech"):
        ours = model.encode(texts, domain=domain)
        assert torch.allclose(ours, st.encode(texts, domain=domain, convert_to_tensor=True), atol=1e-5)


def test_learned_top2_routing_trains(tiny_bert, domains, tmp_path):
    recipe = moe_recipe(tiny_bert, domains, tmp_path / "run",
                        moe={"routing": "learned", "top_k": 2, "domain_tokens": True, "layers": [-1]},
                        train={"max_steps": 6, "lr": 3e-3, "log_every": 3})
    result = run(recipe)
    lines = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all(l["loss"] is not None and l["moe/auxiliary_loss"] > 0 for l in lines if "loss" in l)
    model = load_text_encoder(str(result.model_dir))
    assert model.settings.routing == "learned" and model.settings.top_k == 2 and model.settings.layers == [1]
    assert torch.isfinite(model.encode(["green river light"])).all()


def test_grad_cache_gives_the_plain_step_gradients(tiny_bert_no_dropout):
    """GradCache replays each chunk under the same routing; the router's own loss is averaged per forward
    pass (so per chunk), and its input is detached, so every other gradient matches the plain step."""
    results = []
    for chunk in (None, 3):
        model = upcycle_encoder(load_text_encoder(str(tiny_bert_no_dropout), max_length=32), ["a", "b"])
        model.train()
        batch = slice_batch(make_batch(model.tokenizer, 8), 0, 8)
        with model.routed_to("b"):
            loss = step(model, batch, {"chunk": chunk, "loss": {}}, gather=False)
        results.append((loss, {k: v for k, v in grads(model).items() if "moe_router" not in k}))
    (plain_loss, plain), (cached_loss, cached) = results
    # 1e-6 / 1e-5 + 1e-4 relative: GradCache takes the same float32 sums chunk by chunk, in another order
    assert abs(plain_loss - cached_loss) < 1e-6
    assert plain.keys() == cached.keys() and any(".experts.1." in k for k in plain)
    assert not any(".experts.0." in k for k in plain)
    for k in plain:
        assert torch.allclose(plain[k], cached[k], atol=1e-5, rtol=1e-4), k


@pytest.mark.parametrize("chunk", [None, 3])
@pytest.mark.parametrize("routing", ["enforced", "learned"])
def test_gradient_checkpointing_gives_the_weights_of_plain_training(routing, chunk, tiny_bert_no_dropout, domains,
                                                                     tmp_path):
    """A plain step embeds queries, positives and negatives in separate forward passes before its backward pass;
    under learned routing each pass is routed its own way, so a recomputed layer must use its own pass's routing
    (with the routing left as the last pass set it, the learned runs end elsewhere: checked). GradCache replays a
    chunk and goes backward at once. Four steps with gradient checkpointing end at the weights of four without,
    bit for bit (the same operations in the same order; tests/unit/models/test_moe.py checks one step's gradients
    the same way)."""
    moe = {"routing": routing, **({"top_k": 2} if routing == "learned" else {})}
    common = dict(train={"max_steps": 4, "lr": 3e-3, "gradient_cache_chunk_size": chunk})
    plain = run(moe_recipe(tiny_bert_no_dropout, domains, tmp_path / "plain", moe=moe, **common))
    recipe = moe_recipe(tiny_bert_no_dropout, domains, tmp_path / "checkpointed", moe=moe, **common)
    recipe["model"]["gradient_checkpointing"] = True
    checkpointed = run(recipe)
    a = load_file(str(plain.model_dir / "model.safetensors"))
    b = load_file(str(checkpointed.model_dir / "model.safetensors"))
    dense = load_file(str(tiny_bert_no_dropout / "model.safetensors"))
    assert a.keys() == b.keys() and any(".experts.1." in k for k in a)
    assert not torch.equal(a["encoder.layer.0.intermediate.experts.1.up.weight"],
                           dense["encoder.layer.0.intermediate.dense.weight"])  # trained
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("lora", [False, True])
def test_resume_gives_identical_weights(lora, tiny_bert, domains, tmp_path):
    common = dict(train={"max_steps": 6, "save_every": 3, "keep_last": 5, "gradient_cache_chunk_size": 3})
    moe = {"domain_tokens": not lora}  # LoRA refuses domain tokens (their embeddings would stay frozen)

    def recipe(out):
        r = moe_recipe(tiny_bert, domains, out, moe=moe, **common)
        if lora:  # the adapters and the router in the checkpoint, the frozen experts rebuilt
            r["model"]["lora"] = {"r": 4, "alpha": 8, "dropout": 0.1, "target_modules": ["query", "up", "down"]}
        return r

    full = run(recipe(tmp_path / "full"))
    interrupted = tmp_path / "interrupted"
    run(recipe(interrupted))
    shutil.rmtree(interrupted / "model")
    (interrupted / "results.json").unlink()
    shutil.rmtree(interrupted / "checkpoints" / "step-0000006")
    resumed = run(recipe(interrupted), resume="auto")
    a, b = load_file(str(full.model_dir / "model.safetensors")), load_file(str(resumed.model_dir / "model.safetensors"))
    assert a.keys() == b.keys() and any("experts.1" in k for k in a)
    # 1e-6: a resumed run repeats the same operations in the same order on one thread
    assert max(float((a[k] - b[k]).abs().max()) for k in a) <= 1e-6


def test_continuing_a_saved_moe_model(tiny_bert, domains, tmp_path):
    first = run(moe_recipe(tiny_bert, domains, tmp_path / "first", train={"max_steps": 2}))
    recipe = moe_recipe(first.model_dir, domains, tmp_path / "second", moe={"router_loss_weight": 0.1},
                        train={"max_steps": 2})
    second = run(recipe)
    model = load_text_encoder(str(second.model_dir))
    assert model.settings.router_loss_weight == 0.1 and model.domains == ["nature", "tech"]
    recipe = moe_recipe(first.model_dir, domains, tmp_path / "third", moe={"domains": ["nature", "tech", "x"]},
                        train={"max_steps": 2})
    recipe["data"]["train"][1]["name"] = "tech"
    with pytest.raises(Exception, match="has experts for"):
        run(recipe)


@pytest.mark.parametrize("case", ["one_domain", "unknown_dataset_domain", "eval_domain", "top_k",
                                  "eval_domain_dense", "learned_without_router", "lora_domain_tokens"])
def test_bad_moe_recipe_is_one_line(case, tiny_bert, domains, tmp_path, capsys):
    out = tmp_path / "out"
    recipe = moe_recipe(tiny_bert, domains, out)
    expect = {
        "one_domain": "model.moe.domains: an MoE needs at least 2 domains, one expert each; got ['nature']",
        "unknown_dataset_domain": "data.train[1].name: 'tech' is not a domain of model.moe.domains (nature, web)",
        "eval_domain": "eval.tasks[0].domain: 'natrue' is not a domain (did you mean 'nature'?)",
        "top_k": "model.moe.top_k: 2 experts per text needs routing: learned",
        "eval_domain_dense": "eval.tasks[0].domain: routing to a domain needs an MoE model",
        "learned_without_router": "model.moe.router: learned routing needs the router",
        "lora_domain_tokens": "model.moe.domain_tokens: not available with model.lora (the domain tokens' embeddings "
                              "would stay frozen at their random start)",
    }[case]
    if case == "one_domain":
        recipe["data"]["train"] = recipe["data"]["train"][:1]
    elif case == "unknown_dataset_domain":
        recipe["model"]["moe"]["domains"] = ["nature", "web"]
    elif case in ("eval_domain", "eval_domain_dense"):
        recipe["eval"]["tasks"] = [{"path": str(domains["eval"]), "domain": "natrue" if case == "eval_domain" else "nature"}]
        if case == "eval_domain_dense":
            del recipe["model"]["moe"]
    elif case == "top_k":
        recipe["model"]["moe"]["top_k"] = 2
    elif case == "learned_without_router":
        recipe["model"]["moe"].update(routing="learned", router=False)
    elif case == "lora_domain_tokens":
        recipe["model"]["moe"]["domain_tokens"] = True
        recipe["model"]["lora"] = {"target_modules": ["query", "up"]}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    code = main(["train", str(path)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and err[0].startswith("error: ") and expect in err[0], err
    assert not out.exists()


@pytest.mark.slow
def test_two_processes_train_an_moe(tiny_bert_no_dropout, domains, tmp_path):
    """DDP with experts that get no gradient in a step (find_unused_parameters), against one process
    holding the whole batch: the same weights."""
    common = dict(train={"max_steps": 4, "lr": 3e-3})
    single = moe_recipe(tiny_bert_no_dropout, domains, tmp_path / "one", **common)
    double = moe_recipe(tiny_bert_no_dropout, domains, tmp_path / "two", **common)
    single["data"]["batch_size"], double["data"]["batch_size"] = 8, 4  # the same global batch
    path = tmp_path / "two.yaml"
    path.write_text(yaml.safe_dump(double))
    env = subprocess_env()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           "-m", "embedtrain", "train", str(path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    one = run(single)
    a = load_file(str(one.model_dir / "model.safetensors"))
    b = load_file(str(tmp_path / "two" / "model" / "model.safetensors"))
    assert a.keys() == b.keys()
    assert max(float((a[k] - b[k]).abs().max()) for k in a) <= 1e-4


def test_experiment_script_writes_every_row(tiny_bert, domains, tmp_path, capsys):
    import importlib.util

    spec = importlib.util.spec_from_file_location("moe_experiment", REPO / "scripts" / "moe_experiment.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    data = tmp_path / "data"
    for name, source in (("wordnet", domains["nature"]), ("foldoc", domains["tech"])):
        (data / name).mkdir(parents=True)
        shutil.copy(source, data / name / "train.jsonl")
        shutil.copytree(domains["eval"], data / name / "eval")
    args = ["--quick", "--data", str(data), "--base-model", str(tiny_bert), "--output", str(tmp_path / "exp")]
    assert script.main(args) == 0
    results = json.loads((tmp_path / "exp" / "results.json").read_text())
    rows = [r["row"] for r in results["rows"]]
    assert rows == ["base", "dense_joint", "wordnet_only", "foldoc_only", "moe_enforced", "moe_enforced_router",
                    "moe_learned"]
    for r in results["rows"]:
        assert set(r["scores"]) == {"wordnet", "foldoc"} and 0 <= r["mean_ndcg@10"] <= 1
        assert r.get("steps", 0) == (0 if r["row"] == "base" else 2)
    routing = results["rows"][5]["routing"]
    assert sum(routing["wordnet"]["query"].values()) == results["settings"]["split_sizes"]["wordnet"]["queries"]
    assert set(results["comparison"]) == {"moe_enforced", "dense_joint", "moe_at_least_dense_joint"}
    table = (tmp_path / "exp" / "results.md").read_text()
    assert table.count("\n| ") >= 9 and "Router at inference" in table
    assert "MoE, learned routing (no domain given)" in capsys.readouterr().out
    # again: every trained row is reused
    assert script.main(args + ["--rows", "moe_enforced"]) == 0
    again = json.loads((tmp_path / "exp" / "results.json").read_text())
    assert again["rows"][0]["trained_now"] is False

    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n\n{script.README_START}\nold table\n{script.README_END}\n\n## next\n")
    script.update_readme(readme, table)
    assert readme.read_text() == f"# x\n\n{script.README_START}\n{table}{script.README_END}\n\n## next\n"


def test_cli_run_writes_a_card_that_says_how_to_load_and_route(tiny_bert, domains, tmp_path, capsys):
    recipe = moe_recipe(tiny_bert, domains, tmp_path / "run", train={"max_steps": 2})
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    assert main(["train", str(path)]) == 0
    card = (tmp_path / "run" / "model" / "README.md").read_text()
    assert "SentenceTransformer(path, trust_remote_code=True)" in card
    assert 'domain="nature"' in card and "router picks one" in card


def test_first_step_equals_the_dense_models_first_step(tiny_bert, domains, tmp_path):
    """Same seed, same data order and the same dropout masks: after one step the upcycled model holds
    the dense model's weights (the routed expert as the dense block, the other expert untouched)."""
    common = dict(train={"max_steps": 1, "log_every": 1, "lr": 1e-3})
    dense_recipe = moe_recipe(tiny_bert, domains, tmp_path / "dense", **common)
    del dense_recipe["model"]["moe"]
    dense = run(dense_recipe)
    moe = run(moe_recipe(tiny_bert, domains, tmp_path / "moe", **common))
    losses = [next(json.loads(l) for l in (tmp_path / name / "metrics.jsonl").read_text().splitlines() if '"loss"' in l)
              for name in ("dense", "moe")]
    assert abs(losses[0]["loss"] - losses[1]["loss"]) < 1e-6
    first = 0 if losses[1]["moe/share/nature"] == 1.0 else 1
    a = load_file(str(dense.model_dir / "model.safetensors"))
    b = load_file(str(moe.model_dir / "model.safetensors"))
    start = load_file(str(tiny_bert / "model.safetensors"))
    renamed = {"up": "intermediate.dense", "down": "output.dense"}
    for key, value in b.items():
        if "moe_router" in key:
            continue
        if ".experts." in key:  # encoder.layer.L.intermediate.experts.E.(up|down).(weight|bias)
            parts = key.split(".")
            layer, expert, proj, kind = parts[2], int(parts[5]), parts[6], parts[7]
            dense_key = f"encoder.layer.{layer}.{renamed[proj]}.{kind}"
            expected = a[dense_key] if expert == first else start[dense_key]
        else:
            expected = a[key]
        assert torch.allclose(value, expected, atol=1e-6), key


@pytest.mark.parametrize("family", ["qwen2", "mistral", "qwen2+lora"])
def test_a_causal_decoder_is_upcycled_by_the_trainer(family, domains, tmp_path):
    """A decoder read as a sentence-transformers model (causal attention, last-token pooling) trains as an MoE:
    its `mlp` blocks become experts, each expert learns its own domain, the router learns to tell the domains
    apart, and the saved folder gives the same embeddings in sentence-transformers. Qwen2's tokenizer adds no
    special token (the domain token goes first), Mistral's adds <s> (the domain token goes after it). With LoRA
    (the recipe's default targets: every projection, the experts' included; no domain tokens) the experts part
    through their own adapters."""
    from sentence_transformers import SentenceTransformer

    from nvembed_support import save_tiny_decoder

    lora = family.endswith("+lora")
    family = family.removesuffix("+lora")
    model_dir = save_tiny_decoder(tmp_path / family, family)
    recipe = moe_recipe(model_dir, domains, tmp_path / "run", moe={"domain_tokens": not lora, "router_lr": 0.05},
                        train={"max_steps": 12, "lr": 1e-2 if lora else 1e-3, "log_every": 6})
    recipe["model"]["pooling"] = "last_token"
    if lora:
        recipe["model"]["lora"] = {"r": 4, "alpha": 8, "dropout": 0.0}
    result = run(recipe)

    lines = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    logged = [l for l in lines if "loss" in l]
    assert all(l["moe/share/nature"] == l["moe/share/tech"] == 0.5 for l in logged)
    dense = load_file(str(model_dir / "model.safetensors"))
    saved = load_file(str(result.model_dir / "model.safetensors"))
    for layer in (0, 1):
        name = f"layers.{layer}.mlp.{{}}up_proj.weight"
        experts = [saved[name.format(f"experts.{e}.")] for e in (0, 1)]
        assert all(not torch.equal(w, dense[name.format("")]) for w in experts)  # both trained
        assert not torch.allclose(experts[0], experts[1])  # and apart
    model = load_text_encoder(str(result.model_dir))
    assert model.settings.domain_token_offset == (1 if family == "mistral" else 0) or lora
    st = SentenceTransformer(str(result.model_dir), device="cpu", trust_remote_code=True)
    texts = ["green river light", "open the network"]
    for domain in ("nature", "tech"):
        ours = model.encode(texts, domain=domain)
        assert torch.allclose(ours, st.encode(texts, domain=domain, convert_to_tensor=True), atol=1e-5)


@pytest.mark.parametrize("routing", ["enforced", "learned"])
def test_lora_gives_each_expert_adapters_of_its_own(routing, tiny_bert, domains, tmp_path):
    """model.lora with model.moe: the adapters come after upcycling, so each expert's targeted layers get their own
    and the experts part while their base weights stay frozen; the router trains in full. The saved folder holds
    the merged weights (experts that now differ, the router trained, every other weight the dense model's), and
    sentence-transformers gives embedtrain's embeddings for each domain."""
    from sentence_transformers import SentenceTransformer

    from lora_support import TEXTS

    moe = {"routing": routing, **({"top_k": 2} if routing == "learned" else {})}
    lora = {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["query", "value", "up", "down"]}
    recipe = moe_recipe(tiny_bert, domains, tmp_path / "run", moe=moe, train={"max_steps": 8, "lr": 5e-3})
    recipe["model"]["lora"] = lora
    result = train(recipe_from_dict(recipe), log=lambda *_: None)
    prepared = upcycle_encoder(load_text_encoder(str(tiny_bert)), ["nature", "tech"], **moe)
    prepared.add_lora(lora["r"], lora["alpha"], lora["dropout"], lora["target_modules"])
    trains = {n: p.numel() for n, p in prepared.named_parameters() if p.requires_grad}
    assert trains and all("lora_" in n or "moe_router" in n for n in trains)
    assert any(".experts.1." in n for n in trains) and any("moe_router" in n for n in trains)
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["trainable_parameters"] == sum(trains.values())
    path, plan = tmp_path / "recipe.yaml", tmp_path / "plan.json"  # embedtrain plan counts what the trainer trains
    path.write_text(yaml.safe_dump(recipe))
    assert main(["plan", str(path), "--output", str(plan)]) == 0
    assert json.loads(plan.read_text())["model"]["trainable"] == results["trainable_parameters"]
    dense = load_file(str(tiny_bert / "model.safetensors"))
    saved = load_file(str(result.model_dir / "model.safetensors"))
    assert not any("lora_" in k for k in saved)
    changed = {k for k in saved if k in dense and not torch.equal(saved[k], dense[k])}
    assert changed and all(k.endswith(("query.weight", "value.weight")) for k in changed), sorted(changed)
    for layer in (0, 1):  # the experts start as copies of the dense block and part through their adapters
        prefix = f"encoder.layer.{layer}.intermediate.experts"
        up = [saved[f"{prefix}.{e}.up.weight"] for e in (0, 1)]
        assert not torch.equal(up[0], up[1])
        base = dense[f"encoder.layer.{layer}.intermediate.dense.weight"]
        assert all(not torch.equal(u, base) for u in up)
        # biases are not adapted: still the dense block's
        assert torch.equal(saved[f"{prefix}.1.up.bias"], dense[f"encoder.layer.{layer}.intermediate.dense.bias"])
    router = [k for k in saved if "moe_router" in k]
    fresh = upcycle_encoder(load_text_encoder(str(tiny_bert)), ["nature", "tech"], **moe).backbone.state_dict()
    assert router and any(not torch.equal(saved[k], fresh[k]) for k in router)  # trained (it starts the same)

    assert (result.model_dir / "adapter" / "adapter_model.safetensors").is_file()
    card = (result.model_dir / "README.md").read_text()
    assert "| LoRA | r 4, alpha 8 on `down`, `query`, `up`, `value`: merged into the weights; the adapter alone is in " \
           "`adapter/` (peft) |" in card
    model = load_text_encoder(str(result.model_dir))
    assert model.settings.routing == routing
    st = SentenceTransformer(str(result.model_dir), device="cpu", trust_remote_code=True)
    for domain in ("nature", "tech"):
        ours = model.encode(TEXTS, domain=domain)
        torch.testing.assert_close(st.encode(TEXTS, domain=domain, convert_to_tensor=True), ours, rtol=0, atol=1e-6)


def test_lora_that_adapts_no_expert_is_one_line(tiny_bert, domains, tmp_path, capsys):
    recipe = moe_recipe(tiny_bert, domains, tmp_path / "out")
    recipe["model"]["lora"] = {"r": 4, "alpha": 8, "target_modules": ["query", "value"]}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    assert main(["train", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: model.lora.target_modules: no layer of the experts is among query, value, so the experts "
                   "would stay identical copies; add some of theirs: down, up"], err
