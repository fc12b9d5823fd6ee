r"""Model merging as pure functions on state dicts.

Every method takes the common starting point ``base`` (:math:`\theta_0`) and the fine-tuned
``task_states`` (:math:`\theta_1 … \theta_N`, all fine-tuned from that base) and returns a new
state dict. Shared rules:

- keys, shapes and dtypes are checked first (:func:`check_mergeable`); the first mismatch is
  reported on one line naming the key and the model;
- arithmetic runs in float32 and each result is cast back to the input's dtype;
- tensors that are not floating point (e.g. ``position_ids`` buffers) are copied from the base;
- the inputs are never modified, and no output tensor shares memory with an input.

Most methods work on task vectors :math:`V_i = \theta_i - \theta_0` (Ilharco et al., "Editing
Models with Task Arithmetic", arXiv:2212.04089).

Full models and models with custom heads are just state dicts (a head is more keys). LoRA adapters:
merge each adapter into its base first, either with peft (``PeftModel.merge_and_unload()``, which
handles every adapter variant) or, for plain LoRA on linear layers, with
:func:`merge_lora_into_base`; then merge the resulting full state dicts here.
"""

from __future__ import annotations

import inspect
import math
import re
from typing import Callable, Mapping, Optional, Sequence, Union

import torch

from embedtrain.errors import EmbedtrainError
from embedtrain.registry import Registry

StateDict = Mapping[str, torch.Tensor]
Weights = Union[float, Sequence[float], None]
MergeFunction = Callable[..., dict[str, torch.Tensor]]

MERGE_METHODS: Registry[MergeFunction] = Registry("merge method")

ARCHITECTURE = "models to merge must share an architecture"


# --------------------------------------------------------------------------------------
# Checks and small helpers
# --------------------------------------------------------------------------------------


def _shape(t: torch.Tensor) -> str:
    return "(" + ", ".join(str(s) for s in t.shape) + ")"


def _label(i: int, names: Optional[Sequence[str]]) -> str:
    return f"model '{names[i]}'" if names else f"model {i + 1}"


def check_mergeable(base: StateDict, task_states: Sequence[StateDict], names: Optional[Sequence[str]] = None) -> None:
    """Raise a one-line :class:`EmbedtrainError` at the first key, shape or dtype that differs.

    Task models are called ``model 1 … N`` in messages, or by ``names`` when given.
    """
    if not task_states:
        raise EmbedtrainError("nothing to merge: give at least one task model besides the base")
    if names is not None and len(names) != len(task_states):
        raise ValueError(f"{len(names)} names for {len(task_states)} task models")
    for i, state in enumerate(task_states):
        who = _label(i, names)
        for key, ref in base.items():
            if key not in state:
                raise EmbedtrainError(
                    f"{ARCHITECTURE}: key '{key}' is missing from {who} but present in the base; "
                    "merge only models fine-tuned from the same base"
                )
            t = state[key]
            if t.shape != ref.shape:
                raise EmbedtrainError(
                    f"{ARCHITECTURE}: key '{key}' has shape {_shape(t)} in {who} but {_shape(ref)} in the base; "
                    "merge only models fine-tuned from the same base"
                )
            if t.dtype != ref.dtype:
                raise EmbedtrainError(
                    f"{ARCHITECTURE}: key '{key}' has dtype {str(t.dtype).removeprefix('torch.')} in {who} but "
                    f"{str(ref.dtype).removeprefix('torch.')} in the base; load every model in the same dtype"
                )
        extra = next((k for k in state if k not in base), None)
        if extra is not None:
            raise EmbedtrainError(
                f"{ARCHITECTURE}: key '{extra}' is in {who} but not in the base; "
                "merge only models fine-tuned from the same base"
            )


def _is_float(t: torch.Tensor) -> bool:
    return torch.is_floating_point(t)


def _f32(t: torch.Tensor) -> torch.Tensor:
    # .to() returns the tensor itself when it already is float32: only out-of-place ops follow
    return t.detach().to(torch.float32)


def _finish(base: StateDict, merged: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Results cast to the base's dtypes, in the base's key order; other tensors copied from the base."""
    out = {}
    for key, ref in base.items():
        if key in merged:
            value = merged[key].to(ref.dtype)
            # a merge that returned an input unchanged (e.g. weight 1 on one model) must still be a copy
            out[key] = value.clone() if value.data_ptr() == ref.data_ptr() else value
        else:
            out[key] = ref.detach().clone()
    return out


def _per_model(weights: Weights, n: int, default: float, what: str = "weights") -> list[float]:
    if weights is None:
        return [default] * n
    if isinstance(weights, (int, float)):
        return [float(weights)] * n
    values = [float(w) for w in weights]
    if len(values) != n:
        raise EmbedtrainError(f"{what}: got {len(values)} values for {n} task models; give one per task model")
    if not all(math.isfinite(v) for v in values):
        raise EmbedtrainError(f"{what}: {values} has a non-finite value; give finite numbers")
    return values


def task_vectors(base: StateDict, task_states: Sequence[StateDict]) -> list[dict[str, torch.Tensor]]:
    """:math:`V_i = \\theta_i - \\theta_0` in float32 for every floating-point key (inputs unchanged)."""
    check_mergeable(base, task_states)
    keys = [k for k, t in base.items() if _is_float(t)]
    return [{k: _f32(state[k]) - _f32(base[k]) for k in keys} for state in task_states]


# --------------------------------------------------------------------------------------
# Baselines
# --------------------------------------------------------------------------------------


@MERGE_METHODS.register("linear")
def linear_merge(base: StateDict, task_states: Sequence[StateDict], weights: Weights = None) -> dict[str, torch.Tensor]:
    r"""Weighted average of the task models ("model soup"): :math:`\sum_i w_i \theta_i / \sum_i w_i`.

    ``weights``: one per task model (or one number for all); default equal weights. The base is
    used only for the architecture check and the non-float tensors.
    """
    check_mergeable(base, task_states)
    w = _per_model(weights, len(task_states), 1.0)
    if any(v < 0 for v in w) or sum(w) <= 0:
        raise EmbedtrainError(f"weights: {w} must be non-negative with a positive sum; e.g. [0.5, 0.5]")
    total = sum(w)
    merged = {}
    for key, ref in base.items():
        if _is_float(ref):
            merged[key] = sum(wi / total * _f32(s[key]) for wi, s in zip(w, task_states))
    return _finish(base, merged)


@MERGE_METHODS.register("task_arithmetic")
def task_arithmetic_merge(
    base: StateDict, task_states: Sequence[StateDict], weights: Weights = 1.0
) -> dict[str, torch.Tensor]:
    r"""Task arithmetic: :math:`\theta_0 + \sum_i w_i (\theta_i - \theta_0)`.

    ``weights``: one per task model or one number for all (default 1: the plain sum of task vectors;
    with weights 1/N this equals the linear average).
    """
    check_mergeable(base, task_states)
    w = _per_model(weights, len(task_states), 1.0)
    merged = {}
    for key, ref in base.items():
        if _is_float(ref):
            theta0 = _f32(ref)
            merged[key] = theta0 + sum(wi * (_f32(s[key]) - theta0) for wi, s in zip(w, task_states))
    return _finish(base, merged)


def _trim_top(v: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the ``density`` fraction of entries with the largest magnitude (ties broken by position)."""
    keep = int(round(density * v.numel()))
    if keep >= v.numel():
        return v
    flat = v.flatten()
    mask = torch.zeros_like(flat, dtype=torch.bool)
    if keep > 0:
        mask[flat.abs().topk(keep, sorted=False).indices] = True
    return torch.where(mask, flat, torch.zeros_like(flat)).view_as(v)


@MERGE_METHODS.register("ties")
def ties_merge(
    base: StateDict, task_states: Sequence[StateDict], density: float = 0.2, scale: float = 1.0
) -> dict[str, torch.Tensor]:
    r"""TIES-Merging (Yadav et al., "Resolving Interference When Merging Models", arXiv:2306.01708).

    Per tensor, with task vectors :math:`V_i`:

    1. trim: keep the top ``density`` fraction of each :math:`V_i` by magnitude, zero the rest
       (:math:`\hat V_i`; per tensor, as peft and mergekit do, rather than over the whole model);
    2. elect: the sign of each entry is :math:`\gamma = \operatorname{sign}(\sum_i \hat V_i)`
       (the sign with the larger total mass);
    3. disjoint mean: average, per entry, only the non-zero :math:`\hat V_i` whose sign equals
       :math:`\gamma` (entries with no such value stay 0);

    result :math:`\theta_0 + \text{scale}\cdot V_{\text{merged}}`.
    """
    if not 0.0 < density <= 1.0:
        raise EmbedtrainError(f"density: must be in (0, 1] (fraction of each task vector kept), got {density}")
    check_mergeable(base, task_states)
    merged = {}
    for key, ref in base.items():
        if not _is_float(ref):
            continue
        theta0 = _f32(ref)
        trimmed = torch.stack([_trim_top(_f32(s[key]) - theta0, density) for s in task_states])
        elected = torch.sign(trimmed.sum(0))
        agree = (torch.sign(trimmed) == elected) & (trimmed != 0)
        count = agree.sum(0)
        total = torch.where(agree, trimmed, torch.zeros_like(trimmed)).sum(0)
        mean = torch.where(count > 0, total / count.clamp(min=1), torch.zeros_like(total))
        merged[key] = theta0 + scale * mean
    return _finish(base, merged)


@MERGE_METHODS.register("dare")
def dare_merge(
    base: StateDict, task_states: Sequence[StateDict], drop_rate: float = 0.5, weights: Weights = 1.0, seed: int = 0
) -> dict[str, torch.Tensor]:
    r"""DARE (Yu et al., "Language Models are Super Mario", arXiv:2311.03099) then task arithmetic.

    Each entry of each task vector is dropped with probability ``drop_rate`` = p and the survivors
    are rescaled by :math:`1/(1-p)` (so the expected task vector is unchanged); the result is
    :math:`\theta_0 + \sum_i w_i \tilde V_i`. Masks come from one CPU generator seeded with ``seed``,
    drawn model by model and key by key in the base's order, so a seed gives the same merge on
    every machine.
    """
    if not 0.0 <= drop_rate < 1.0:
        raise EmbedtrainError(f"drop_rate: must be in [0, 1), got {drop_rate}")
    check_mergeable(base, task_states)
    w = _per_model(weights, len(task_states), 1.0)
    generator = torch.Generator().manual_seed(int(seed))
    float_keys = [k for k, t in base.items() if _is_float(t)]
    merged = {k: _f32(base[k]) for k in float_keys}
    for wi, state in zip(w, task_states):
        for key in float_keys:
            v = _f32(state[key]) - _f32(base[key])
            keep = torch.rand(v.shape, generator=generator) >= drop_rate
            v = torch.where(keep.to(v.device), v / (1.0 - drop_rate), torch.zeros_like(v))
            merged[key] = merged[key] + wi * v
    return _finish(base, merged)


def _slerp_pair(a: torch.Tensor, b: torch.Tensor, t: float, eps: float = 1e-6) -> torch.Tensor:
    """Spherical interpolation of two flattened tensors; linear when they are (anti)parallel or zero."""
    na, nb = a.norm(), b.norm()
    if na < 1e-12 or nb < 1e-12:
        return (1 - t) * a + t * b
    cos = torch.clamp((a.flatten() @ b.flatten()) / (na * nb), -1.0, 1.0)
    omega = torch.arccos(cos)
    sin = torch.sin(omega)
    if sin < eps:
        return (1 - t) * a + t * b
    return (torch.sin((1 - t) * omega) / sin) * a + (torch.sin(t * omega) / sin) * b


@MERGE_METHODS.register("slerp")
def slerp_merge(
    base: StateDict, task_states: Sequence[StateDict], t: float = 0.5, space: str = "weights"
) -> dict[str, torch.Tensor]:
    r"""Spherical linear interpolation of exactly two models, tensor by tensor.

    For tensors :math:`x, y` at angle :math:`\Omega`,
    :math:`\operatorname{slerp}(x, y; t) = \frac{\sin((1-t)\Omega)}{\sin\Omega} x + \frac{\sin(t\Omega)}{\sin\Omega} y`
    (linear interpolation when :math:`\sin\Omega \approx 0`). ``space="weights"`` interpolates the
    two models' weights (as mergekit does); ``space="task_vectors"`` interpolates their task
    vectors and adds the result to the base. ``t=0`` gives the first model, ``t=1`` the second.
    """
    if len(task_states) != 2:
        raise EmbedtrainError(f"slerp merges exactly 2 task models, got {len(task_states)}; use self_positioning for more")
    if not 0.0 <= t <= 1.0:
        raise EmbedtrainError(f"t: must be in [0, 1], got {t}")
    if space not in ("weights", "task_vectors"):
        raise EmbedtrainError(f"space: {space!r} is not allowed; choose weights or task_vectors")
    check_mergeable(base, task_states)
    first, second = task_states
    merged = {}
    for key, ref in base.items():
        if not _is_float(ref):
            continue
        if space == "weights":
            merged[key] = _slerp_pair(_f32(first[key]), _f32(second[key]), t)
        else:
            theta0 = _f32(ref)
            merged[key] = theta0 + _slerp_pair(_f32(first[key]) - theta0, _f32(second[key]) - theta0, t)
    return _finish(base, merged)


# --------------------------------------------------------------------------------------
# Self Positioning
# --------------------------------------------------------------------------------------


def spherical_mean_coefficients(gram: torch.Tensor, weights: torch.Tensor, iterations: int = 10) -> torch.Tensor:
    r"""Coefficients :math:`\beta` with :math:`V(a) = \sum_j \beta_j V_j`, the N-vector SLERP of one tensor.

    ``gram``: (K, N, N) Gram matrices :math:`G_{ij} = \langle V_i, V_j \rangle`, one per tensor;
    ``weights``: (N,) the convex weights :math:`a`. Returns (K, N), differentiable in ``weights``.

    Direction. With unit directions :math:`u_i = V_i / \lVert V_i \rVert`, the direction of the
    merge is the weighted spherical mean (Karcher mean; Buss & Fillmore, "Spherical averages and
    applications to spherical splines and interpolation", ACM TOG 2001)

    .. math::
        q(a) = \arg\min_{\lVert q \rVert = 1} \sum_i a_i \, \angle(q, u_i)^2 ,

    which for two vectors is exactly :math:`\operatorname{slerp}(u_1, u_2; a_2)`: the point on the
    great circle from :math:`u_1` to :math:`u_2` at fraction :math:`a_2` of the angle. It is
    computed by ``iterations`` fixed-point steps started at the normalised Euclidean mean:
    :math:`v = \sum_i a_i \log_q(u_i)` with :math:`\log_q(u) = \frac{\theta}{\sin\theta}(u - \cos\theta\, q)`,
    then :math:`q \leftarrow \exp_q(v) = \cos\lVert v\rVert\, q + \frac{\sin\lVert v\rVert}{\lVert v\rVert} v`
    (one step is exact for N = 2; a few are plenty for more).

    Length. :math:`\lVert V(a) \rVert = \sum_i a_i \lVert V_i \rVert` (the weighted mean length,
    so a single task vector or identical ones come back unchanged), giving
    :math:`V(a) = (\sum_i a_i \lVert V_i\rVert)\, q(a)`.

    Cheapness. :math:`q` stays in the span of the :math:`u_i`, so the whole iteration runs on
    N coefficients with inner products from the Gram matrix, never on model-sized tensors:
    the merged tensor is one linear combination of the task vectors.

    A zero task vector (a tensor one model did not change) has no direction: it is left out of the
    direction and adds 0 to the length.
    """
    gram = gram.to(torch.float64)
    a = weights.to(torch.float64)
    norms = torch.diagonal(gram, dim1=-2, dim2=-1).clamp(min=0).sqrt()  # (K, N)
    scale = norms.amax(dim=-1, keepdim=True).clamp(min=1e-300)
    valid = norms > 1e-12 * scale
    inv = torch.where(valid, 1.0 / norms.clamp(min=1e-300), torch.zeros_like(norms))
    cosines = gram * inv.unsqueeze(-1) * inv.unsqueeze(-2)  # (K, N, N) <u_i, u_j>

    def quad(c: torch.Tensor) -> torch.Tensor:  # ||sum_i c_i u_i||^2, (K,)
        return (c.unsqueeze(-2) @ cosines @ c.unsqueeze(-1)).squeeze(-1).squeeze(-1)

    tiny = 1e-30
    w = a * valid
    w = w / w.sum(-1, keepdim=True).clamp(min=tiny)
    c = w / quad(w).clamp(min=tiny).sqrt().unsqueeze(-1)
    for _ in range(iterations):
        cos = (cosines @ c.unsqueeze(-1)).squeeze(-1)  # <u_i, q>, (K, N)
        sin = (1.0 - cos * cos).clamp(min=tiny).sqrt()
        theta = torch.atan2(sin, cos)
        f = w * theta / sin
        v = f - (f * cos).sum(-1, keepdim=True) * c  # tangent vector at q, in u-coefficients
        r = quad(v).clamp(min=tiny).sqrt().unsqueeze(-1)
        c = torch.cos(r) * c + torch.sinc(r / math.pi) * v  # sinc(x) = sin(pi x) / (pi x)
        c = c / quad(c).clamp(min=tiny).sqrt().unsqueeze(-1)  # stay on the sphere despite rounding
    length = (a * norms).sum(-1, keepdim=True)  # (K, 1)
    return length * c * inv


class TaskVectorBasis:
    r"""The task vectors of N models over one base, ready for :math:`\theta_0 + \lambda V(a)`.

    Holds the base (float32), the N task vectors (float32) and their Gram matrix per tensor, so
    :meth:`merged` is cheap and differentiable in ``alphas`` and ``lam``: it builds one set of
    merged tensors, each a linear combination of the task vectors. Used by
    :func:`self_positioning_merge` and by the coefficient search.

    ``keys``: restrict to these floating-point keys (default: all of them).
    """

    def __init__(self, base: StateDict, task_states: Sequence[StateDict], keys: Optional[Sequence[str]] = None,
                 names: Optional[Sequence[str]] = None):
        check_mergeable(base, task_states, names)
        float_keys = [k for k, t in base.items() if _is_float(t)]
        if keys is not None:
            unknown = [k for k in keys if k not in base or not _is_float(base[k])]
            if unknown:
                raise ValueError(f"not floating-point keys of the base: {unknown[:3]}")
            float_keys = list(keys)
        self.keys = float_keys
        self.num_models = len(task_states)
        self.base = {k: _f32(base[k]) for k in float_keys}
        self.vectors = {k: [_f32(s[k]).to(self.base[k].device) - self.base[k] for s in task_states] for k in float_keys}
        grams = []
        for k in float_keys:
            flat = [v.flatten().to(torch.float64) for v in self.vectors[k]]
            grams.append(torch.stack([torch.stack([x @ y for y in flat]) for x in flat]))
        self.gram = torch.stack(grams).cpu() if grams else torch.zeros(0, self.num_models, self.num_models,
                                                                        dtype=torch.float64)

    def coefficients(self, alphas: torch.Tensor, iterations: int = 10) -> torch.Tensor:
        """(K, N) coefficients of the task vectors in :math:`V(a)` per key (see spherical_mean_coefficients)."""
        return spherical_mean_coefficients(self.gram, alphas.cpu(), iterations)

    def merged(self, alphas: torch.Tensor, lam: torch.Tensor, iterations: int = 10) -> dict[str, torch.Tensor]:
        r""":math:`\theta_0 + \lambda V(a)` for every key, float32, differentiable in ``alphas`` and ``lam``."""
        beta = self.coefficients(alphas, iterations).to(torch.float32)
        on_device: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}  # one copy per device, not per key
        out = {}
        for i, k in enumerate(self.keys):
            device = self.base[k].device
            if device not in on_device:
                on_device[device] = (beta.to(device), lam.to(device))
            b, scale = on_device[device]
            direction = sum(b[i, j] * v for j, v in enumerate(self.vectors[k]))
            out[k] = self.base[k] + scale * direction
        return out


def _alphas_tensor(alphas, n: int) -> torch.Tensor:
    a = alphas if isinstance(alphas, torch.Tensor) else torch.tensor([float(x) for x in alphas])
    if a.shape != (n,):
        raise EmbedtrainError(f"alphas: got {tuple(a.shape)[0] if a.dim() == 1 else tuple(a.shape)} values for "
                              f"{n} task models; give one per task model")
    if not bool(torch.isfinite(a).all()) or bool((a < 0).any()) or float(a.sum()) <= 0:
        raise EmbedtrainError(f"alphas: {a.tolist()} must be non-negative with a positive sum; e.g. [0.5, 0.5]")
    return a / a.sum()


@MERGE_METHODS.register("self_positioning")
def self_positioning_merge(
    base: StateDict, task_states: Sequence[StateDict], alphas: Sequence[float], lam: float, iterations: int = 10
) -> dict[str, torch.Tensor]:
    r"""Self Positioning (Li et al., "Improving General Text Embedding Model: Tackling Task Conflict and
    Data Imbalance through Model Merging", arXiv:2410.15035): :math:`\theta_0 + \lambda\, V(a)`.

    :math:`V(a)` combines the task vectors :math:`V_i = \theta_i - \theta_0` per tensor: direction by
    spherical interpolation with weights :math:`a` (the N-vector generalisation of SLERP, exact SLERP
    for two models), length the :math:`a`-weighted mean of their lengths; see
    :func:`spherical_mean_coefficients` for the math. ``alphas`` are normalised to sum to 1
    (a convex combination); ``lam`` scales the merged task vector (0 gives the base). The search for
    ``alphas`` and ``lam`` on probe data lives in ``embedtrain.train.self_positioning``.
    """
    if not math.isfinite(float(lam)):
        raise EmbedtrainError(f"lam: must be a finite number, got {lam}")
    if iterations < 1:
        raise EmbedtrainError(f"iterations: must be at least 1, got {iterations}")
    a = _alphas_tensor(alphas, len(task_states))
    basis = TaskVectorBasis(base, task_states)
    with torch.no_grad():
        merged = basis.merged(a.detach(), torch.as_tensor(float(lam)), iterations)
    return _finish(base, merged)


# --------------------------------------------------------------------------------------
# LoRA adapters
# --------------------------------------------------------------------------------------

_LORA_A = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_A(?:\.[^.]+)?\.weight$")


def merge_lora_into_base(base_state: StateDict, adapter_state: StateDict, alpha: float, r: int) -> dict[str, torch.Tensor]:
    r"""A full state dict with plain LoRA adapters folded in: :math:`W + \frac{\alpha}{r} B A` per adapted linear layer.

    ``adapter_state`` is peft's adapter state dict (``adapter_model.safetensors`` or
    ``get_peft_model_state_dict``): keys ``base_model.model.<module>.lora_A.weight`` (r, in) and
    ``….lora_B.weight`` (out, r); ``base_state`` is the state dict of the model the adapter was
    trained on (keys ``<module>.weight``). For rsLoRA (scale :math:`\alpha/\sqrt r`) pass
    ``alpha = lora_alpha * sqrt(r)``. Other adapter kinds (DoRA, embedding LoRA, modules_to_save)
    are refused: merge those with peft's ``merge_and_unload()``.
    """
    if r < 1:
        raise EmbedtrainError(f"r: must be at least 1, got {r}")
    scale = float(alpha) / r
    out = {k: v.detach().clone() for k, v in base_state.items()}
    handled = set()
    for key in adapter_state:
        if ".lora_B" in key:
            continue
        match = _LORA_A.match(key)
        if match is None:
            raise EmbedtrainError(
                f"adapter key '{key}' is not a plain LoRA A/B matrix; merge this adapter with peft's "
                "merge_and_unload() and merge the resulting full models"
            )
        b_key = key.replace(".lora_A", ".lora_B")
        if b_key not in adapter_state:
            raise EmbedtrainError(f"adapter key '{key}' has no matching '{b_key}'; the adapter file is incomplete")
        target = match.group("module") + ".weight"
        if target not in out:
            raise EmbedtrainError(
                f"adapter key '{key}' adapts '{target}', which is not in the base state dict; "
                "pass the state dict of the model the adapter was trained on"
            )
        weight = out[target]
        lora_a, lora_b = _f32(adapter_state[key]), _f32(adapter_state[b_key])
        if lora_b.shape[1] != lora_a.shape[0] or (lora_b.shape[0], lora_a.shape[1]) != tuple(weight.shape):
            raise EmbedtrainError(
                f"adapter key '{key}': B {_shape(lora_b)} x A {_shape(lora_a)} does not fit '{target}' {_shape(weight)}"
            )
        out[target] = (_f32(weight) + scale * (lora_b @ lora_a)).to(weight.dtype)
        handled.update({key, b_key})
    stray = next((k for k in adapter_state if k not in handled), None)
    if stray is not None:
        raise EmbedtrainError(f"adapter key '{stray}' has no matching lora_A matrix; the adapter file is incomplete")
    return out


def method_params(name: str) -> list[str]:
    """The parameters a registered method accepts besides ``base`` and ``task_states``."""
    signature = inspect.signature(MERGE_METHODS.get(name))
    return [p for p in signature.parameters if p not in ("base", "task_states")]
