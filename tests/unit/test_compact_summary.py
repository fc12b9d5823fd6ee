"""scripts/compact_embeddings.py --summarize: the mean and spread of several seeds' reports, and its refusals."""

import importlib.util
import json
import statistics

import pytest

from conftest import REPO


def load_script():
    spec = importlib.util.spec_from_file_location("compact_embeddings", REPO / "scripts" / "compact_embeddings.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def report(path, seed, binary, drop, override="loss.compact={dims: [8]}", steps="train.max_steps=310"):
    seed_arg = "" if seed is None else f" train.seed={seed}"
    figure = lambda v: {"compact": v, "target": 0.95}  # noqa: E731
    path.write_text(json.dumps({
        "compact_override": override, "common_overrides": [steps],
        "runs": {"compact": {"command": f"embedtrain train r.yaml {steps} {override}{seed_arg} output.dir=x"}},
        "acceptance": {"binary_retained": figure(binary), "binary_rescore_retained": figure(0.97),
                       "dims_128_retained": figure(0.96), "float_ndcg@10": {"drop": drop, "allowed_drop": 0.5}}}))
    return str(path)


def test_summary_is_the_mean_and_sample_spread_per_figure(tmp_path):
    script = load_script()
    paths = [report(tmp_path / "a.json", None, 0.9351, 0.44), report(tmp_path / "b.json", 43, 0.9164, 0.18),
             report(tmp_path / "c.json", 44, 0.9225, 0.92)]
    out = script.summarize(paths)
    assert out["seeds"] == [42, 43, 44]  # a run without train.seed= has the recipe default's
    binary = out["figures"]["binary_retained"]
    assert binary["per_report"] == [93.51, 91.64, 92.25] and binary["target"] == 95.0
    assert binary["mean"] == round(statistics.mean([93.51, 91.64, 92.25]), 2)
    assert binary["sd"] == round(statistics.stdev([93.51, 91.64, 92.25]), 2)
    assert out["figures"]["float_drop"]["mean"] == 0.51 and out["figures"]["float_drop"]["allowed"] == 0.5


@pytest.mark.parametrize("second, message", [
    (dict(seed=43, override="loss.compact={dims: [4]}"), "different loss.compact overrides"),
    (dict(seed=43, steps="train.max_steps=620"), "different settings"),
    (dict(seed=42), "the same seed"),
])
def test_reports_that_do_not_belong_together_are_refused(tmp_path, second, message):
    script = load_script()
    paths = [report(tmp_path / "a.json", None, 0.93, 0.4),
             report(tmp_path / "b.json", binary=0.92, drop=0.3, **second)]
    with pytest.raises(SystemExit, match=message):
        script.summarize(paths)
