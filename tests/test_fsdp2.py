"""FSDP2 (rdm_lightning.strategies.FSDP2Strategy) on CPU: 2 processes under torchrun, gloo, digits DMD.

The multi-process part runs once (tests/fsdp2_worker.py: a DDP fit, an FSDP2 fit, an FSDP2 fit stopped at
half its budget and resumed), and the tests below read what each rank recorded. With two ranks both DDP's
all-reduce and FSDP2's reduce-scatter average exactly (a/2 + b/2 and (a + b)/2 are the same floats), so
sharded training equals DDP's up to the rounding of the CPU kernels, which may differ on FSDP2's all-gathered
parameters (views into one flat buffer): bit for bit on some CPUs, a few float32 ulps (1.5e-8 after 4 updates)
on others (an AVX2 AMD EPYC), where training moved every weight by 2.6e-6 or more. Ranks agree bit for bit, and
so does a resumed FSDP2 run with an uninterrupted one. The rest runs in this process: the checkpoint folder
read back without a process group, the strategy and layout checks, and the shard units.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy
from torch import nn

from rdm_lightning.backbones.base import repeated_blocks
from rdm_lightning.backbones.digits import DigitsBackbone
from rdm_lightning.distributed_checkpoints import (
    checkpoint_entries,
    consolidated_state_dict,
    is_distributed_checkpoint,
    load_from_checkpoint,
)
from rdm_lightning.methods import DMD
from rdm_lightning.methods.roles import RoleConfig, RolesConfig
from rdm_lightning.methods.sharding import network_dtype, shard_network
from rdm_lightning.runs import read_checkpoint
from rdm_lightning.strategies import FSDP2Strategy

TESTS = Path(__file__).parent
CONFIGS = TESTS.parent / "configs"
sys.path.insert(0, str(TESTS))
from distributed_runs import BUDGET, FAKE_SCORE_CLIP, GENERATOR_CLIP, NETWORKS, WORLD_SIZE  # noqa: E402
from worker_records import assert_same_states, record, run_worker  # noqa: E402



@pytest.fixture(scope="module")
def runs(tiny_digits_teacher, tmp_path_factory) -> Path:
    """The folder the two torchrun processes wrote their records (``<run>_rank<r>.pt``) and checkpoints into."""
    out = tmp_path_factory.mktemp("fsdp2_runs")
    run_worker(TESTS / "fsdp2_worker.py", WORLD_SIZE, str(tiny_digits_teacher), str(out), timeout=400)
    return out


@pytest.fixture(scope="module")
def runs_on_one(runs, tiny_digits_teacher) -> Path:
    """``runs``, with the 2-process ``stopped`` checkpoint resumed by one process (``resumed_on_one``)."""
    run_worker(TESTS / "fsdp2_worker.py", 1, str(tiny_digits_teacher), str(runs), "--one-process", timeout=200)
    return runs


@pytest.mark.slow
def test_fsdp2_shards_every_network_and_trains_as_ddp(runs, tiny_digits_teacher):
    ddp, fsdp2 = record(runs, "ddp", 0), [record(runs, "fsdp2", rank) for rank in range(WORLD_SIZE)]
    assert [r["world_size"] for r in fsdp2] == [WORLD_SIZE] * WORLD_SIZE
    assert all(fsdp2[0]["sharded"].values()) and not any(ddp["sharded"].values())
    assert fsdp2[0]["role_updates"] == ddp["role_updates"] == {"generator": BUDGET, "fake_score": 2 * BUDGET - 1}
    # The gathered weights agree across ranks, and with DDP's after the same updates.
    assert_same_states(fsdp2[0]["state"], fsdp2[1]["state"])
    assert_same_states(fsdp2[0]["state"], ddp["state"], exact=False)
    teacher = DigitsBackbone(path=str(tiny_digits_teacher)).load_denoiser().state_dict()
    assert not all(torch.equal(teacher[k], v) for k, v in fsdp2[0]["state"]["generator"].items())


@pytest.mark.slow
def test_lora_roles_on_their_own_frozen_bases_shard_and_train_as_ddp(runs):
    ddp, fsdp2 = record(runs, "ddp_lora", 0), record(runs, "fsdp2_lora", 0)
    assert all(fsdp2["sharded"].values()) and fsdp2["untouched"] == [True] * (BUDGET // 2)
    assert_same_states(fsdp2["state"], ddp["state"], exact=False)
    trained = [v for k, v in fsdp2["state"]["generator"].items() if ".lora_B." in k]
    assert trained and any(bool(v.abs().sum() > 0) for v in trained)  # B starts at 0: the adapter did train


@pytest.mark.slow
def test_a_generator_step_leaves_the_fake_score_and_teacher_untouched(runs):
    for rank in range(WORLD_SIZE):
        assert record(runs, "fsdp2", rank)["untouched"] == [True] * BUDGET


@pytest.mark.slow
def test_each_role_is_clipped_to_its_own_grad_clip_on_sharded_gradients(runs):
    fsdp2, ddp = record(runs, "fsdp2", 0)["clips"], record(runs, "ddp", 0)["clips"]
    generator = [c for c in fsdp2 if c["role"] == "generator"]
    fake_score = [c for c in fsdp2 if c["role"] == "fake_score"]
    assert len(generator) == BUDGET and len(fake_score) == 2 * BUDGET - 1
    for clip in generator:  # the gathered gradient's norm, before: above grad_clip; after: grad_clip
        assert clip["max_norm"] == GENERATOR_CLIP and clip["before"] > 10 * GENERATOR_CLIP
        assert clip["after"] <= GENERATOR_CLIP * (1 + 1e-6) and clip["after"] == pytest.approx(GENERATOR_CLIP, rel=1e-4)
    for clip in fake_score:  # under its own, larger grad_clip nothing changes
        assert clip["max_norm"] == FAKE_SCORE_CLIP and clip["after"] == clip["before"] < FAKE_SCORE_CLIP
    # The norm clip_grad_norm_ took over the shards is the whole gradient's (DDP clips unsharded gradients).
    assert [(c["role"], c["max_norm"]) for c in fsdp2] == [(c["role"], c["max_norm"]) for c in ddp]
    for ours, reference in zip(fsdp2, ddp):
        assert (ours["before"], ours["after"]) == pytest.approx((reference["before"], reference["after"]), rel=1e-6)


@pytest.mark.slow
def test_resume_from_a_distributed_checkpoint_continues_bit_for_bit(runs):
    stopped, resumed = record(runs, "stopped", 0), record(runs, "resumed", 0)
    assert stopped["role_updates"] == {"generator": BUDGET // 2, "fake_score": BUDGET - 1}
    assert resumed["role_updates"] == record(runs, "fsdp2", 0)["role_updates"]
    assert_same_states(resumed["state"], record(runs, "fsdp2", 0)["state"])
    # The resumed fit recorded only its own updates: it did not re-run the stopped ones.
    assert len(resumed["untouched"]) == BUDGET - BUDGET // 2


@pytest.mark.slow
def test_a_checkpoint_of_two_processes_resumes_on_one(runs_on_one):
    stopped, resumed = record(runs_on_one, "stopped", 0), record(runs_on_one, "resumed_on_one", 0)
    assert resumed["world_size"] == 1 and all(resumed["sharded"].values())
    # torch.distributed.checkpoint splits the 2 processes' shards anew: every network resumes exactly as saved.
    assert_same_states(resumed["start_state"], stopped["state"])
    assert resumed["role_updates"] == {"generator": BUDGET, "fake_score": 2 * BUDGET - 1}
    assert len(resumed["untouched"]) == BUDGET - BUDGET // 2 and all(resumed["untouched"])


@pytest.mark.slow
def test_unseeded_ranks_are_refused_before_sharding(runs):
    for rank in range(WORLD_SIZE):
        error = record(runs, "unseeded", rank)["error"]
        assert "ranks [1] built other initial weights for discriminator_head" in error and "seed_everything" in error


@pytest.mark.slow
def test_the_checkpoint_folder_holds_trained_shards_and_loads_in_one_process(runs):
    folder = runs / "checkpoints" / "last.ckpt"
    assert is_distributed_checkpoint(folder)
    assert {p.name for p in folder.iterdir()} == {"meta.pt", ".metadata", "__0_0.distcp", "__1_0.distcp"}
    entries = checkpoint_entries(folder)
    assert {key.split(".")[0] for key in entries} == set(NETWORKS)  # no teacher, no backbone
    assert checkpoint_entries(folder, "optimizer_0") and checkpoint_entries(folder, "optimizer_1")
    saved = read_checkpoint(folder)  # what `rdm fit --ckpt_path` reads first
    assert saved["rdm"]["role_updates"] == {"generator": BUDGET, "fake_score": 2 * BUDGET - 1} and "hyper_parameters" in saved
    resumed = record(runs, "resumed", 0)["state"]
    state = consolidated_state_dict(folder)
    assert all(torch.equal(state[f"{name}.{k}"], v) for name in NETWORKS for k, v in resumed[name].items())
    module = load_from_checkpoint(DMD, folder, map_location="cpu")
    assert module.generator_ema is not None
    assert_same_states({name: getattr(module, name).state_dict() for name in NETWORKS}, resumed)


# ---- in this process: checks that need no process group ------------------------------------------------
def attached(module: DMD, strategy) -> DMD:
    module.trainer = L.Trainer(accelerator="cpu", devices=1, strategy=strategy, logger=False, enable_progress_bar=False,
                               enable_model_summary=False, enable_checkpointing=False)
    return module


class CPUFSDPStrategy(FSDPStrategy):
    """Lightning's FSDP1 strategy, which the Trainer builds on the CPU only as a subclass (it asks for a GPU)."""


@pytest.mark.parametrize(("strategy", "expected"), [
    (CPUFSDPStrategy(), "CPUFSDPStrategy (FSDP1) cannot train a distillation module"),
    (ModelParallelStrategy(data_parallel_size=1, tensor_parallel_size=1), "use its subclass rdm_lightning.strategies.FSDP2Strategy"),
])
def test_a_strategy_the_module_cannot_run_under_is_named(tiny_digits_teacher, strategy, expected):
    module = attached(DMD(DigitsBackbone(path=str(tiny_digits_teacher))), strategy)
    with pytest.raises(ValueError) as error:
        module.setup("fit")
    assert expected in str(error.value) and "configs/strategy/fsdp2.yaml" in str(error.value)


def test_fsdp2_refuses_shared_lora_roles(tiny_digits_teacher):
    pytest.importorskip("peft")
    roles = RolesConfig(fake_score=RoleConfig(layout="shared_lora", rank=2))
    module = attached(DMD(DigitsBackbone(path=str(tiny_digits_teacher)), roles=roles), FSDP2Strategy())
    with pytest.raises(ValueError, match=r"\{'roles.fake_score.layout': 'shared_lora'\} cannot be sharded with FSDP2.*"
                                         r"accepted under FSDP2: \('full', 'lora'\)"):
        module.setup("fit")


def test_the_strategy_presets_are_second_configs(capsys, monkeypatch):
    from rdm_lightning.cli import main

    monkeypatch.setattr(sys, "argv", ["rdm"])  # LightningCLI warns when it is given args beside pytest's

    for preset, expected in [("fsdp2", "class_path: rdm_lightning.strategies.FSDP2Strategy"),
                             ("ddp", "strategy: ddp_find_unused_parameters_true")]:
        with pytest.raises(SystemExit):
            main(["fit", "--config", str(CONFIGS / "sdxl" / "dmd.yaml"), "--config", str(CONFIGS / "strategy" / f"{preset}.yaml"), "--print_config"])
        printed = capsys.readouterr().out
        assert expected in printed and "deepspeed" not in printed


def modules_with_weights_run_by(call, network: nn.Module) -> set[nn.Module]:
    """The submodules with parameters of their own that run (forward) inside ``call()``."""
    ran: set[nn.Module] = set()
    hooks = [m.register_forward_hook(lambda m, i, o: ran.add(m)) for m in network.modules()
             if any(True for _ in m.parameters(recurse=False))]
    try:
        with torch.no_grad():
            call()
    finally:
        for hook in hooks:
            hook.remove()
    return ran


def outside_units(modules: set[nn.Module], units: list[nn.Module]) -> list[str]:
    inside = {id(sub) for unit in units for sub in unit.modules()}
    return [type(m).__name__ for m in modules if id(m) not in inside]


def test_digits_units_cover_what_the_gan_features_run(tiny_digits_teacher):
    backbone = DigitsBackbone(path=str(tiny_digits_teacher))
    network = backbone.load_denoiser()
    units = backbone.shard_units(network)
    cond = backbone.encode_prompts(["a handwritten digit 3"] * 2)
    ran = modules_with_weights_run_by(lambda: backbone.features(network, torch.randn(2, 1, 8, 8), torch.full((2,), 0.5), cond), network)
    assert ran and outside_units(ran, units) == []
    # The root keeps the output layers, which only the network's own forward runs.
    assert {id(m) for m in (network.upsample, network.norm_out, network.conv_out)}.isdisjoint(
        {id(sub) for unit in units for sub in unit.modules()})


def test_sdxl_units_cover_what_the_gan_features_run(tmp_path):
    from tiny_models import make_tiny_sdxl

    from rdm_lightning.backbones.stable_diffusion import StableDiffusionBackbone

    backbone = StableDiffusionBackbone(str(make_tiny_sdxl(tmp_path / "sdxl")))
    network = backbone.load_denoiser()
    units = backbone.shard_units(network)
    assert network.add_embedding in units and network.mid_block in units
    cond = backbone.encode_prompts(["a cat", "a dog"])
    latents = torch.randn(2, *backbone.latent_shape)
    ran = modules_with_weights_run_by(lambda: backbone.features(network, latents, torch.full((2,), 500.0), cond), network)
    assert ran and outside_units(ran, units) == []


def test_default_units_are_the_outermost_module_lists():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Linear(2, 2)
            self.blocks = nn.ModuleList([nn.Sequential(nn.Linear(2, 2), nn.ModuleList([nn.Linear(2, 2)])) for _ in range(2)])
            self.head = nn.Sequential(nn.ModuleList([nn.Linear(2, 2)]), nn.Linear(2, 2))

    net = Net()
    assert repeated_blocks(net) == [net.blocks[0], net.blocks[1], net.head[0][0]]


def test_shard_network_refuses_foreign_units_and_mixed_dtypes():
    net = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
    with pytest.raises(ValueError, match="shard unit Linear of generator is not a distinct submodule"):
        shard_network("generator", net, [nn.Linear(2, 2)], mesh=None)
    with pytest.raises(ValueError, match="is not a distinct submodule"):
        shard_network("generator", net, [net[0], net[0]], mesh=None)
    net[1].to(torch.bfloat16)
    with pytest.raises(ValueError, match=r"teacher has parameters of dtypes \['torch.bfloat16', 'torch.float32'\]"):
        network_dtype("teacher", net)


@pytest.mark.slow
def test_sampling_callbacks_run_on_every_rank_under_sharding(runs):
    folder = runs / "callbacks"
    assert {path.name for path in (folder / "samples").iterdir()} == {
        "generator_u000002.png", "generator_final.png", "teacher.png"}
    digits = json.loads((folder / "metrics.json").read_text())
    assert [entry["generator_updates"] for entry in digits["history"]] == [2]
    assert digits["student"]["generator_updates"] == 2 and "teacher" in digits
    t2i = json.loads((folder / "t2i_metrics.json").read_text())
    assert [entry["generator_updates"] for entry in t2i["history"]] == [2]
    final = t2i["student"]
    assert final["num_images"] == 6 and set(final["rewards"]) == {"StrokeContrastReward"}
    assert final["fid_sd"] > 0 and final["rewards"]["StrokeContrastReward"]["n"] == 6
