"""DMD under DDP on CPU: 2 processes, gloo: k is identical on every rank.

The processes are forked (``start_method="fork"``, Lightning's ``ddp_notebook``):
``ddp_spawn`` pickles the module through shared memory, which some sandboxes
refuse, and ``ddp`` re-launches the command line, which from pytest would be
pytest itself. DMD's manual optimization runs two backward passes per
iteration, each into one role only, so DDP needs ``find_unused_parameters=True``
(Lightning's ``ddp_find_unused_parameters_true``); the default DDP strategy
stops with Lightning's "parameters that were not used" error.
"""
from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.strategies import DDPStrategy

from rdm_lightning.backbones.digits import DigitsBackbone
from rdm_lightning.data.digits import DigitsDataModule
from rdm_lightning.methods import DMD, DMDConfig, OptimizerConfig, StudentConfig



WORLD_SIZE = 2


class RecordingDMD(DMD):
    """DMD that records, per iteration, its local draw of k and the shared (broadcast) k, and dumps
    its trained weights when training ends, one file per rank."""

    def __init__(self, *args, out_dir: str = "", **kwargs):
        super().__init__(*args, **kwargs)
        self.out_dir = out_dir
        self.local_steps: list[int] = []
        self.shared_steps: list[int] = []

    def shared_randint(self, high: int) -> int:
        peek = torch.Generator()
        peek.set_state(self.rng.get_state())
        self.local_steps.append(int(torch.randint(high, (1,), generator=peek)))
        value = super().shared_randint(high)
        self.shared_steps.append(value)
        return value

    def on_train_end(self) -> None:
        rank = self.global_rank
        record = {
            "rank": rank,
            "world_size": self.trainer.world_size,
            "local_steps": self.local_steps,
            "shared_steps": self.shared_steps,
            "iterations": self.iterations,
            "generator_updates": self.generator_updates,
        }
        Path(self.out_dir, f"rank{rank}.json").write_text(json.dumps(record))
        torch.save(
            {name: getattr(self, name).state_dict() for name in ("generator", "fake_score", "discriminator_head")},
            Path(self.out_dir, f"rank{rank}.pt"),
        )


def test_ddp_ranks_share_k_and_weights(tiny_digits_teacher, tmp_path):
    module = RecordingDMD(
        DigitsBackbone(path=str(tiny_digits_teacher)),
        dmd=DMDConfig(generator_update_ratio=2, gan_generator_weight=1e-2),
        generator_optimizer=OptimizerConfig(lr=1e-3),
        fake_score_optimizer=OptimizerConfig(lr=1e-3),
        student=StudentConfig(num_steps=4),
        out_dir=str(tmp_path),
    )
    strategy = DDPStrategy(
        start_method="fork", find_unused_parameters=True, process_group_backend="gloo", timeout=timedelta(seconds=120)
    )
    trainer = L.Trainer(
        accelerator="cpu",
        devices=WORLD_SIZE,
        strategy=strategy,
        max_steps=12,  # 8 iterations, the generator updating on every second one
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
    )
    trainer.fit(module, DigitsDataModule(batch_size=16))

    records = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(WORLD_SIZE)]
    assert [r["world_size"] for r in records] == [WORLD_SIZE] * WORLD_SIZE
    assert [r["iterations"] for r in records] == [8] * WORLD_SIZE
    assert [r["generator_updates"] for r in records] == [4] * WORLD_SIZE
    rank0, rank1 = records
    assert len(rank0["shared_steps"]) == 8
    # Every rank trained the same backward-simulation step k at every iteration: rank 0's draw.
    assert rank0["shared_steps"] == rank1["shared_steps"] == rank0["local_steps"]
    assert all(0 <= k < 4 for k in rank0["shared_steps"])
    # The ranks' own streams differ (seed + rank), so the agreement comes from the broadcast.
    assert rank0["local_steps"] != rank1["local_steps"]

    # After the all-reduced updates the trained roles are identical on both ranks...
    states = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD_SIZE)]
    for name in ("generator", "fake_score", "discriminator_head"):
        a, b = states[0][name], states[1][name]
        assert all(torch.equal(a[k], b[k]) for k in a), name
    # ...and they did train.
    teacher = DigitsBackbone(path=str(tiny_digits_teacher)).load_denoiser().state_dict()
    assert not all(torch.equal(teacher[k], v) for k, v in states[0]["generator"].items())


def ddp_fit(teacher: Path, checkpoints: Path, budget: int, ckpt_path: Path | None = None) -> Path:
    """A 2-process DMD fit checkpointing every 2 generator updates into ``checkpoints``; returns its last.ckpt."""
    from rdm_lightning.callbacks import RunCheckpoint

    module = DMD(DigitsBackbone(path=str(teacher)), dmd=DMDConfig(generator_update_ratio=2),
                 generator_optimizer=OptimizerConfig(lr=1e-3), fake_score_optimizer=OptimizerConfig(lr=1e-3),
                 student=StudentConfig(num_steps=2), max_generator_updates=budget)
    strategy = DDPStrategy(
        start_method="fork", find_unused_parameters=True, process_group_backend="gloo", timeout=timedelta(seconds=120)
    )
    trainer = L.Trainer(
        accelerator="cpu", devices=WORLD_SIZE, strategy=strategy, max_epochs=-1, logger=False,
        callbacks=[RunCheckpoint(every_n_updates=2, dirpath=str(checkpoints))], enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
    )
    # weights_only=False: built outside LightningCLI, the hyperparameters hold the backbone object itself.
    trainer.fit(module, DigitsDataModule(batch_size=16), ckpt_path=ckpt_path, weights_only=False)
    return checkpoints / "last.ckpt"


def test_ddp_resume_mid_epoch_continues_bit_for_bit(tiny_digits_teacher, tmp_path):
    # 44 batches an epoch on each rank (Lightning's distributed sampler over the shuffled order): 11 iterations
    # stop mid-epoch, and the resumed loaders must skip on each rank what that rank consumed.
    reference = torch.load(ddp_fit(tiny_digits_teacher, tmp_path / "reference", budget=6), weights_only=False)
    stopped = torch.load(ddp_fit(tiny_digits_teacher, tmp_path / "resumed", budget=3), weights_only=False)
    assert stopped["loops"]["fit_loop"]["state_dict"]["combined_loader"] == [{"epoch": 0, "batches": 5}]
    resumed = torch.load(
        ddp_fit(tiny_digits_teacher, tmp_path / "resumed", budget=6, ckpt_path=tmp_path / "resumed" / "last.ckpt"),
        weights_only=False,
    )
    assert resumed["rdm"]["role_updates"] == reference["rdm"]["role_updates"] == {"generator": 6, "fake_score": 11}
    for key, value in reference["state_dict"].items():
        assert torch.equal(resumed["state_dict"][key], value), key
