"""The model.moe recipe section and eval.tasks[*].domain: defaults, checks reported with the others, info."""

import pytest

from embedtrain.cli import main
from embedtrain.config import moe_domains, recipe_from_dict
from embedtrain.errors import ConfigError

from conftest import tiny_recipe, write_pairs


@pytest.fixture
def two_domains(tiny_bert, tmp_path):
    recipe = tiny_recipe(tiny_bert, write_pairs(tmp_path / "a" / "train.jsonl", 16), tmp_path / "run")
    recipe["data"]["train"].append({"path": str(write_pairs(tmp_path / "b" / "train.jsonl", 16, seed=1)), "name": "b"})
    recipe["data"]["train"][0]["name"] = "a"
    recipe["model"]["moe"] = {}
    return recipe


def test_empty_moe_section_means_defaults(two_domains):
    r = recipe_from_dict(two_domains)
    assert r.model.moe is not None and r.model.moe.routing == "enforced" and r.model.moe.router
    assert moe_domains(r) == ["a", "b"]
    del two_domains["model"]["moe"]
    assert recipe_from_dict(two_domains).model.moe is None


def test_moe_problems_are_reported_together(two_domains):
    two_domains["model"]["moe"].update(domains=["a", "a"], top_k=3, router_lr=0, load_balancing_weight=-1,
                                       routin="learned")
    two_domains["eval"]["tasks"] = [{"path": "nope", "domain": "c"}]
    with pytest.raises(ConfigError) as err:
        recipe_from_dict(two_domains)
    text = "\n".join(err.value.problems)
    assert "model.moe.routin: unknown key (did you mean 'routing'?)" in text
    two_domains["model"]["moe"].pop("routin")
    with pytest.raises(ConfigError) as err:
        recipe_from_dict(two_domains)
    text = "\n".join(err.value.problems)
    for expected in ("model.moe.domains: ['a', 'a'] names a domain twice",
                     "data.train[1].name: 'b' is not a domain of model.moe.domains (a, a)",
                     "model.moe.top_k: must be between 1 and 2", "model.moe.router_lr: must be positive or null",
                     "model.moe.load_balancing_weight: must be 0 or more",
                     "eval.tasks[0].domain: 'c' is not a domain", "eval.tasks[0].path: folder nope does not exist"):
        assert expected in text, (expected, text)


def test_info_lists_the_moe_fields(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "\nmodel.moe:\n" in out and "  router_lr = 0.001  # Learning rate of the router" in out
    assert "\neval.tasks[*]:\n" in out and "  domain = None  # MoE models: route this task" in out
