from pathlib import Path

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from embedtrain.config import (
    KINDS,
    RECIPE_TYPES,
    ClipRecipe,
    DMLRecipe,
    TextRecipe,
    Vlm2VecRecipe,
    apply_override,
    load_recipe,
    recipe_from_dict,
    recipe_kind,
)
from embedtrain.errors import ConfigError, EmbedtrainError

from conftest import REPO, tiny_recipe


@pytest.fixture
def recipe_dict(tiny_bert, pairs_file, beir_dir, tmp_path):
    return tiny_recipe(tiny_bert, pairs_file, tmp_path / "run", beir_dir)


def test_valid_recipe_loads(recipe_dict):
    r = recipe_from_dict(recipe_dict)
    assert isinstance(r, TextRecipe) and r.kind == "text"
    assert r.data.train[0].negative_columns == ["negative"]
    assert r.train.max_steps == 6
    assert r.loss.symmetric is False  # default from the dataclass


def test_unknown_key_suggests(recipe_dict):
    recipe_dict["train"]["learning_rate"] = 1e-4
    recipe_dict["trian"] = {}
    with pytest.raises(ConfigError) as err:
        recipe_from_dict(recipe_dict)
    msgs = err.value.problems
    assert any(m.startswith("train.learning_rate: unknown key") for m in msgs)
    assert any("did you mean 'train'" in m for m in msgs)


def test_all_problems_reported_together(recipe_dict):
    recipe_dict["train"]["lr"] = "fast"
    recipe_dict["data"]["batch_size"] = 1
    recipe_dict["data"]["train"][0]["path"] = "nope/missing.jsonl"
    recipe_dict["model"]["pooling"] = "meen"
    with pytest.raises(ConfigError) as err:
        recipe_from_dict(recipe_dict)
    text = "\n".join(err.value.problems)
    assert "train.lr: expected a number, got str 'fast'" in text
    assert "data.batch_size: must be at least 2" in text
    assert "data.train[0].path: file nope/missing.jsonl does not exist" in text
    assert "model.pooling: 'meen' is not allowed (did you mean 'mean'?)" in text


def test_wrong_type_names_dotted_path(recipe_dict):
    recipe_dict["data"]["train"][0]["negative_columns"] = "negative"
    with pytest.raises(ConfigError, match=r"data\.train\[0\]\.negative_columns: expected a list"):
        recipe_from_dict(recipe_dict)


def test_overrides(recipe_dict, tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe_dict))
    r = load_recipe(path, ["train.lr=1e-5", "output.dir=/tmp/x", "data.train.0.max_rows=10", "loss.symmetric=true"])
    assert r.train.lr == 1e-5 and r.output.dir == "/tmp/x" and r.data.train[0].max_rows == 10 and r.loss.symmetric
    with pytest.raises(ConfigError, match="train.lrr: unknown key"):
        load_recipe(path, ["train.lrr=1"])
    with pytest.raises(ConfigError, match="expected key=value"):
        load_recipe(path, ["train.lr"])
    # YAML 1.1 reads an unquoted `no` as false; the choice named "no" is still meant
    assert load_recipe(path, ["train.mixed_precision=no"]).train.mixed_precision == "no"
    with pytest.raises(ConfigError, match="train.scheduler: False is not allowed"):
        load_recipe(path, ["train.scheduler=no"])


def test_malformed_yaml(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("model:\n  name_or_path: [unclosed\n")
    with pytest.raises(EmbedtrainError, match=r"malformed YAML at line \d+"):
        load_recipe(path)
    with pytest.raises(EmbedtrainError, match="recipe file not found"):
        load_recipe(tmp_path / "none.yaml")


def test_every_shipped_recipe_loads():
    """Every recipe of every kind loads with the one loader (accelerate launcher configs and merge documents
    have their own formats; merge documents: tests/integration/test_merge_run.py)."""
    recipes = sorted((REPO / "recipes").rglob("*.yaml"))
    recipes = [p for p in recipes if "accelerate" not in p.parts and "merge" not in p.parts]
    kinds = set()
    for path in recipes:
        first = path.read_text().splitlines()[0]
        assert first.startswith("# "), f"{path} must start with a comment giving its command"
        assert f"embedtrain train {path.relative_to(REPO).as_posix()}" in first, (path, first)
        # GPU recipes name Hub models and data prepared elsewhere: their files are checked when they run
        recipe = load_recipe(path, check_files=False)
        assert isinstance(recipe, RECIPE_TYPES[recipe.kind])
        kinds.add(recipe.kind)
        if recipe.kind == "text":  # the text recipes' models and data are in the repository or on the Hub
            load_recipe(path)
    assert kinds == set(KINDS)


scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), st.text(max_size=5))
trees = st.recursive(scalars, lambda c: st.one_of(st.lists(c, max_size=3), st.dictionaries(st.text(max_size=8), c, max_size=3)), max_leaves=8)


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(st.sampled_from(["model", "data", "loss", "train", "eval", "output", "other"]), trees, max_size=4))
def test_loader_never_crashes(data):
    """Any YAML-shaped input either loads or raises ConfigError with dotted-path problems."""
    try:
        recipe_from_dict(data)
    except ConfigError as err:
        assert err.problems and all(":" in p for p in err.problems)


@settings(max_examples=100, deadline=None)
@given(st.floats(min_value=1e-8, max_value=1.0), st.integers(min_value=2, max_value=4096))
def test_override_roundtrip(lr, batch):
    data = {}
    apply_override(data, f"train.lr={lr!r}")
    apply_override(data, f"data.batch_size={batch}")
    recipe = recipe_from_dict(data, check_values=False)
    assert recipe.train.lr == lr and recipe.data.batch_size == batch


# --------------------------------------------------------------------------------------
# One schema: kind dispatch and the checks every kind shares
# --------------------------------------------------------------------------------------


def test_kind_picks_the_recipe_type(recipe_dict):
    assert recipe_kind({}) == "text" and recipe_kind({"model": {}}) == "text"
    assert isinstance(recipe_from_dict(recipe_dict), TextRecipe)
    assert isinstance(recipe_from_dict({**recipe_dict, "kind": "text"}), TextRecipe)
    for kind, cls in (("clip", ClipRecipe), ("vlm2vec", Vlm2VecRecipe), ("dml", DMLRecipe)):
        assert recipe_kind({"kind": kind}) == kind
        recipe = recipe_from_dict({"kind": kind}, check_values=False)
        assert type(recipe) is cls and recipe.kind == kind and RECIPE_TYPES[kind] is cls


def test_unknown_kind_suggests_one():
    with pytest.raises(ConfigError) as err:
        recipe_from_dict({"kind": "dlm", "model": {}})
    assert err.value.problems == ["kind: 'dlm' is not a recipe kind (did you mean 'dml'?); "
                                  "choose one of: text, clip, vlm2vec, dml (no kind = text)"]


@pytest.mark.parametrize("section", ["backbone", "tuning", "proxies"])
def test_old_metric_learning_form_gives_one_migration_line(section, tmp_path):
    data = {section: {}, "data": {"path": "x.jsonl"}, "train": {"lr": "fast"}}
    with pytest.raises(ConfigError) as err:
        recipe_from_dict(data)
    assert err.value.problems == [
        "kind: missing; a metric-learning recipe starts with kind: dml and puts backbone, tuning and proxies under "
        "model (see recipes/dml/vpt_proxies_emoji.yaml)"]
    path = tmp_path / "old.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError, match="^kind: missing; a metric-learning recipe starts with kind: dml"):
        load_recipe(path)


def _clip_dict(tmp_path) -> dict:
    data = yaml.safe_load((REPO / "recipes" / "clip" / "emoji_clip.yaml").read_text())
    data["output"]["dir"] = str(tmp_path / "clip-run")
    return data


def _dml_dict(tmp_path) -> dict:
    (tmp_path / "meta.jsonl").write_text("")
    return {"kind": "dml", "model": {"backbone": {"kind": "timm", "name_or_path": "vit_tiny"}},
            "data": {"path": str(tmp_path / "meta.jsonl")}, "output": {"dir": str(tmp_path / "dml-run")}}


def _problems(data: dict) -> list[str]:
    with pytest.raises(ConfigError) as err:
        recipe_from_dict(data)
    return err.value.problems


def test_negative_weight_decay_and_momentum_refused_for_every_kind(recipe_dict, tmp_path):
    for data in (recipe_dict, _clip_dict(tmp_path), _dml_dict(tmp_path)):
        recipe_from_dict(data)  # valid as given
        data.setdefault("train", {}).update(weight_decay=-0.1, momentum=-1)
        problems = _problems(data)
        assert "train.weight_decay: must be 0 or more, got -0.1" in problems, (data.get("kind"), problems)
        assert "train.momentum: must be 0 or more, got -1.0" in problems, (data.get("kind"), problems)


def test_shared_checks_name_the_dotted_path_in_every_kind(recipe_dict, tmp_path):
    clip = _clip_dict(tmp_path)
    for data in (recipe_dict, clip):
        data["data"]["train"].append(dict(data["data"]["train"][0], weight=0, max_rows=0))
        data["train"]["max_grad_norm"] = 0
        data["output"]["dir"] = ""
        problems = "\n".join(_problems(data))
        for expected in ("data.train[1].name: ", "is used twice", "data.train[1].weight: must be positive, got 0",
                         "data.train[1].max_rows: must be at least 1, got 0",
                         "train.max_grad_norm: must be positive or null, got 0", "output.dir: missing"):
            assert expected in problems, (expected, problems)
    dml = _dml_dict(tmp_path)
    dml["train"] = {"max_grad_norm": 0}
    dml["output"]["dir"] = ""
    problems = "\n".join(_problems(dml))
    assert "train.max_grad_norm: must be positive or null, got 0" in problems and "output.dir: missing" in problems


def test_settings_a_kind_does_not_use_are_refused(recipe_dict, tmp_path):
    # the one loop gives every kind the optimizer choice, per-role GradCache chunks, trackers and the Hub push
    recipe_dict["train"].update(optimizer="sgd", gradient_cache_query_chunk_size=4)
    assert recipe_from_dict(recipe_dict).train.optimizer == "sgd"
    dml = _dml_dict(tmp_path)
    dml["train"] = {"compile": True, "gradient_cache_chunk_size": 4, "optimizer": "sgd"}
    dml["output"]["push_to_hub"] = "me/model"
    problems = "\n".join(_problems(dml))
    for key in ("train.compile", "train.gradient_cache_chunk_size"):
        assert f"{key}: not used by metric-learning recipes" in problems, key
    assert "optimizer" not in problems and "push_to_hub" not in problems


def test_forward_token_budget_is_checked_and_text_only(recipe_dict, tmp_path):
    recipe_dict["train"]["forward_token_budget"] = 1024
    assert recipe_from_dict(recipe_dict).train.forward_token_budget == 1024
    recipe_dict["train"].update(forward_token_budget=0)
    assert "train.forward_token_budget: must be at least 1 or null, got 0" in _problems(recipe_dict)
    recipe_dict["train"].update(forward_token_budget=512, gradient_cache_chunk_size=8)
    assert any(p.startswith("train.forward_token_budget: GradCache embeds in chunks of its own")
               for p in _problems(recipe_dict))
    clip = _clip_dict(tmp_path)
    clip["train"]["forward_token_budget"] = 1024
    assert any(p.startswith("train.forward_token_budget: not used by multimodal recipes") for p in _problems(clip))
    dml = _dml_dict(tmp_path)
    dml["train"] = {"forward_token_budget": 1024}
    assert any(p.startswith("train.forward_token_budget: not used by metric-learning recipes") for p in _problems(dml))


def test_mined_negatives_are_checked(recipe_dict, tmp_path):
    recipe_dict["data"]["mined_negatives"] = {"num_negatives": 2, "every": 50}
    m = recipe_from_dict(recipe_dict).data.mined_negatives
    assert (m.num_negatives, m.every, m.top_k, m.factor) == (2, 50, 30, 0.95)
    recipe_dict["data"]["mined_negatives"] = {"num_negatives": 0, "every": 0, "top_k": 0, "factor": 1.5}
    problems = _problems(recipe_dict)
    for start in ("data.mined_negatives.num_negatives: must be at least 1, got 0",
                  "data.mined_negatives.top_k: 0 candidates cannot give 0 negatives per row",
                  "data.mined_negatives.every: must be at least 1 step",
                  "data.mined_negatives.factor: must be in (0, 1], got 1.5"):
        assert any(p.startswith(start) for p in problems), (start, problems)
    recipe_dict["data"]["mined_negatives"] = {"num_negatives": 4, "top_k": 3}
    assert any(p.startswith("data.mined_negatives.top_k: 3 candidates cannot give 4") for p in _problems(recipe_dict))
    recipe_dict["data"]["mined_negatives"] = {}
    recipe_dict["train"]["max_steps"] = 10
    recipe_dict["data"]["train"][0].update(streaming=True)
    assert any(p.startswith("data.train[0].streaming: negatives are mined from a dataset read whole")
               for p in _problems(recipe_dict))
    recipe_dict["data"]["train"][0].update(streaming=False, label_column="label", negative_columns=[])
    assert any(p.startswith("data.train[0].label_column: labelled rows take their negatives from other labels")
               for p in _problems(recipe_dict))
    # mined negatives are hard negatives: a loss without in-batch negatives may use them alone
    recipe_dict["data"]["train"][0].update(label_column=None)
    recipe_dict["loss"] = {"in_batch_negatives": False}
    assert recipe_from_dict(recipe_dict).loss.in_batch_negatives is False
    recipe_dict["data"]["mined_negatives"] = None
    assert any(p.startswith("loss.in_batch_negatives: false needs hard negatives") for p in _problems(recipe_dict))


def test_check_files_false_skips_only_file_checks(recipe_dict, tmp_path):
    recipe_dict["model"]["name_or_path"] = str(tmp_path / "no-model")
    recipe_dict["data"]["train"][0]["path"] = str(tmp_path / "no-data.jsonl")
    recipe_dict["eval"]["tasks"][0]["path"] = str(tmp_path / "no-task")
    assert len(_problems(recipe_dict)) == 3
    r = recipe_from_dict(recipe_dict, check_files=False)
    assert r.model.name_or_path.endswith("no-model")
    recipe_dict["data"]["batch_size"] = 1
    with pytest.raises(ConfigError, match="data.batch_size: must be at least 2"):
        recipe_from_dict(recipe_dict, check_files=False)


def test_loss_and_averaging_options_default_to_off_and_are_checked(tmp_path):
    from embedtrain.config import TextRecipe

    r = TextRecipe()
    assert r.loss.hardness_weight == 0.0 and r.train.layerwise_lr_decay == 1.0
    assert r.train.ema_decay is None and r.train.average_last_checkpoints == 1
    base = yaml.safe_load((REPO / "recipes" / "minilm" / "wordnet_quickstart.yaml").read_text())
    base["output"]["dir"] = str(tmp_path / "run")
    base["loss"] = {"name": "siglip", "hardness_weight": 2.0}
    with pytest.raises(ConfigError, match="the siglip loss has no softmax over negatives"):
        recipe_from_dict(base)
    base["loss"] = {"name": "gte", "symmetric": True}
    with pytest.raises(ConfigError, match="the gte loss holds the document→query term"):
        recipe_from_dict(base)
    base["loss"] = {"name": "gte", "hardness_weight": 3.0}
    assert recipe_from_dict(base).loss.name == "gte"


def test_local_data_files_reads_a_file_a_folder_of_shards_or_a_glob(tmp_path):
    """One file, a folder (its data files sorted, other files ignored) or a pattern; mixed formats and empty
    matches are one line naming the path."""
    from embedtrain.config.schema import local_data_files
    from embedtrain.errors import EmbedtrainError

    shards = tmp_path / "shards"
    shards.mkdir()
    for name in ("b-01.parquet", "a-00.parquet", "README.md"):
        (shards / name).write_text("x")
    assert local_data_files(str(shards)) == ("parquet", [str(shards / "a-00.parquet"), str(shards / "b-01.parquet")])
    assert local_data_files(str(shards / "b-*.parquet")) == ("parquet", [str(shards / "b-01.parquet")])
    assert local_data_files(str(shards / "a-00.parquet")) == ("parquet", [str(shards / "a-00.parquet")])
    (tmp_path / "one.tar").write_text("x")
    assert local_data_files(str(tmp_path / "one.tar"))[0] == "webdataset"
    (shards / "c.jsonl").write_text("x")
    with pytest.raises(EmbedtrainError, match=r"shards of more than one format \(.jsonl, .parquet\)"):
        local_data_files(str(shards))
    with pytest.raises(EmbedtrainError, match="no file matches this pattern"):
        local_data_files(str(shards / "z-*.parquet"))
    with pytest.raises(EmbedtrainError, match="unsupported format"):
        local_data_files(str(shards / "README.md"))
