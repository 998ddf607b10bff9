"""``FSDP2Strategy``: Lightning's ``ModelParallelStrategy`` as plain FSDP2 data parallelism.

Every process is one data-parallel replica (``data_parallel_size`` = world size, ``tensor_parallel_size`` = 1);
the module shards its own networks with ``fully_shard`` in ``configure_model``
(:meth:`rdm_lightning.methods.base.DistillationModule.configure_model`). Checkpoints are folders of
``torch.distributed.checkpoint`` shards plus Lightning's ``meta.pt`` (the loops, callbacks, schedulers and
hyperparameters); :mod:`rdm_lightning.distributed_checkpoints` reads them back as one checkpoint.

Use it as a second config: ``rdm fit --config configs/sdxl/dmd.yaml --config configs/strategy/fsdp2.yaml``.
"""
from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Any

from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.strategies import ModelParallelStrategy

from rdm_lightning.distributed_checkpoints import METADATA_FILE, checkpoint_entries, is_distributed_checkpoint


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
        import torch
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
