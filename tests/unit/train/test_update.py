"""The update after backward: the loss's own parameters (a learnable temperature) have an optimizer of their own
(FSDP saves the model's optimizer through the model, and they are outside it), which must give the update one
optimizer over both gave; the gradient norm and clipping take both together."""

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from embedtrain.errors import EmbedtrainError
from embedtrain.train.optim import LossOptimizer, build_optimizer, build_scheduler, loss_group, parameter_groups
from embedtrain.train.step import apply_update


class _Loss(nn.Module):
    def __init__(self):
        super().__init__()
        self.log_scale = nn.Parameter(torch.tensor(2.0))
        self.bias = nn.Parameter(torch.tensor(-1.0))


def _pair(seed: int = 0):
    torch.manual_seed(seed)
    return nn.Linear(6, 4), _Loss()


def _gradients(step: int, model: nn.Module, loss: nn.Module, scale: float = 1.0) -> None:
    g = torch.Generator().manual_seed(step)
    for p in list(model.parameters()) + list(loss.parameters()):
        p.grad = scale * torch.randn(p.shape, generator=g)


@pytest.mark.parametrize("kind", ["adamw", "sgd"])
def test_the_loss_optimizer_updates_as_one_optimizer_over_both(kind):
    """Same schedule (warmup then decay), same kind, no decay on the loss's parameters: equal weights."""
    model_a, loss_a = _pair()
    model_b, loss_b = _pair()
    one = build_optimizer(parameter_groups(model_a.named_parameters(), 0.01) + loss_group(loss_a), 1e-2, kind)
    one_schedule = build_scheduler(one, "linear", 8, 0.25)
    model_only = build_optimizer(parameter_groups(model_b.named_parameters(), 0.01), 1e-2, kind)
    schedule = build_scheduler(model_only, "linear", 8, 0.25)
    apart = LossOptimizer(loss_b, kind, 1e-2)
    for step in range(6):
        _gradients(step, model_a, loss_a)
        _gradients(step, model_b, loss_b)
        one.step()
        one_schedule.step()
        model_only.step()
        apart.step(schedule)
        schedule.step()
    for a, b in zip(list(model_a.parameters()) + list(loss_a.parameters()),
                    list(model_b.parameters()) + list(loss_b.parameters())):
        assert torch.equal(a, b)  # the same elementwise arithmetic on the same values: bit for bit
    assert loss_b.log_scale.item() != 2.0  # it did move


def test_the_loss_optimizer_state_round_trips():
    model, loss = _pair()
    model_opt = build_optimizer(parameter_groups(model.named_parameters(), 0.0), 1e-2)
    schedule = build_scheduler(model_opt, "constant", 10, 0.0)
    first = LossOptimizer(loss, "adamw", 1e-2)
    for step in range(3):
        _gradients(step, model, loss)
        first.step(schedule)
    saved = first.state_tensors()
    assert set(saved) == {f"{n}.{k}" for n in ("log_scale", "bias") for k in ("step", "exp_avg", "exp_avg_sq")}

    _, copy = _pair()
    copy.load_state_dict(loss.state_dict())
    second = LossOptimizer(copy, "adamw", 1e-2)
    second.load_tensors(saved)
    for opt, module in ((first, loss), (second, copy)):
        _gradients(7, model, module)
        opt.step(schedule)
    assert torch.equal(loss.log_scale, copy.log_scale) and torch.equal(loss.bias, copy.bias)

    with pytest.raises(EmbedtrainError, match="names 'temperature', which is not a learnable parameter"):
        LossOptimizer(_Loss(), "adamw", 1e-2).load_tensors({"temperature.exp_avg": torch.zeros(())})
    frozen = _Loss().requires_grad_(False)
    assert LossOptimizer(frozen, "adamw", 1e-2).state_tensors() == {}
    with pytest.raises(EmbedtrainError, match="this loss does not have"):
        LossOptimizer(frozen, "adamw", 1e-2).load_tensors(saved)


@pytest.mark.parametrize("max_grad_norm", [None, 0.5])
@pytest.mark.parametrize("precision", ["no", "fp16"])
def test_the_gradient_norm_and_clipping_take_the_model_and_the_loss_together(max_grad_norm, precision):
    """Under fp16 the gradients arrive multiplied by the loss scale: the accelerator unscales the model's, the update
    the loss's own (the scale is a power of two, so unscaled gradients equal the reference exactly)."""
    from embedtrain.train.accelerator import build_accelerator

    accelerator = build_accelerator(precision)  # fp16 on the CPU: torch's autocast and GradScaler, as a run has
    assert (accelerator.scaler is not None) == (precision == "fp16")
    model, loss = _pair()
    optimizer = build_optimizer(parameter_groups(model.named_parameters(), 0.0), 1e-2, "sgd")
    scheduler = build_scheduler(optimizer, "constant", 10, 0.0)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    loss_optimizer = LossOptimizer(loss, "sgd", 1e-2)
    both = list(model.parameters()) + list(loss.parameters())
    _gradients(0, model, loss, scale=3.0)
    reference = [p.grad.clone() for p in both]
    if accelerator.scaler is not None:  # what a backward of the scaled loss leaves
        scale = float(accelerator.scaler.scale(torch.ones(())))  # the scale, as accelerator.backward applies it
        assert scale > 1
        for p in both:
            p.grad.mul_(scale)
    expected_norm = torch.linalg.vector_norm(torch.cat([g.reshape(-1) for g in reference]))
    if max_grad_norm:  # torch's own clipping of the same gradients
        copies = [nn.Parameter(torch.zeros_like(g)) for g in reference]
        for c, g in zip(copies, reference):
            c.grad = g.clone()
        torch.nn.utils.clip_grad_norm_(copies, max_grad_norm)
        reference = [c.grad for c in copies]
    weights = [p.detach().clone() for p in both]
    state = SimpleNamespace(consecutive_nonfinite=0)
    finite, grad_norm, _ = apply_update(accelerator, optimizer, scheduler, torch.tensor(1.0), list(model.parameters()),
                                        loss_optimizer, max_grad_norm, state, 3, 0, "", print)
    assert finite
    # the two norms are summed in another order than one norm over all: float32 rounding, a few ulps
    torch.testing.assert_close(grad_norm, expected_norm, rtol=1e-6, atol=0)
    for p, g, w in zip(both, reference, weights):
        # the clipped gradient: one product by a coefficient computed in double here, in float32 by torch (<= 1 ulp)
        torch.testing.assert_close(p.grad, g, rtol=2e-7, atol=0)
        torch.testing.assert_close(p.detach(), w - 1e-2 * g, rtol=1e-6, atol=1e-7)
    assert max_grad_norm is None or float(torch.linalg.vector_norm(torch.cat([p.grad.reshape(-1) for p in both]))) \
        == pytest.approx(max_grad_norm, rel=1e-5)
