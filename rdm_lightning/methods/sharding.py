"""FSDP2 (``torch.distributed.fsdp.fully_shard``) of a distillation module's networks.

Each network (the teacher, a role, the generator's EMA, the discriminator head) is sharded on its own:
first the units its backbone names (:meth:`~rdm_lightning.backbones.base.Backbone.shard_units`: the
repeated blocks), then its root, which takes the rest. So no unit ever holds two networks' weights, and
the frozen reduced-precision teacher and the float32 trainable roles never share a unit's dtype. The
role layouts (docs/roles.md) that FSDP2 can hold are ``full`` and ``lora``.
"""
from __future__ import annotations

from dataclasses import fields
from typing import Sequence

import torch
from torch import nn

from rdm_lightning.methods.roles import RolesConfig

SHARDABLE_LAYOUTS = ("full", "lora")
"""Role layouts FSDP2 can shard (a role with its own network)."""


def check_shardable_roles(roles: RolesConfig) -> None:
    """A ValueError naming each role whose layout FSDP2 cannot hold, and why.

    A ``shared_lora`` role's base weights are the teacher's own tensors. FSDP2 gives each parameter to one
    unit of one network, so sharding the teacher and the role would each keep its own copy of the base (the
    memory the layout exists to save), and the role's unit would mix the teacher's reduced-precision base
    with its float32 adapter.
    """
    refused = {f"roles.{f.name}.layout": getattr(roles, f.name).layout for f in fields(roles)
               if getattr(roles, f.name).layout not in SHARDABLE_LAYOUTS}
    if refused:
        raise ValueError(f"{refused} cannot be sharded with FSDP2: a shared_lora role adapts the teacher's own weights, "
                         "which FSDP2 cannot put in a second network's units without copying them; accepted under "
                         f"FSDP2: {SHARDABLE_LAYOUTS} (own base weights), or train shared_lora roles under DeepSpeed or DDP")


def network_dtype(name: str, network: nn.Module) -> torch.dtype:
    """The one dtype of ``network``'s parameters, or a ValueError naming them (an FSDP unit of mixed dtypes
    would all-gather the frozen and the trained weights in one buffer)."""
    dtypes = {p.dtype for p in network.parameters()}
    if len(dtypes) != 1:
        raise ValueError(f"{name} has parameters of dtypes {sorted(map(str, dtypes))}; FSDP2 shards a network of one dtype")
    return dtypes.pop()


def weight_fingerprint(network: nn.Module) -> list[float]:
    """Per-tensor float64 sums of ``network``'s parameters and buffers: equal on ranks that hold equal weights."""
    with torch.no_grad():
        return [float(t.double().sum()) for t in (*network.parameters(), *network.buffers())]


def check_same_on_every_rank(name: str, network: nn.Module, gather) -> None:
    """A RuntimeError unless every rank built ``network`` with the same weights (``gather(value)``: the
    value of every rank, in rank order). FSDP2, unlike DDP, broadcasts nothing: each rank keeps its own
    shard of what it built, so a randomly initialised part built differently per rank would train as a
    mixture of the ranks' initialisations."""
    fingerprints = gather(weight_fingerprint(network))
    differing = [rank for rank, fingerprint in enumerate(fingerprints) if fingerprint != fingerprints[0]]
    if differing:
        raise RuntimeError(f"ranks {differing} built other initial weights for {name} than rank 0: seed every rank "
                           "alike before building the module (the config's seed_everything, or lightning.seed_everything)")


def is_sharded(module: nn.Module) -> bool:
    """Whether ``fully_shard`` has been applied to ``module``."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(module, FSDPModule)


def shard_network(name: str, network: nn.Module, units: Sequence[nn.Module], mesh) -> None:
    """``fully_shard`` each of ``units`` (submodules of ``network``), then ``network`` itself, over ``mesh``.

    Every unit, the root included, frees its gathered weights after each forward
    (``reshard_after_forward=True``; FSDP2 would keep the root's): between forwards each parameter is its
    shard, the tensor the role's optimizer steps and the module's ``trainable_role`` switches.

    Raises:
        ValueError: a unit is not a proper submodule of ``network``, is named twice, or the network mixes dtypes.
    """
    from torch.distributed.fsdp import fully_shard

    network_dtype(name, network)
    inside = {id(m) for m in network.modules() if m is not network}
    seen: set[int] = set()
    for unit in units:
        if id(unit) not in inside or id(unit) in seen:
            raise ValueError(f"shard unit {type(unit).__name__} of {name} is not a distinct submodule of the network "
                             "(Backbone.shard_units must name each of the network's own blocks once)")
        seen.add(id(unit))
    for unit in units:
        fully_shard(unit, mesh=mesh, reshard_after_forward=True)
    fully_shard(network, mesh=mesh, reshard_after_forward=True)
