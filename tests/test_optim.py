"""Role-aware AdamW (DeepSpeed's single optimizer) and the per-role optimizer config."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from rdm_lightning.methods.optim import OptimizerConfig, RoleAwareAdamW, role_param_group


CONFIG = OptimizerConfig(lr=1e-2, weight_decay=0.1)


def _modules(seed: int = 0) -> dict[str, nn.Module]:
    torch.manual_seed(seed)
    return {
        "generator": nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 4)),
        "fake_score": nn.Sequential(nn.Linear(4, 5), nn.Linear(5, 4)),
    }


def _optimizer(modules: dict[str, nn.Module], config: OptimizerConfig = CONFIG) -> RoleAwareAdamW:
    return RoleAwareAdamW([role_param_group(role, m.parameters(), config) for role, m in modules.items()])


def _params(module: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in module.parameters()]


def _set_grads(module: nn.Module, kind: str, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    for p in module.parameters():
        p.grad = torch.zeros_like(p) if kind == "zero" else torch.randn(p.shape, generator=g)


def _state_snapshot(optimizer, module):
    return [copy.deepcopy(optimizer.state[p]) if p in optimizer.state else None for p in module.parameters()]


def _states_equal(a, b) -> bool:
    if a is None or b is None:
        return a is b
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_role_param_group():
    modules = _modules()
    group = role_param_group("generator", modules["generator"].parameters(), CONFIG)
    assert group["role"] == "generator"
    assert group["params"] == list(modules["generator"].parameters())
    assert (group["lr"], group["betas"], group["weight_decay"]) == (CONFIG.lr, CONFIG.betas, CONFIG.weight_decay)
    # A role may own part of a module only (DMDR's LoRA critic): the group holds exactly the given parameters.
    last = modules["fake_score"][1]
    assert role_param_group("fake_score", [last.weight], CONFIG)["params"] == [last.weight]
    with pytest.raises(TypeError, match="Sequential"):
        role_param_group("generator", [modules["generator"]], CONFIG)


@pytest.mark.parametrize("inactive_grads", ["zero", "random"])
def test_inactive_role_is_bit_identical(inactive_grads):
    modules = _modules()
    optimizer = _optimizer(modules)
    fake_before, gen_before = _params(modules["fake_score"]), _params(modules["generator"])
    for step in range(3):
        _set_grads(modules["generator"], "random", seed=step)
        _set_grads(modules["fake_score"], inactive_grads, seed=100 + step)  # DeepSpeed zero-fills
        optimizer.active_role = "generator"
        optimizer.step()
    for before, p in zip(fake_before, modules["fake_score"].parameters()):
        assert torch.equal(before, p)
    assert all(p not in optimizer.state for p in modules["fake_score"].parameters())
    assert all(not torch.equal(b, p) for b, p in zip(gen_before, modules["generator"].parameters()))
    # The param groups are restored after the step.
    assert optimizer.roles == ["generator", "fake_score"]


def test_inactive_role_state_unchanged_after_it_has_state():
    modules = _modules()
    optimizer = _optimizer(modules)
    _set_grads(modules["fake_score"], "random", seed=0)
    optimizer.active_role = "fake_score"
    optimizer.step()
    fake_params, fake_state = _params(modules["fake_score"]), _state_snapshot(optimizer, modules["fake_score"])
    assert all(s is not None for s in fake_state)
    for kind in ("zero", "random"):
        _set_grads(modules["generator"], "random", seed=1)
        _set_grads(modules["fake_score"], kind, seed=2)
        optimizer.active_role = "generator"
        optimizer.step()
    for before, p in zip(fake_params, modules["fake_score"].parameters()):
        assert torch.equal(before, p)
    for before, after in zip(fake_state, _state_snapshot(optimizer, modules["fake_score"])):
        assert _states_equal(before, after)


def test_plain_adamw_moves_zero_grad_params():
    """Contrast: without role hiding, zero-filled gradients still move weights (weight decay)."""
    modules = _modules()
    optimizer = torch.optim.AdamW(
        [{"params": list(m.parameters()), "lr": CONFIG.lr, "weight_decay": CONFIG.weight_decay} for m in modules.values()]
    )
    fake_before = _params(modules["fake_score"])
    _set_grads(modules["generator"], "random", seed=0)
    _set_grads(modules["fake_score"], "zero", seed=0)
    optimizer.step()
    assert any(not torch.equal(b, p) for b, p in zip(fake_before, modules["fake_score"].parameters()))
    assert all(p in optimizer.state for p in modules["fake_score"].parameters())


def test_alternating_steps_count_per_role():
    modules = _modules()
    optimizer = _optimizer(modules)
    schedule = ["fake_score", "generator", "fake_score", "fake_score", "generator", "fake_score", "fake_score"]
    for i, role in enumerate(schedule):
        _set_grads(modules["generator"], "random" if role == "generator" else "zero", seed=i)
        _set_grads(modules["fake_score"], "random" if role == "fake_score" else "zero", seed=50 + i)
        optimizer.active_role = role
        optimizer.step()
    for role, module in modules.items():
        for p in module.parameters():
            assert float(optimizer.state[p]["step"]) == schedule.count(role)


@pytest.mark.parametrize("active", [None, "critic"])
def test_step_requires_a_known_active_role(active):
    modules = _modules()
    optimizer = _optimizer(modules)
    _set_grads(modules["generator"], "random", seed=0)
    before = _params(modules["generator"])
    optimizer.active_role = active
    with pytest.raises(RuntimeError, match="generator") as info:
        optimizer.step()
    assert "fake_score" in str(info.value)
    assert all(torch.equal(b, p) for b, p in zip(before, modules["generator"].parameters()))


def test_group_without_role_rejected():
    modules = _modules()
    with pytest.raises(ValueError, match="role"):
        RoleAwareAdamW(
            [role_param_group("generator", modules["generator"].parameters(), CONFIG), {"params": list(modules["fake_score"].parameters())}]
        )


def test_active_role_matches_plain_adamw():
    modules = _modules(seed=3)
    reference = copy.deepcopy(modules["generator"])
    optimizer = _optimizer(modules)
    plain = torch.optim.AdamW(reference.parameters(), lr=CONFIG.lr, betas=CONFIG.betas, weight_decay=CONFIG.weight_decay)
    for step in range(5):
        _set_grads(modules["generator"], "random", seed=step)
        _set_grads(reference, "random", seed=step)
        _set_grads(modules["fake_score"], "random", seed=99)
        optimizer.active_role = "generator"
        optimizer.step()
        plain.step()
    for a, b in zip(modules["generator"].parameters(), reference.parameters()):
        assert torch.equal(a, b)
    for a, b in zip(modules["generator"].parameters(), reference.parameters()):
        sa, sb = optimizer.state[a], plain.state[b]
        assert all(torch.equal(sa[k], sb[k]) for k in ("exp_avg", "exp_avg_sq", "step"))


def test_state_dict_round_trip_keeps_roles():
    modules = _modules()
    optimizer = _optimizer(modules)
    _set_grads(modules["generator"], "random", seed=0)
    optimizer.active_role = "generator"
    optimizer.step()
    clone = _optimizer(copy.deepcopy(modules))
    clone.load_state_dict(optimizer.state_dict())
    assert clone.roles == ["generator", "fake_score"]
    assert len(clone.state) == len(list(modules["generator"].parameters()))


# ----------------------------------------------------------------------------------------------
# OptimizerConfig
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs,shown",
    [
        (dict(lr=0.0), "0.0"),
        (dict(lr=-1e-4), "-0.0001"),
        (dict(betas=(0.9, 1.0)), "1.0"),
        (dict(betas=(-0.1, 0.999)), "-0.1"),
        (dict(weight_decay=-0.01), "-0.01"),
        (dict(warmup_updates=-5), "-5"),
        (dict(grad_clip=0.0), "0.0"),
        (dict(grad_clip=-1.0), "-1.0"),
    ],
)
def test_optimizer_config_rejects_bad_values(kwargs, shown):
    with pytest.raises(ValueError) as info:
        OptimizerConfig(**kwargs)
    assert shown in str(info.value)
    assert next(iter(kwargs)).split("_")[0] in str(info.value)  # names the field too


def test_optimizer_config_accepts_defaults_and_edges():
    config = OptimizerConfig()
    assert (config.lr, config.betas, config.weight_decay, config.grad_clip) == (1e-5, (0.9, 0.999), 0.01, 10.0)
    OptimizerConfig(betas=(0.0, 0.0), weight_decay=0.0, warmup_updates=0, grad_clip=None)


def test_optimizer_config_rejects_nan_lr():
    with pytest.raises(ValueError, match="nan"):
        OptimizerConfig(lr=float("nan"))


def test_warmup_factor():
    assert OptimizerConfig(warmup_updates=0).warmup_factor(0) == 1.0
    config = OptimizerConfig(warmup_updates=4)
    factors = [config.warmup_factor(u) for u in range(8)]
    assert factors == pytest.approx([0.25, 0.5, 0.75, 1.0, 1.0, 1.0, 1.0, 1.0])
    # Linear: constant increments during warm-up.
    assert all(b - a == pytest.approx(0.25) for a, b in zip(factors[:4], factors[1:4]))
    assert 0 < factors[0] <= 1
