"""LoRA on a frozen network that shares its base weights (DMDR's ``critic: lora_on_teacher``, dmdr.md §2).

:func:`shared_lora_copy` builds a structural copy of a frozen network whose
parameters and buffers *are* the original's (no second copy of the weights)
and injects one peft LoRA adapter into the copy only; the original stays
adapter-free. :func:`lora_scale` sets the adapter's runtime scale for a block
of code (DMDR: 2.0 for the fake score, ``s_r(u)`` for the real score).

peft is an optional dependency (the ``lora`` extra), imported only when a LoRA is built.
"""
from __future__ import annotations

import copy
from contextlib import contextmanager
from itertools import chain
from typing import Iterator, Sequence

import torch
from torch import nn


def require_peft():
    """The ``peft`` module, or an ImportError saying how to install it."""
    try:
        import peft
    except ImportError as err:
        raise ImportError(
            "the LoRA critic (critic: lora_on_teacher) needs peft: `pip install peft` "
            "or install this package with the `lora` extra (`pip install rdm-lightning[lora]`)"
        ) from err
    return peft


def lora_layers(module: nn.Module) -> list[nn.Module]:
    """Every peft LoRA layer inside ``module``."""
    from peft.tuners.lora import LoraLayer

    return [m for m in module.modules() if isinstance(m, LoraLayer)]


def set_lora_scale(module: nn.Module, adapter: str, scale: float) -> None:
    """Set ``adapter``'s runtime scale to ``scale`` in every LoRA layer of ``module``.

    peft's ``LoraLayer.set_scale`` makes the layer's update ``scale·(α/r)·B·A·x``; scale 0 adds nothing.
    """
    for layer in lora_layers(module):
        layer.set_scale(adapter, scale)


@contextmanager
def lora_scale(module: nn.Module, adapter: str, scale: float) -> Iterator[None]:
    """Run the block with ``adapter`` at runtime ``scale``; each layer's previous scaling is restored on exit."""
    layers = [layer for layer in lora_layers(module) if adapter in layer.scaling]
    if not layers:
        raise ValueError(f"{type(module).__name__} has no LoRA layer with adapter {adapter!r}")
    previous = [layer.scaling[adapter] for layer in layers]
    for layer in layers:
        layer.set_scale(adapter, scale)
    try:
        yield
    finally:
        for layer, value in zip(layers, previous):
            layer.scaling[adapter] = value


def shared_copy(module: nn.Module) -> nn.Module:
    """A structural copy of ``module`` whose parameters and buffers are the same tensors as ``module``'s."""
    memo = {id(t): t for t in chain(module.parameters(), module.buffers())}
    return copy.deepcopy(module, memo=memo)


def shared_lora_copy(
    network: nn.Module,
    target_modules: Sequence[str] | str,
    rank: int,
    alpha: float,
    adapter: str,
    scale: float = 1.0,
    seed: int = 0,
) -> nn.Module:
    """``network`` plus one LoRA adapter, sharing ``network``'s (frozen) weights.

    The adapter (``r = rank``, ``lora_alpha = alpha``) targets peft's ``target_modules``
    (names matched as suffixes, or one regex) and is initialised Gaussian: A ~ N(0, 1/r),
    B = 0, so the copy computes exactly what ``network`` does until B moves. The LoRA
    weights are float32 whatever the base dtype, their initialisation is seeded by
    ``seed``, and the adapter starts at runtime ``scale``. The base weights are not
    trainable (``requires_grad`` False); only the LoRA weights are.
    """
    peft = require_peft()
    targets = target_modules if isinstance(target_modules, str) else list(target_modules)
    config = peft.LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets, init_lora_weights="gaussian")
    shared = {id(t) for t in chain(network.parameters(), network.buffers())}
    critic = shared_copy(network)
    # peft initialises the adapter on the CPU before moving it to the base layer's device.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        peft.inject_adapter_in_model(config, critic, adapter_name=adapter)
    for param in critic.parameters():
        if id(param) in shared:
            param.requires_grad_(False)
        else:
            # peft casts the adapter to the base dtype; the trained LoRA weights stay float32.
            param.data = param.data.float()
    set_lora_scale(critic, adapter, scale)
    return critic
