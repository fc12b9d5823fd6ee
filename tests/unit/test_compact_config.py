"""loss.compact: defaults, every problem at once with its dotted path, and the CLI override form."""

import pytest

from embedtrain.config import recipe_from_dict
from embedtrain.config.compact import compact_dims, compact_weights
from embedtrain.errors import ConfigError

from conftest import tiny_recipe


@pytest.fixture
def recipe_dict(tiny_bert, pairs_file, tmp_path):
    return tiny_recipe(tiny_bert, pairs_file, tmp_path / "run")


def test_off_by_default_and_defaults_fill_in(recipe_dict):
    assert recipe_from_dict(recipe_dict).loss.compact is None
    recipe_dict["loss"]["compact"] = {"dims": [32, 16]}
    c = recipe_from_dict(recipe_dict).loss.compact
    assert c.precisions == ["float32"] and compact_weights(c) == ([1.0, 1.0], [1.0])
    recipe_dict["loss"]["compact"] = {"precisions": ["binary"]}
    assert compact_dims(recipe_from_dict(recipe_dict).loss.compact) == [None]  # the whole embedding


def test_every_problem_is_reported_with_its_path(recipe_dict):
    recipe_dict["loss"]["compact"] = {"dims": [32, 0, 32], "dim_weights": [1.0], "precisions": ["binery", "int8"],
                                      "precision_weights": [1.0, -1.0], "rescore_top_k": 0, "rescore_weight": -0.5,
                                      "binary_gradient": "tahn"}
    with pytest.raises(ConfigError) as err:
        recipe_from_dict(recipe_dict)
    text = "\n".join(err.value.problems)
    assert "loss.compact.dims: every prefix must be at least 1" in text
    assert "loss.compact.dims: [32, 0, 32] names a prefix twice" in text
    assert "loss.compact.dim_weights: 1 weights for 3 dims" in text
    assert "loss.compact.precisions: 'binery' is not a precision (did you mean 'binary'?)" in text
    assert "loss.compact.precision_weights: weights must be 0 or more" in text
    assert "loss.compact.rescore_top_k: must be at least 1" in text
    assert "loss.compact.rescore_weight: must be 0 or more, got -0.5" in text
    assert "loss.compact.binary_gradient: 'tahn' is not a rule (did you mean 'tanh'?); choose from identity, tanh" in text


def test_a_binary_gradient_without_binary_terms_is_refused(recipe_dict):
    recipe_dict["loss"]["compact"] = {"precisions": ["float32", "int8"], "binary_gradient": "tanh"}
    with pytest.raises(ConfigError, match="loss.compact.binary_gradient: tanh changes the gradient of binary codes"):
        recipe_from_dict(recipe_dict)
    recipe_dict["loss"]["compact"]["precisions"] = ["float32", "binary"]
    assert recipe_from_dict(recipe_dict).loss.compact.binary_gradient == "tanh"


def test_a_basis_needs_a_centre_and_binary_codes_a_rotation(recipe_dict):
    recipe_dict["loss"]["compact"] = {"precisions": ["float32", "binary"], "basis": "pcs", "binary_rotation": "randm"}
    with pytest.raises(ConfigError) as err:
        recipe_from_dict(recipe_dict)
    text = "\n".join(err.value.problems)
    assert "loss.compact.basis: 'pcs' is not a choice (did you mean 'pca'?); choose from identity, pca" in text
    assert ("loss.compact.binary_rotation: 'randm' is not a choice (did you mean 'random'?); choose from none, random"
            in text)
    recipe_dict["loss"]["compact"] = {"precisions": ["float32", "binary"], "basis": "pca", "binary_rotation": "random"}
    with pytest.raises(ConfigError, match="loss.compact.basis: pca is computed from the centre's embeddings"):
        recipe_from_dict(recipe_dict)
    recipe_dict["loss"]["compact"] = {"precisions": ["float32", "binary"], "center": True, "basis": "pca"}
    with pytest.raises(ConfigError, match="loss.compact.basis: pca orders the dimensions by variance"):
        recipe_from_dict(recipe_dict)
    # a rescore term alone trains binary codes too
    recipe_dict["loss"]["compact"] = {"precisions": ["float32"], "rescore_weight": 0.5, "center": True, "basis": "pca"}
    with pytest.raises(ConfigError, match="loss.compact.basis: pca orders the dimensions by variance"):
        recipe_from_dict(recipe_dict)
    recipe_dict["loss"]["compact"]["binary_rotation"] = "random"
    assert recipe_from_dict(recipe_dict).loss.compact.binary_rotation == "random"
    recipe_dict["loss"]["compact"] = {"precisions": ["float32", "int8"], "binary_rotation": "random"}
    with pytest.raises(ConfigError, match="loss.compact.binary_rotation: random rotates binary codes, and no term"):
        recipe_from_dict(recipe_dict)
    recipe_dict["loss"]["compact"] = {"precisions": ["float32", "binary"], "center": True, "basis": "pca",
                                      "binary_rotation": "random"}
    c = recipe_from_dict(recipe_dict).loss.compact
    assert (c.basis, c.binary_rotation) == ("pca", "random")
    recipe_dict["loss"]["compact"] = {"precisions": ["float32", "binary"], "binary_rotation": "random"}
    assert recipe_from_dict(recipe_dict).loss.compact.binary_rotation == "random"  # no centre needed
    recipe_dict["loss"]["compact"] = {"precisions": ["float32", "int8"], "center": True, "basis": "pca"}
    assert recipe_from_dict(recipe_dict).loss.compact.basis == "pca"  # no binary codes: nothing to rotate


def test_the_override_form_the_benchmark_uses(recipe_dict, tmp_path):
    import yaml

    from embedtrain.config import load_recipe

    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe_dict))
    r = load_recipe(str(path), ["loss.compact={dims: [32, 16], precisions: [float32, binary]}"])
    assert r.loss.compact.dims == [32, 16] and r.loss.compact.precisions == ["float32", "binary"]


def test_a_centre_is_for_bert_class_encoders_read_whole(recipe_dict):
    recipe_dict["loss"]["compact"] = {"center": True, "center_rows": 0}
    with pytest.raises(ConfigError) as err:
        recipe_from_dict(recipe_dict)
    assert "loss.compact.center_rows: must be at least 1, got 0" in err.value.problems
    recipe_dict["loss"]["compact"] = {"center": True}
    assert recipe_from_dict(recipe_dict).loss.compact.center
    recipe_dict["data"]["train"][0]["streaming"] = True
    recipe_dict["train"]["max_steps"] = 5
    with pytest.raises(ConfigError) as err:
        recipe_from_dict(recipe_dict)
    assert any(p.startswith("loss.compact.center: the centre is computed from datasets read whole")
               for p in err.value.problems)


def test_the_shipped_compact_recipe_is_the_quickstart_with_the_measured_override():
    """recipes/minilm/wordnet_compact.yaml is what the README's three-seed figures measured: the quickstart recipe
    with the `loss.compact` override recorded in the benchmark's JSON, nothing else changed but the run folder."""
    import json

    from embedtrain.config import load_recipe, to_dict

    from conftest import REPO

    measured = json.loads((REPO / "benchmarks" / "compact_embeddings_pca_random.json").read_text())
    quickstart = load_recipe(REPO / "recipes" / "minilm" / "wordnet_quickstart.yaml",
                             [measured["compact_override"], "output.dir=runs/wordnet_compact"], check_files=False)
    shipped = load_recipe(REPO / "recipes" / "minilm" / "wordnet_compact.yaml", check_files=False)
    assert shipped.loss.compact.basis == "pca" and shipped.loss.compact.binary_rotation == "random"
    assert to_dict(shipped) == to_dict(quickstart)
