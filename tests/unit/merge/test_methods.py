"""Merge methods on small hand-made state dicts (and one tiny peft model for LoRA)."""

import math

import pytest
import torch

from embedtrain.errors import EmbedtrainError
from embedtrain.merge import (
    MERGE_METHODS,
    TaskVectorBasis,
    dare_merge,
    linear_merge,
    merge_lora_into_base,
    method_params,
    self_positioning_merge,
    slerp_merge,
    spherical_mean_coefficients,
    task_arithmetic_merge,
    ties_merge,
)
from embedtrain.registry import Registry


def state(seed: int, dtype=torch.float32) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {
        "layer.weight": torch.randn(4, 3, generator=g).to(dtype),
        "layer.bias": torch.randn(4, generator=g).to(dtype),
        "embeddings.position_ids": torch.arange(5).unsqueeze(0),
    }


def finetuned(base: dict, seed: int, size: float = 0.1) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {k: (v + size * torch.randn(v.shape, generator=g).to(v.dtype)) if v.is_floating_point() else v.clone()
            for k, v in base.items()}


ALL = {
    "linear": {},
    "task_arithmetic": {"weights": [0.5, 0.7]},
    "ties": {"density": 0.5},
    "dare": {"drop_rate": 0.3, "seed": 1},
    "slerp": {"t": 0.3},
    "self_positioning": {"alphas": [0.4, 0.6], "lam": 0.8},
}


def test_registry_names_and_duplicates():
    assert set(MERGE_METHODS.names()) == set(ALL)
    assert method_params("ties") == ["density", "scale"]
    with pytest.raises(ValueError, match="already registered"):
        MERGE_METHODS.register("ties")(lambda base, task_states: {})
    with pytest.raises(EmbedtrainError, match="did you mean 'ties'"):
        MERGE_METHODS.get("tie")
    assert isinstance(MERGE_METHODS, Registry)


@pytest.mark.parametrize("name", sorted(ALL))
def test_merging_a_model_with_itself_returns_it(name):
    base = state(0)
    model = finetuned(base, 1)
    params = dict(ALL[name])
    if name == "task_arithmetic":
        params["weights"] = [0.5, 0.5]  # the average of two copies is the copy
    if name in ("dare", "ties"):
        params = {"drop_rate": 0.0} if name == "dare" else {"density": 1.0}
        params.update({"weights": [0.5, 0.5]} if name == "dare" else {})
    if name == "self_positioning":
        params["lam"] = 1.0
    out = MERGE_METHODS.get(name)(base, [model, model], **params)
    for k in base:
        assert torch.allclose(out[k], model[k], atol=1e-6), (name, k)


def test_task_arithmetic_weight_zero_returns_base_and_sums_task_vectors():
    base, a, b = state(0), state(1), state(2)
    out = task_arithmetic_merge(base, [a, b], weights=0.0)
    assert all(torch.equal(out[k], base[k]) for k in base)
    out = task_arithmetic_merge(base, [a, b], weights=[1.0, 0.5])
    w = "layer.weight"
    assert torch.allclose(out[w], base[w] + (a[w] - base[w]) + 0.5 * (b[w] - base[w]), atol=1e-6)
    assert torch.allclose(linear_merge(base, [a, b])[w], (a[w] + b[w]) / 2, atol=1e-6)
    assert torch.allclose(linear_merge(base, [a, b], weights=[3, 1])[w], 0.75 * a[w] + 0.25 * b[w], atol=1e-6)


def test_ties_matches_hand_computation():
    base = {"w": torch.zeros(5)}
    v1 = torch.tensor([3.0, -1.0, 0.5, 2.0, -4.0])
    v2 = torch.tensor([-1.0, 2.0, 0.25, -3.0, -2.0])
    v3 = torch.tensor([2.0, 0.1, -0.2, 1.0, 5.0])
    # density 0.6 keeps the top 3 magnitudes of each:
    #   v1 -> [3, 0, 0, 2, -4], v2 -> [-1, 2, 0, -3, -2], v3 -> [2, 0, 0, 1, 5]
    # elected sign of the sums [4, 2, 0, 0, -1]: [+, +, 0, 0, -]
    # disjoint means: (3+2)/2, 2/1, none, none (sign 0), (-4-2)/2
    out = ties_merge(base, [{"w": v1}, {"w": v2}, {"w": v3}], density=0.6, scale=2.0)
    assert torch.allclose(out["w"], 2.0 * torch.tensor([2.5, 2.0, 0.0, 0.0, -3.0]))
    # with the base offset
    base = {"w": torch.ones(5)}
    out = ties_merge(base, [{"w": 1 + v1}, {"w": 1 + v2}, {"w": 1 + v3}], density=0.6)
    assert torch.allclose(out["w"], 1 + torch.tensor([2.5, 2.0, 0.0, 0.0, -3.0]))


def test_dare_matches_hand_computation_and_is_seeded():
    base = {"w": torch.zeros(2000)}
    v = {"w": torch.linspace(-1, 1, 2000)}
    out = dare_merge(base, [v], drop_rate=0.25, weights=2.0, seed=7)["w"]
    kept = out != 0
    # every entry is either dropped or 2 x v / (1 - p)
    assert torch.allclose(out[kept], 2.0 * v["w"][kept] / 0.75)
    assert abs(1 - kept.float().mean().item() - 0.25) < 0.04
    # the same mask as a generator seeded the same way draws (one draw for the one key)
    expected_keep = torch.rand(2000, generator=torch.Generator().manual_seed(7)) >= 0.25
    assert torch.equal(kept, expected_keep & (v["w"] != 0))
    assert torch.equal(out, dare_merge(base, [v], drop_rate=0.25, weights=2.0, seed=7)["w"])
    assert not torch.equal(out, dare_merge(base, [v], drop_rate=0.25, weights=2.0, seed=8)["w"])
    # p = 0 is task arithmetic
    a, b, s = state(1), state(2), state(0)
    ta = task_arithmetic_merge(s, [a, b], weights=[0.3, 0.6])
    da = dare_merge(s, [a, b], drop_rate=0.0, weights=[0.3, 0.6])
    assert all(torch.allclose(ta[k].float(), da[k].float()) for k in s)


def test_slerp_two_models():
    base = {"w": torch.zeros(2)}
    x, y = {"w": torch.tensor([1.0, 0.0])}, {"w": torch.tensor([0.0, 1.0])}
    out = slerp_merge(base, [x, y], t=1 / 3)["w"]
    assert torch.allclose(out, torch.tensor([math.cos(math.pi / 6), math.sin(math.pi / 6)]), atol=1e-6)
    assert torch.allclose(slerp_merge(base, [x, y], t=0.0)["w"], x["w"])
    # task-vector space: around a base at (1, 1)
    base = {"w": torch.ones(2)}
    out = slerp_merge(base, [{"w": torch.tensor([3.0, 1.0])}, {"w": torch.tensor([1.0, 3.0])}], t=0.5,
                      space="task_vectors")["w"]
    assert torch.allclose(out, 1 + 2 * torch.tensor([math.sqrt(0.5), math.sqrt(0.5)]), atol=1e-6)
    with pytest.raises(EmbedtrainError, match="exactly 2 task models"):
        slerp_merge(base, [x])


def test_spherical_mean_is_slerp_for_two_and_a_mean_for_more():
    torch.manual_seed(0)
    v1, v2, v3 = torch.randn(50, dtype=torch.float64), torch.randn(50, dtype=torch.float64), torch.randn(50, dtype=torch.float64)
    v2 = 3 * v2 / v2.norm() * v1.norm()  # different lengths
    vs = torch.stack([v1, v2])
    gram = (vs @ vs.T).unsqueeze(0)
    for t in (0.0, 0.2, 0.5, 0.9):
        beta = spherical_mean_coefficients(gram, torch.tensor([1 - t, t]))[0]
        merged = beta @ vs
        u1, u2 = v1 / v1.norm(), v2 / v2.norm()
        omega = torch.arccos(u1 @ u2)
        slerp = (torch.sin((1 - t) * omega) * u1 + torch.sin(t * omega) * u2) / torch.sin(omega)
        assert torch.allclose(merged, ((1 - t) * v1.norm() + t * v2.norm()) * slerp, atol=1e-9)
    # three vectors: the result minimises the weighted squared angles (the gradient vanishes)
    vs = torch.stack([v1, v2, v3])
    a = torch.tensor([0.2, 0.5, 0.3], dtype=torch.float64)
    q = spherical_mean_coefficients((vs @ vs.T).unsqueeze(0), a, iterations=20)[0] @ vs
    q = q / q.norm()
    units = vs / vs.norm(dim=1, keepdim=True)
    angles = torch.arccos(units @ q)
    tangent = sum(a[i] * angles[i] / torch.sin(angles[i]) * (units[i] - torch.cos(angles[i]) * q) for i in range(3))
    assert tangent.norm() < 1e-8
    # a zero task vector adds nothing to the direction and 0 to the length
    z = torch.stack([v1, torch.zeros(50, dtype=torch.float64)])
    beta = spherical_mean_coefficients((z @ z.T).unsqueeze(0), torch.tensor([0.5, 0.5]))[0]
    assert torch.allclose(beta @ z, 0.5 * v1)


def test_self_positioning_special_cases_and_gradients():
    base, a, b = state(0), finetuned(state(0), 1), finetuned(state(0), 2)
    w = "layer.weight"
    zero = self_positioning_merge(base, [a, b], alphas=[0.5, 0.5], lam=0.0)
    assert torch.equal(zero[w], base[w])
    only_a = self_positioning_merge(base, [a, b], alphas=[1.0, 0.0], lam=1.0)
    assert torch.allclose(only_a[w], a[w], atol=1e-6)
    halves = self_positioning_merge(base, [a, b], alphas=[2.0, 2.0], lam=1.0)  # normalised to [0.5, 0.5]
    assert torch.allclose(halves[w], self_positioning_merge(base, [a, b], alphas=[0.5, 0.5], lam=1.0)[w])
    # differentiable in the coefficients through the basis
    basis = TaskVectorBasis(base, [a, b])
    logits = torch.zeros(2, requires_grad=True)
    lam = torch.tensor(1.0, requires_grad=True)
    merged = basis.merged(torch.softmax(logits, 0), lam)
    assert torch.allclose(merged[w], halves[w], atol=1e-6)
    (merged[w] ** 2).sum().backward()
    assert logits.grad is not None and lam.grad is not None and torch.isfinite(logits.grad).all()
    with pytest.raises(EmbedtrainError, match="alphas: got 3 values for 2 task models"):
        self_positioning_merge(base, [a, b], alphas=[0.2, 0.3, 0.5], lam=1.0)
    with pytest.raises(EmbedtrainError, match="non-negative"):
        self_positioning_merge(base, [a, b], alphas=[-1.0, 2.0], lam=1.0)


@pytest.mark.parametrize("name", sorted(ALL))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_inputs_not_mutated_dtype_preserved_non_float_copied(name, dtype):
    base = state(0, dtype)
    models = [finetuned(base, 1), finetuned(base, 2)]
    before = [{k: v.clone() for k, v in s.items()} for s in [base] + models]
    out = MERGE_METHODS.get(name)(base, models, **ALL[name])
    for original, now in zip(before, [base] + models):
        assert all(torch.equal(original[k], now[k]) for k in original)
    assert list(out) == list(base)
    for k, v in out.items():
        assert v.dtype == base[k].dtype and v.shape == base[k].shape
        assert all(v.data_ptr() != s[k].data_ptr() for s in [base] + models)
    assert torch.equal(out["embeddings.position_ids"], base["embeddings.position_ids"])
    # writing into the result leaves the inputs alone
    out["layer.weight"].add_(1)
    assert torch.equal(base["layer.weight"], before[0]["layer.weight"])


@pytest.mark.parametrize("name", sorted(ALL))
def test_mismatched_architectures_give_one_line_errors(name):
    base, a = state(0), state(1)
    wide = dict(state(2), **{"layer.weight": torch.zeros(4, 5)})
    with pytest.raises(EmbedtrainError) as err:
        MERGE_METHODS.get(name)(base, [a, wide], **ALL[name])
    msg = str(err.value)
    assert "\n" not in msg
    assert msg.startswith("models to merge must share an architecture: key 'layer.weight' has shape (4, 5) "
                          "in model 2 but (4, 3) in the base")
    missing = {k: v for k, v in state(2).items() if k != "layer.bias"}
    with pytest.raises(EmbedtrainError, match="key 'layer.bias' is missing from model 2"):
        MERGE_METHODS.get(name)(base, [a, missing], **ALL[name])
    extra = dict(state(2), head=torch.zeros(2))
    with pytest.raises(EmbedtrainError, match="key 'head' is in model 2 but not in the base"):
        MERGE_METHODS.get(name)(base, [a, extra], **ALL[name])
    half = state(2, torch.float16)
    with pytest.raises(EmbedtrainError, match="key 'layer.weight' has dtype float16 in model 2 but float32"):
        MERGE_METHODS.get(name)(base, [a, half], **ALL[name])


def test_bad_parameters_are_one_line_errors():
    base, a, b = state(0), state(1), state(2)
    with pytest.raises(EmbedtrainError, match=r"weights: got 3 values for 2 task models"):
        task_arithmetic_merge(base, [a, b], weights=[1, 2, 3])
    with pytest.raises(EmbedtrainError, match=r"density: must be in \(0, 1\]"):
        ties_merge(base, [a, b], density=0.0)
    with pytest.raises(EmbedtrainError, match=r"drop_rate: must be in \[0, 1\)"):
        dare_merge(base, [a, b], drop_rate=1.0)
    with pytest.raises(EmbedtrainError, match="at least one task model"):
        linear_merge(base, [])


def test_merge_lora_into_base_matches_peft(tiny_bert):
    from peft import LoraConfig, get_peft_model
    from peft.utils import get_peft_model_state_dict
    from transformers import BertModel

    model = BertModel.from_pretrained(str(tiny_bert))
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"]))
    with torch.no_grad():  # LoRA's B starts at 0: give it values so the merge matters
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    adapter = get_peft_model_state_dict(peft_model)
    ours = merge_lora_into_base(base_state, adapter, alpha=8, r=4)
    theirs = peft_model.merge_and_unload().state_dict()
    assert set(ours) == set(theirs)
    changed = 0
    for k in theirs:
        assert torch.allclose(ours[k], theirs[k], atol=1e-6), k
        changed += not torch.equal(ours[k], base_state[k])
    assert changed == 4  # query and value of 2 layers
    with pytest.raises(EmbedtrainError, match="not a plain LoRA A/B matrix"):
        merge_lora_into_base(base_state, {"base_model.model.x.lora_magnitude_vector": torch.zeros(1)}, 8, 4)
