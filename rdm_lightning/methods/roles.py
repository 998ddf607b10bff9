"""Role layouts: how each trainable role (generator, fake score) holds its network (``docs/roles.md``).

- ``full``: its own trainable copy of the denoiser (the default).
- ``lora``: its own frozen copy plus one LoRA adapter (a generator that starts from another
  checkpoint than the teacher: ``init``).
- ``shared_lora``: one LoRA adapter on the frozen teacher's own weights (:func:`shared_copy`): the
  teacher is that base with no adapter. With ``shared_lora`` for both roles the module holds one
  copy of the denoiser's base weights.

Every adapter is a peft LoRA named after its role. A role's checkpoint entries are its trainable
weights only (the frozen base is rebuilt at construction), and its EMA shares the frozen base.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from itertools import chain
import json
from pathlib import Path
from typing import Callable, Iterator, Mapping

import torch
from torch import Tensor, nn

from rdm_lightning.backbones.base import require_path
from rdm_lightning.methods.lora import add_lora, is_adapter_weight, lora_parameters, shared_copy

LAYOUTS = ("full", "lora", "shared_lora")
"""Accepted ``RoleConfig.layout``."""
PRECISIONS = ("float32", "bfloat16")
"""Accepted ``RoleConfig.precision``."""
DIFFUSERS_PREFIXES = ("unet.", "transformer.")
"""Prefixes diffusers' ``save_lora_weights`` puts before the denoiser's module names."""


@dataclass
class RoleConfig:
    """How one trainable role holds its network."""

    layout: str = "full"
    """``full`` (own trainable copy), ``lora`` (own frozen copy + adapter) or ``shared_lora``
    (adapter on the frozen teacher's weights)."""
    rank: int | None = None
    """LoRA rank ``r`` (``lora`` and ``shared_lora``: required)."""
    alpha: float | None = None
    """``lora_alpha``; the adapter adds ``(α/r)·B·A·x``. ``None``: ``alpha = rank``."""
    target_modules: list[str] | str | None = None
    """Modules the LoRA adapts, in peft's form (name suffixes, or one regex); ``None``: the backbone's
    ``lora_target_modules``."""
    dropout: float = 0.0
    """LoRA dropout on the adapter's input (active in train mode only)."""
    precision: str | None = None
    """Compute dtype of the role's forward and backward: ``float32``, or ``bfloat16`` (autocast; the trained
    weights, their gradients and optimizer state stay float32). ``None``: float32, except a ``shared_lora``
    role on a reduced-precision teacher, which runs in the teacher's dtype (its base is the teacher's weights)."""
    gradient_checkpointing: bool = False
    """Recompute the role network's activations in the backward pass instead of storing them (the
    network's own ``enable_gradient_checkpointing``: diffusers models, the digits denoiser)."""
    init: str | None = None
    """A file to start from: the network's weights (``.safetensors``, a torch state dict, or a diffusers
    model folder such as a distilled model's ``transformer/``; ``full``, and the frozen base of ``lora``), or LoRA weights in diffusers' format (the adapter of ``lora`` and
    ``shared_lora``: ``<module>.lora_A.weight`` / ``<module>.lora_B.weight``, optionally under ``unet.``
    or ``transformer.``, as ``save_lora_weights`` writes them)."""

    def __post_init__(self):
        if self.layout not in LAYOUTS:
            raise ValueError(f"role layout must be one of {LAYOUTS}, got {self.layout!r}")
        if self.precision not in (None, *PRECISIONS):
            hint = " (float16 training needs loss scaling, which the roles do not do)" if self.precision == "float16" else ""
            raise ValueError(f"role precision must be one of {PRECISIONS} or None, got {self.precision!r}{hint}")
        if not isinstance(self.gradient_checkpointing, bool):
            raise ValueError(f"gradient_checkpointing must be true or false, got {self.gradient_checkpointing!r}")
        if self.layout == "full":
            unused = {name: getattr(self, name) for name in ("rank", "alpha", "target_modules") if getattr(self, name) is not None}
            if self.dropout != 0.0:
                unused["dropout"] = self.dropout
            if unused:
                raise ValueError(f"layout 'full' trains no adapter, so {unused} would be ignored: "
                                 "use layout 'lora' or 'shared_lora', or drop them")
            return
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise ValueError(f"layout {self.layout!r} needs an integer LoRA rank >= 1, got rank={self.rank!r}")
        if self.alpha is not None and not (0 < self.alpha < math.inf):
            raise ValueError(f"LoRA alpha must be a finite number > 0 (or None: alpha = rank), got {self.alpha!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoRA dropout must lie in [0, 1), got {self.dropout!r}")
        if self.target_modules is not None and not self.target_modules:
            raise ValueError("target_modules is empty: name the modules to adapt, or None for the backbone's")

    @property
    def adapted(self) -> bool:
        """Whether the role trains a LoRA adapter (its base weights frozen)."""
        return self.layout != "full"

    @property
    def lora_alpha(self) -> float:
        """``alpha``, or ``rank`` when unset."""
        return float(self.rank if self.alpha is None else self.alpha)


@dataclass
class RolesConfig:
    """The layout of each trainable role."""

    generator: RoleConfig = field(default_factory=RoleConfig)
    """The generator's layout."""
    fake_score: RoleConfig = field(default_factory=RoleConfig)
    """The fake score's layout."""

    def __getitem__(self, role: str) -> RoleConfig:
        return getattr(self, role)


def read_weights(path: str | Path, what: str) -> dict[str, Tensor]:
    """The tensors of a ``.safetensors`` file, a torch state dict (a Lightning checkpoint's ``state_dict``
    is not accepted: pass the network's own weights), or a diffusers model folder (its
    ``diffusion_pytorch_model*.safetensors`` files, sharded or not: e.g. another model's ``transformer/``)."""
    path = require_path(path, what)
    if path.is_dir():
        from safetensors.torch import load_file

        index = path / "diffusion_pytorch_model.safetensors.index.json"
        if index.is_file():
            shards = sorted({path / name for name in json.loads(index.read_text())["weight_map"].values()})
        else:
            shards = [path / "diffusion_pytorch_model.safetensors"]
        if not all(shard.is_file() for shard in shards):
            raise ValueError(f"{what} {str(path)!r} is a folder without diffusion_pytorch_model.safetensors (or the "
                             "shards its .index.json names): a diffusers model folder, e.g. a pipeline's transformer/")
        return {key: value for shard in shards for key, value in load_file(str(shard)).items()}
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ValueError(f"{what} {str(path)!r} is not a state dict of tensors (a .safetensors file or a torch.save'd "
                         "dict of the network's weights)")
    return state


def is_lora_file(state: Mapping[str, Tensor]) -> bool:
    """Whether a weights file holds LoRA weights (diffusers/peft ``lora_A``/``lora_B`` keys) rather than a network's."""
    return any(".lora_A." in key or ".lora_B." in key for key in state)


def peft_adapter_state(state: Mapping[str, Tensor], adapter: str) -> dict[str, Tensor]:
    """Diffusers-format LoRA weights (``<module>.lora_A.weight``, optionally under ``unet.``/``transformer.``)
    renamed to the names of ``adapter``'s parameters in a peft-injected network (``<module>.lora_A.<adapter>.weight``)."""
    renamed = {}
    for key, value in state.items():
        for prefix in DIFFUSERS_PREFIXES:
            if key.startswith(prefix):
                key = key[len(prefix):]
                break
        for part in ("lora_A", "lora_B"):
            key = key.replace(f".{part}.weight", f".{part}.{adapter}.weight")
        renamed[key] = value
    return renamed


def load_adapter_weights(network: nn.Module, state: Mapping[str, Tensor], adapter: str, path: str) -> None:
    """Load diffusers-format LoRA weights into ``adapter``'s parameters, strictly: every key must be one of
    its weights with the same shape, and every weight of the adapter must be given."""
    own = {name: p for name, p in network.named_parameters() if is_adapter_weight(name) and f".{adapter}." in name}
    given = peft_adapter_state(state, adapter)
    unknown = sorted(set(given) - set(own))
    missing = sorted(set(own) - set(given))
    if unknown or missing:
        raise ValueError(f"LoRA init {path!r} does not fit the {adapter} adapter: unexpected {unknown[:4]}, "
                         f"missing {missing[:4]} (rank and target_modules as the file was trained with?)")
    with torch.no_grad():
        for name, value in given.items():
            if own[name].shape != value.shape:
                raise ValueError(f"LoRA init {path!r}: {name} has shape {tuple(value.shape)}, the adapter's is "
                                 f"{tuple(own[name].shape)} (a different rank?)")
            own[name].copy_(value)


def build_role_network(
    role: str, config: RoleConfig, load_pretrained: Callable[[], nn.Module], teacher: nn.Module, targets, seed: int
) -> nn.Module:
    """``role``'s network in ``config``'s layout: ``load_pretrained()`` (a fresh float32 copy of the denoiser)
    for ``full`` and ``lora``, the ``teacher``'s shared weights for ``shared_lora``; ``targets`` are the
    backbone's LoRA target modules, ``seed`` seeds the adapter's initialisation (A Gaussian, B = 0)."""
    init = read_weights(config.init, f"roles.{role}.init") if config.init is not None else None
    lora_init = init is not None and is_lora_file(init)
    if config.layout == "full":
        if lora_init:
            raise ValueError(f"roles.{role}.init {config.init!r} holds LoRA weights: a full role starts from the "
                             "network's weights; use layout 'lora' or 'shared_lora' for a LoRA file")
        network = load_pretrained()
        if init is not None:
            load_network_weights(network, init, role, config.init)
        return network
    targets = config.target_modules if config.target_modules is not None else targets
    if targets is None:
        raise ValueError(f"roles.{role}.layout={config.layout!r} needs target_modules, and the backbone declares "
                         f"no lora_target_modules: set roles.{role}.target_modules")
    if config.layout == "shared_lora":
        if init is not None and not lora_init:
            raise ValueError(f"roles.{role}.init {config.init!r} holds a network's weights, so the {role}'s network "
                             "would differ from the teacher's, but a shared_lora role adapts the teacher's own "
                             "weights: pass a LoRA file, or use layout 'lora'")
        network = shared_copy(teacher)
    else:
        network = load_pretrained()
        if init is not None and not lora_init:
            load_network_weights(network, init, role, config.init)
    before = {name for name, _ in network.named_modules()}
    try:
        add_lora(network, targets, config.rank, config.lora_alpha, role, seed=seed, dropout=config.dropout)
    except ValueError as err:  # peft: "Target modules ... not found in the base model"
        raise ValueError(f"roles.{role}.target_modules={targets!r} match no module of the network "
                         f"({type(network).__name__}; modules such as {sorted(before)[1:6]}): {err}") from err
    if lora_init:
        load_adapter_weights(network, init, role, config.init)
    return network


def load_network_weights(network: nn.Module, state: Mapping[str, Tensor], role: str, path: str) -> None:
    """The network's own weights from ``roles.<role>.init``, strictly."""
    try:
        network.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise ValueError(f"roles.{role}.init {path!r} does not hold this backbone's network weights: {err}") from err


def trainable_parameters(network: nn.Module, config: RoleConfig) -> list[nn.Parameter]:
    """The parameters a role in ``config``'s layout trains: all of ``full``, the adapter's otherwise."""
    return lora_parameters(network) if config.adapted else list(network.parameters())


def frozen_entry_names(network: nn.Module, config: RoleConfig) -> Iterator[str]:
    """State-dict names of the role network's entries that are rebuilt at construction (its frozen base
    under an adapter layout); none for ``full``."""
    if not config.adapted:
        return iter(())
    trainable = {id(p) for p in trainable_parameters(network, config)}
    return (name for name, t in chain(network.named_parameters(), network.named_buffers()) if id(t) not in trainable)


def load_trained_entries(network: nn.Module, config: RoleConfig, entries: Mapping[str, Tensor]) -> None:
    """Load a role checkpoint's entries (its trained weights; the frozen base is left out of checkpoints)
    into ``network`` in ``config``'s layout: a RuntimeError names any unexpected entry, or a missing one
    that is not part of the frozen base."""
    missing, unexpected = network.load_state_dict(entries, strict=False)
    missing = set(missing) - set(frozen_entry_names(network, config))
    if unexpected or missing:
        raise RuntimeError(f"unexpected {sorted(unexpected)[:4]}, missing {sorted(missing)[:4]}")


def diffusers_lora_state(network: nn.Module, adapter: str, prefix: str = "") -> dict[str, Tensor]:
    """``adapter``'s weights in diffusers' LoRA format: ``<prefix><module>.lora_A.weight`` and ``.lora_B.weight``,
    with the adapter's scale (runtime scale · α/r) folded into B, so a loader that assumes ``alpha = rank``
    (diffusers without adapter metadata) computes exactly ``W + scale·(α/r)·B·A``."""
    from peft.tuners.lora import LoraLayer

    state = {}
    for name, module in network.named_modules():
        if isinstance(module, LoraLayer) and adapter in module.lora_A:
            scaling = module.scaling[adapter]
            state[f"{prefix}{name}.lora_A.weight"] = module.lora_A[adapter].weight.detach().float().contiguous()
            state[f"{prefix}{name}.lora_B.weight"] = (scaling * module.lora_B[adapter].weight.detach().float()).contiguous()
    if not state:
        raise ValueError(f"{type(network).__name__} has no LoRA adapter {adapter!r} to export")
    return state


def ema_copy(network: nn.Module) -> nn.Module:
    """A frozen copy of ``network`` for its EMA whose frozen tensors (an adapter layout's base) are
    ``network``'s own, so the EMA holds a copy of the trained weights only."""
    memo = {id(t): t for t in chain(network.parameters(), network.buffers()) if not t.requires_grad}
    return copy.deepcopy(network, memo=memo).requires_grad_(False).eval()


def role_dtype(role: str, config: RoleConfig, teacher_dtype: torch.dtype) -> torch.dtype:
    """The compute dtype of ``role`` (``RoleConfig.precision``); a ``shared_lora`` role on a reduced-precision
    teacher can only run in the teacher's dtype, since its base weights are the teacher's."""
    shared_reduced = config.layout == "shared_lora" and teacher_dtype != torch.float32
    if config.precision is None:
        return teacher_dtype if shared_reduced else torch.float32
    dtype = getattr(torch, config.precision)
    if shared_reduced and dtype != teacher_dtype:
        raise ValueError(f"roles.{role}.precision={config.precision!r}, but a shared_lora role's base is the teacher's "
                         f"{str(teacher_dtype).removeprefix('torch.')} weights: leave precision unset, or use layout 'lora'")
    return dtype


def enable_gradient_checkpointing(role: str, network: nn.Module) -> None:
    """Switch on the network's own gradient checkpointing (active while it trains), or say it has none."""
    enable = getattr(network, "enable_gradient_checkpointing", None)
    if enable is None:
        raise ValueError(f"roles.{role}.gradient_checkpointing: {type(network).__name__} has no "
                         "enable_gradient_checkpointing() (diffusers models and the digits denoiser do)")
    enable()


def run_under_autocast(network: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Make every forward of ``network`` run under ``torch.autocast(dtype)`` on its input's device (a
    shared_lora role whose base is a reduced-precision teacher's weights; the adapter stays float32).
    Hooks on the module itself, so the EMA and any other copy keep the behaviour. Returns ``network``."""
    network.register_forward_pre_hook(_enter_autocast)
    network.register_forward_hook(_exit_autocast, always_call=True)
    network.autocast_dtype = dtype
    network.autocast_stack = []
    return network


def _enter_autocast(module: nn.Module, args) -> None:
    device = next((a.device.type for a in args if isinstance(a, Tensor)), "cpu")
    context = torch.autocast(device, dtype=module.autocast_dtype)
    context.__enter__()
    module.autocast_stack.append(context)


def _exit_autocast(module: nn.Module, args, output) -> None:
    module.autocast_stack.pop().__exit__(None, None, None)


def stage1_role_config(hparams: Mapping, role: str) -> RoleConfig | None:
    """``roles.<role>`` of a checkpoint's saved hyperparameters (a :class:`RolesConfig`, or its dict form);
    ``None`` when the checkpoint names none."""
    roles = hparams.get("roles")
    config = roles.get(role) if isinstance(roles, Mapping) else getattr(roles, role, None)
    if isinstance(config, Mapping):
        return RoleConfig(**config)
    return config if isinstance(config, RoleConfig) else None
