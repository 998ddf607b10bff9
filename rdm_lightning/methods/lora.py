"""peft LoRA adapters on role networks.

- ``add_lora(shared_copy(teacher), ...)``: a structural copy of a frozen network whose parameters
  and buffers *are* the original's (no second copy of the weights), with one LoRA adapter in the
  copy only: the ``shared_lora`` role layout (docs/roles.md). :func:`lora_scale` sets the adapter's runtime
  scale for a block of code (DMDR's critic: 2.0 for the fake score, ``s_r(u)`` for the real score).
- :func:`add_lora`, :func:`lora_parameters`, :func:`merge_lora`: the ``lora`` layout and RTDMD's
  stage-1 → stage-2 merge (docs/methods/rtdmd.md, "LoRA roles"): stage 2 merges stage 1's adapters into
  the base weights before training fresh ones, and export merges the last ones.

peft is an optional dependency (the ``lora`` extra), imported only when a LoRA is built.
"""
from __future__ import annotations

import copy
from contextlib import contextmanager
from itertools import chain
from typing import Iterator, Mapping, Sequence

import torch
from torch import Tensor, nn

ADAPTER_MARKERS = ("lora_A", "lora_B", "lora_embedding", "lora_magnitude")
"""Substrings of the names of peft's adapter weights (``...conv1.lora_A.<adapter>.weight``)."""
LORA_KEY_MARKERS = (*ADAPTER_MARKERS, ".base_layer.")
"""Substrings of peft LoRA entries in a state dict, the adapted layers' base weights included."""


def require_peft():
    """The ``peft`` module, or an ImportError saying how to install it."""
    try:
        import peft
    except ImportError as err:
        raise ImportError(
            "LoRA role layouts (roles.<role>.layout: lora / shared_lora) need peft: `pip install peft` "
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


def add_lora(
    network: nn.Module,
    target_modules: Sequence[str] | str,
    rank: int,
    alpha: float,
    adapter: str,
    scale: float = 1.0,
    seed: int = 0,
    dropout: float = 0.0,
) -> nn.Module:
    """Inject one LoRA adapter into ``network`` in place and freeze everything else; returns ``network``.

    The adapter (``r = rank``, ``lora_alpha = alpha``) targets peft's ``target_modules``
    (names matched as suffixes, or one regex) and is initialised Gaussian: A ~ N(0, 1/r),
    B = 0, so the network computes exactly what it did until B moves. The LoRA weights are
    float32 whatever the base dtype, their initialisation is seeded by ``seed``, and the
    adapter starts at runtime ``scale``; ``dropout`` is peft's ``lora_dropout`` on the adapter's input
    (train mode only). The base weights are not trainable
    (``requires_grad`` False); only the LoRA weights are (:func:`lora_parameters`).
    """
    peft = require_peft()
    targets = target_modules if isinstance(target_modules, str) else list(target_modules)
    config = peft.LoraConfig(
        r=rank, lora_alpha=alpha, target_modules=targets, lora_dropout=dropout, init_lora_weights="gaussian"
    )
    base = {id(t) for t in chain(network.parameters(), network.buffers())}
    # peft initialises the adapter on the CPU before moving it to the base layer's device.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        peft.inject_adapter_in_model(config, network, adapter_name=adapter)
    for param in network.parameters():
        if id(param) in base:
            param.requires_grad_(False)
        else:
            # peft casts the adapter to the base dtype; the trained LoRA weights stay float32.
            param.data = param.data.float()
    set_lora_scale(network, adapter, scale)
    return network


def is_adapter_weight(name: str) -> bool:
    """Whether a parameter or state-dict name is one of peft's adapter weights (``...lora_A.<adapter>.weight``)."""
    return any(marker in name for marker in ADAPTER_MARKERS)


def lora_parameters(network: nn.Module) -> list[nn.Parameter]:
    """The LoRA weights of every adapter in ``network`` (peft's ``lora_A``/``lora_B``/... parameters)."""
    return [p for name, p in network.named_parameters() if is_adapter_weight(name)]


def has_lora_entries(state: Mapping[str, Tensor]) -> bool:
    """Whether a state dict holds peft LoRA entries (``...lora_A.<adapter>...``, ``...base_layer.weight``)."""
    return any(marker in key for key in state for marker in LORA_KEY_MARKERS)


def load_base_weights(network: nn.Module, state: Mapping[str, Tensor]) -> None:
    """Load the plain network weights ``state`` into the base layers of a LoRA'd ``network``, strictly;
    the adapters are left as they are."""
    from peft.tuners.lora import LoraLayer

    adapted = {name for name, module in network.named_modules() if isinstance(module, LoraLayer)}
    based = {}
    for key, value in state.items():
        owner, _, leaf = key.rpartition(".")
        based[f"{owner}.base_layer.{leaf}" if owner in adapted else key] = value
    missing, unexpected = network.load_state_dict(based, strict=False)
    missing = [key for key in missing if not is_adapter_weight(key)]
    if missing or unexpected:
        raise RuntimeError(f"weights do not fit the network's base: missing {missing}, unexpected {unexpected}")


def merge_lora(network: nn.Module) -> nn.Module:
    """Fold every LoRA adapter of ``network`` into its base weights and remove the LoRA layers, in place.

    Each peft layer's base weight becomes ``W + scale·(α/r)·B·A`` (per adapter, at its current runtime
    scale), in the base weight's dtype, and the layer is replaced by its base layer, so the result
    is the plain network that computes what the adapted one did. Returns ``network``.
    """
    from peft.tuners.lora import LoraLayer

    adapted = [(name, module) for name, module in network.named_modules() if isinstance(module, LoraLayer)]
    if not adapted:
        raise ValueError(f"{type(network).__name__} has no LoRA layer to merge")
    for name, layer in adapted:
        layer.merge(safe_merge=True)
        parent_name, _, child = name.rpartition(".")
        setattr(network.get_submodule(parent_name) if parent_name else network, child, layer.get_base_layer())
    return network


def merged_copy(network: nn.Module) -> nn.Module:
    """``network`` itself when it has no LoRA; otherwise a copy with its adapters merged (:func:`merge_lora`)."""
    if not lora_parameters(network):
        return network
    return merge_lora(copy.deepcopy(network))
