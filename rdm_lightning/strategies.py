"""The strategies a distillation module scales out with (docs/scaling.md).

``FSDP2Strategy``: Lightning's ``ModelParallelStrategy`` as plain FSDP2 data parallelism.

Every process is one data-parallel replica (``data_parallel_size`` = world size, ``tensor_parallel_size`` = 1);
the module shards its own networks with ``fully_shard`` in ``configure_model``
(:meth:`rdm_lightning.methods.base.DistillationModule.configure_model`). Checkpoints are folders of
``torch.distributed.checkpoint`` shards plus Lightning's ``meta.pt`` (the loops, callbacks, schedulers and
hyperparameters); :mod:`rdm_lightning.distributed_checkpoints` reads them back as one checkpoint.

Use it as a second config: ``rdm fit --config configs/sdxl/dmd.yaml --config configs/strategy/fsdp2.yaml``.

``DeepSpeedZeroStrategy``: Lightning's ``DeepSpeedStrategy`` (ZeRO-1/2/3) whose checkpoints leave out the frozen
networks the module rebuilds, as ``rdm fit``'s single-file checkpoints do; presets
``configs/strategy/deepspeed_zero2.yaml`` and ``deepspeed_zero3.yaml``.
"""
from __future__ import annotations

from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any, Iterator

import torch
from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.strategies import DeepSpeedStrategy, ModelParallelStrategy
from torch import nn

from rdm_lightning.distributed_checkpoints import (
    METADATA_FILE,
    checkpoint_entries,
    deepspeed_world_size,
    is_distributed_checkpoint,
)


class FSDP2Strategy(ModelParallelStrategy):
    """FSDP2 over all processes: ``ModelParallelStrategy(data_parallel_size=world size, tensor_parallel_size=1)``,
    saving distributed checkpoints (one folder, a shard per rank).

    Resuming loads exactly the model entries the checkpoint holds; the module's other entries must be ones
    it rebuilds itself (``is_frozen_state_key``: the frozen teacher, backbone and LoRA bases, which
    ``rdm fit`` checkpoints leave out). Lightning's own ``ModelParallelStrategy`` asks the checkpoint for
    every entry, the frozen ones included, and cannot resume such a checkpoint.

    Args:
        process_group_backend: ``nccl`` on GPUs by default; ``gloo`` on CPU (the tests).
        timeout: of the collectives.
    """

    def __init__(self, process_group_backend: str | None = None, timeout: timedelta | None = default_pg_timeout):
        super().__init__(
            data_parallel_size="auto",
            tensor_parallel_size=1,
            save_distributed_checkpoint=True,
            process_group_backend=process_group_backend,
            timeout=timeout,
        )

    def setup_environment(self) -> None:
        # ModelParallelStrategy's "auto" data parallelism spans the nodes only (tensor parallel within a node).
        self._data_parallel_size = self.num_nodes * self.num_processes
        super().setup_environment()

    def load_checkpoint(self, checkpoint_path: _PATH, weights_only: bool | None = None) -> dict[str, Any]:
        """Load the model entries and optimizer states of a distributed checkpoint (in place, sharded) and
        return the rest of it (``meta.pt``) for Lightning to restore loops, callbacks and schedulers.

        Raises:
            ValueError: ``checkpoint_path`` is not a distributed checkpoint folder, the checkpoint lacks an
                entry the module does not rebuild, or holds one the module does not have.
        """
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
            get_optimizer_state_dict,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        path = Path(self.broadcast(checkpoint_path))
        if not is_distributed_checkpoint(path):
            raise ValueError(f"FSDP2Strategy resumes from a distributed checkpoint folder (with {METADATA_FILE} and "
                             f"torch.distributed.checkpoint's .metadata), got {str(path)!r}")
        module = self.lightning_module
        rebuilt = getattr(module, "is_frozen_state_key", lambda key: False)
        model_state = get_model_state_dict(self.model)
        saved = checkpoint_entries(path, "state_dict")
        missing = sorted(k for k in model_state if k not in saved and not rebuilt(k))
        unexpected = sorted(saved - set(model_state))
        if missing or unexpected:
            raise ValueError(f"checkpoint {str(path)!r} does not fit the module: missing {missing[:4]}, unexpected "
                             f"{unexpected[:4]} (a different method, role layout or EMA setting?)")
        state = {"state_dict": {k: v for k, v in model_state.items() if k in saved}}
        dcp.load(state, checkpoint_id=path)
        set_model_state_dict(self.model, state["state_dict"], options=StateDictOptions(strict=False))
        for index, optimizer in enumerate(self.optimizers):
            key = f"optimizer_{index}"
            optimizer_state = {key: get_optimizer_state_dict(self.model, optimizer)}
            dcp.load(optimizer_state, checkpoint_id=path)
            set_optimizer_state_dict(self.model, optimizer, optimizer_state[key], options=StateDictOptions(cpu_offload=True))
        # Lightning drops fit's weights_only on this (restore-after-setup) path; None means False, as in its own
        # single-file loader: the checkpoint holds the hyperparameters' objects and the random streams' states.
        return torch.load(path / METADATA_FILE, map_location="cpu", weights_only=bool(weights_only))


@contextmanager
def trained_entries_only(module: nn.Module) -> Iterator[None]:
    """Inside the block, ``module.state_dict()`` leaves out the entries the module rebuilds at construction
    (``is_frozen_state_key``: the teacher, backbone and LoRA bases) and those entries' parameters count as
    trainable (``requires_grad``), so that DeepSpeed saves and loads the rest only.

    DeepSpeed saves every parameter its optimizer does not own ("frozen") a second time, whole under ZeRO-2 and
    partitioned under ZeRO-3 (``frozen_param_fragments``), and reloads each of them from there; the parameters
    that remain frozen inside the block are the trained ones outside the optimizer (the generator's EMA).
    A module without ``is_frozen_state_key`` is left as it is.
    """
    rebuilt = getattr(module, "is_frozen_state_key", None)
    if rebuilt is None:
        yield
        return

    def prune(_module: nn.Module, state_dict: dict, prefix: str, _metadata) -> None:
        for key in [k for k in state_dict if k.startswith(prefix) and rebuilt(k[len(prefix):])]:
            del state_dict[key]

    frozen = [p for name, p in module.named_parameters() if rebuilt(name) and not p.requires_grad]
    handle = module.register_state_dict_post_hook(prune)
    for param in frozen:
        param.requires_grad_(True)
    try:
        yield
    finally:
        handle.remove()
        for param in frozen:
            param.requires_grad_(False)


def keep_float32(network: nn.Module, shared_with: nn.Module) -> int:
    """Cast ``network``'s floating parameters back to float32 after DeepSpeed's engine cast every parameter of the
    module to bf16 or fp16, except the tensors it shares with ``shared_with`` (an EMA's frozen adapter base is the
    generator's own). Under ZeRO-3 the partitions are cast, which the gathers then follow. Returns how many
    parameters were cast.

    The generator's EMA needs it: an averaging step ``(1 − decay)·(live − ema)`` smaller than half of bf16's
    spacing at ``ema`` (2⁻⁸ of it) is lost, so at decay 0.99 or more a bf16 EMA stops following the generator.
    """
    shared = {id(p) for p in shared_with.parameters()}
    cast = 0
    for param in network.parameters():
        if id(param) in shared or not param.is_floating_point() or param.dtype == torch.float32:
            continue
        if hasattr(param, "ds_tensor"):  # ZeRO-3: the whole tensor is gathered in its partition's dtype
            param.ds_tensor.data = param.ds_tensor.data.float()
        param.data = param.data.float()
        cast += 1
    return cast


class DeepSpeedZeroStrategy(DeepSpeedStrategy):
    """Lightning's ``DeepSpeedStrategy`` (every argument is Lightning's: ``stage``, ``config``, offloading...)
    whose checkpoint folders hold exactly the entries a single-file ``rdm fit`` checkpoint holds: the trained
    roles (module state and ZeRO's optimizer shards with their float32 master weights), the generator's EMA,
    and Lightning's state; not the frozen teacher, backbone and LoRA bases, which the module rebuilds
    (:func:`trained_entries_only`). Resuming loads the entries the folder holds and checks that every other one
    is rebuilt. ``rdm sample`` / ``rdm export`` read the folder through
    :func:`rdm_lightning.distributed_checkpoints.load_from_checkpoint`.

    Under ``bf16-mixed`` (or ``16-mixed``) DeepSpeed's engine casts every parameter of the module to that dtype;
    the generator's EMA is cast back to float32 (:func:`keep_float32`), as it is under DDP, so that it keeps
    averaging at decays of 0.99 and above. The trained roles keep their float32 master weights in ZeRO's optimizer.

    Lightning's own strategy trains the same, but saves the frozen networks into every checkpoint (twice:
    module state and DeepSpeed's copy of the parameters outside its optimizer); its ``exclude_frozen_parameters``
    would also drop the EMA, which is frozen too, so it is refused here.
    """

    def setup(self, trainer) -> None:
        if self.exclude_frozen_parameters:
            raise ValueError("DeepSpeedZeroStrategy(exclude_frozen_parameters=True): the strategy leaves out the frozen "
                             "networks the module rebuilds itself; DeepSpeed's flag would also drop the generator's EMA "
                             "(frozen, but trained): leave it False")
        super().setup(trainer)
        module = self.lightning_module
        if getattr(module, "generator_ema", None) is not None:
            keep_float32(module.generator_ema, module.generator)

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: _PATH, storage_options: Any | None = None) -> None:
        """Lightning's DeepSpeed save (a folder: ``latest``, ``checkpoint/*_model_states.pt`` and
        ``checkpoint/*_optim_states.pt``, on every rank) of the trained entries only."""
        with trained_entries_only(self.lightning_module):
            super().save_checkpoint(checkpoint, filepath, storage_options)

    def load_checkpoint(self, checkpoint_path: _PATH, weights_only: bool | None = None) -> dict[str, Any]:
        """Load the trained entries and (when fitting) ZeRO's optimizer state of a checkpoint folder into the
        engine, and return the rest (Lightning's loops, callbacks, schedulers, hyperparameters, the module's
        counters) for Lightning to restore; a single file under ``load_full_weights`` as Lightning does.

        Raises:
            ValueError: the folder lacks an entry the module does not rebuild, or holds one the module does not
                have (under ``strict_loading``, Lightning's default); or, when fitting, it was written by another
                number of processes (ZeRO's optimizer state is split per process, and DeepSpeed cannot re-split it).
        """
        if self.load_full_weights and self.zero_stage_3:
            return super().load_checkpoint(checkpoint_path, weights_only)
        from lightning.fabric.strategies.deepspeed import _validate_checkpoint_directory
        from lightning.pytorch.trainer.states import TrainerFn

        _validate_checkpoint_directory(checkpoint_path)
        module = self.lightning_module
        fitting = module.trainer.state.fn == TrainerFn.FITTING
        written_by = deepspeed_world_size(checkpoint_path)
        if fitting and written_by != self.world_size:
            raise ValueError(f"checkpoint {str(checkpoint_path)!r} was written by {written_by} processes and this run has "
                             f"{self.world_size}: ZeRO's optimizer state is split per process and DeepSpeed cannot split "
                             f"it anew; resume with {written_by} processes (devices × num_nodes); its weights are read "
                             "in one process by rdm sample, rdm evaluate and rdm export")
        rebuilt = getattr(module, "is_frozen_state_key", lambda key: False)

        def load_trained_entries(src: dict, dst: nn.Module) -> None:
            missing, unexpected = dst.load_state_dict(src, strict=False)
            missing = sorted(k for k in missing if not rebuilt(k))
            if module.strict_loading and (missing or unexpected):
                raise ValueError(f"checkpoint {str(checkpoint_path)!r} does not fit the module: missing {missing[:4]}, "
                                 f"unexpected {sorted(unexpected)[:4]} (a different method, role layout or EMA setting?)")

        with trained_entries_only(module):
            _, client_state = self.deepspeed_engine.load_checkpoint(
                checkpoint_path,
                load_optimizer_states=fitting,
                load_lr_scheduler_states=False,
                custom_load_fn=load_trained_entries,
            )
        if client_state is None:
            raise ValueError(f"DeepSpeed could not load {str(checkpoint_path)!r}: not a checkpoint folder DeepSpeed wrote")
        return client_state
