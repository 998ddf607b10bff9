"""DeepSpeed ZeRO-2 and ZeRO-3 (rdm_lightning.strategies.DeepSpeedZeroStrategy) on CPU: 2 processes under torchrun,
DeepSpeed's CPU accelerator with gloo, digits DMD.

The multi-process part runs once (tests/deepspeed_worker.py: DDP, ZeRO-2, a ZeRO-2 fit stopped and resumed,
ZeRO-3, LoRA roles under ZeRO-2, a shared_lora critic under ZeRO-3), and the slow tests below read what each rank recorded. ZeRO-2 reduces gradients as DDP does;
ZeRO-3 reduce-scatters them and computes the norm in its own order, so its float32 sums differ from DDP's in the
last bits. Adam turns that noise into full-size updates of the weights digits' networks cannot see (a bias right
before a one-channel GroupNorm), so the trainings are compared by what the networks compute on fixed inputs, and
by the gradient norm at every step. The rest runs in this process without DeepSpeed: the module's DeepSpeed
checks, the per-role clipping plumbing, the presets, and the metadata of a checkpoint folder.
"""
from __future__ import annotations

import ast
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from lightning.pytorch.core.optimizer import LightningOptimizer
from lightning.pytorch.strategies import DeepSpeedStrategy
from torch import nn

from rdm_lightning.backbones.digits import DigitsBackbone
from rdm_lightning.distributed_checkpoints import (
    DEEPSPEED_TAG_FILE,
    deepspeed_state_dict,
    deepspeed_world_size,
    is_checkpoint_folder,
    is_deepspeed_checkpoint,
    read_deepspeed_metadata,
)
from rdm_lightning.methods import DMD, DMDConfig, OptimizerConfig, StudentConfig
from rdm_lightning.methods.roles import RoleConfig, RolesConfig
from rdm_lightning.methods.zero import check_zero_config, set_step_clipping, zero_stage
from rdm_lightning.runs import read_checkpoint
from rdm_lightning.strategies import DeepSpeedZeroStrategy, keep_float32
from distributed_runs import BF16_EMA_DECAY, BUDGET, FAKE_SCORE_CLIP, GENERATOR_CLIP, WORLD_SIZE, preset_config
from worker_records import assert_same_states, record, run_worker

TESTS = Path(__file__).parent
CONFIGS = TESTS.parent / "configs"
FUNCTION_TOLERANCE = 1e-4
"""Largest difference of a network's outputs (of magnitude ~3) between a ZeRO and the DDP training."""
COMPARED = ("generator", "fake_score", "discriminator_head")


@pytest.fixture(scope="module")
def runs(tiny_digits_teacher, tmp_path_factory) -> Path:
    """The folder the two torchrun processes wrote their records (``<run>_rank<r>.pt``) and checkpoints into."""
    pytest.importorskip("deepspeed")
    out = tmp_path_factory.mktemp("deepspeed_runs")
    run_worker(TESTS / "deepspeed_worker.py", WORLD_SIZE, str(tiny_digits_teacher), str(out), timeout=500,
               DS_ACCELERATOR="cpu")
    return out


@pytest.fixture(scope="module")
def runs_on_one(runs, tiny_digits_teacher) -> Path:
    """``runs``, with the 2-process ``zero2_stopped`` checkpoint resumed by one process (``zero2_on_one``)."""
    run_worker(TESTS / "deepspeed_worker.py", 1, str(tiny_digits_teacher), str(runs), "--one-process", timeout=200,
               DS_ACCELERATOR="cpu")
    return runs


def make_module(teacher: Path, roles: RolesConfig = RolesConfig(), **optimizers) -> DMD:
    """The worker's DMD (GAN head, clipped generator), in this process."""
    return DMD(DigitsBackbone(path=str(teacher)), dmd=DMDConfig(generator_update_ratio=2, gan_generator_weight=1e-2),
               generator_optimizer=optimizers.get("generator", OptimizerConfig(lr=1e-3, grad_clip=GENERATOR_CLIP)),
               fake_score_optimizer=optimizers.get("fake_score", OptimizerConfig(lr=1e-3, grad_clip=FAKE_SCORE_CLIP)),
               student=StudentConfig(num_steps=2), roles=roles)


def network_outputs(module: DMD, state: dict | None = None, generator: str = "generator") -> dict[str, torch.Tensor]:
    """What the generator, the fake score and the GAN head compute on fixed inputs, with their ``state`` loaded
    (``generator="generator_ema"``: the EMA's weights in the generator's place)."""
    for name in COMPARED if state is not None else ():
        getattr(module, name).load_state_dict(state[generator if name == "generator" else name])
    noise = torch.Generator().manual_seed(0)
    x_t = torch.randn(16, 1, 8, 8, generator=noise)
    level = torch.rand(16, generator=noise) * 0.9 + 0.05
    cond = module.backbone.encode_prompts([f"a handwritten digit {i % 10}" for i in range(16)])
    with torch.no_grad():
        return {
            "generator": module.backbone.predict_x0(module.generator, x_t, level, cond),
            "fake_score": module.backbone.predict_x0(module.fake_score, x_t, level, cond),
            "discriminator_head": module.discriminator_head(module.backbone.features(module.fake_score, x_t, level, cond)),
        }


def largest_output_difference(a: dict, b: dict) -> float:
    return max(float((a[name] - b[name]).abs().max()) for name in a)


# ---- 2 processes: what the ranks recorded -----------------------------------------------------------------
@pytest.mark.slow
def test_zero2_trains_as_ddp_with_identical_weights_on_every_rank(runs, tiny_digits_teacher):
    ddp, zero2 = record(runs, "ddp"), [record(runs, "zero2", rank) for rank in range(WORLD_SIZE)]
    assert zero2[0]["optimizer"] == "DeepSpeedZeroOptimizer" and zero2[0]["world_size"] == WORLD_SIZE
    assert zero2[0]["role_updates"] == ddp["role_updates"] == {"generator": BUDGET, "fake_score": 2 * BUDGET - 1}
    assert_same_states(zero2[0]["state"], zero2[1]["state"])
    module = make_module(tiny_digits_teacher)
    start = network_outputs(module)
    reference = network_outputs(module, ddp["state"])
    assert largest_output_difference(network_outputs(module, zero2[0]["state"]), reference) < FUNCTION_TOLERANCE
    assert largest_output_difference(start, reference) > 100 * FUNCTION_TOLERANCE  # the comparison can fail
    # The EMA (outside the optimizer) follows the generator as under DDP.
    ema, ddp_ema = (network_outputs(module, r["state"], "generator_ema")["generator"] for r in (zero2[0], ddp))
    assert float((ema - ddp_ema).abs().max()) < FUNCTION_TOLERANCE


@pytest.mark.slow
def test_zero3_partitions_every_network_the_teacher_included_and_trains_as_ddp(runs, tiny_digits_teacher):
    ddp, zero3 = record(runs, "ddp"), [record(runs, "zero3", rank) for rank in range(WORLD_SIZE)]
    assert zero3[0]["optimizer"] == "DeepSpeedZeroOptimizer_Stage3"
    assert all(zero3[0]["partitioned"].values()) and set(zero3[0]["partitioned"]) == {
        "generator", "fake_score", "discriminator_head", "generator_ema", "teacher"}
    assert not any(record(runs, "zero2")["partitioned"].values())
    assert zero3[0]["role_updates"] == ddp["role_updates"]
    assert_same_states(zero3[0]["state"], zero3[1]["state"])
    # Every step's gradient norm (the DM loss reads the partitioned teacher) is DDP's.
    assert [c["role"] for c in zero3[0]["clips"]] == [c["role"] for c in ddp["clips"]]
    for ours, theirs in zip(zero3[0]["clips"], ddp["clips"]):
        assert ours["before"] == pytest.approx(theirs["before"], rel=1e-5)
    module = make_module(tiny_digits_teacher)
    reference = network_outputs(module, ddp["state"])
    assert largest_output_difference(network_outputs(module, zero3[0]["state"]), reference) < FUNCTION_TOLERANCE
    # The EMA's update gathers the partitioned EMA and generator (core/ema.py): the same EMA as DDP's.
    ema, ddp_ema = (network_outputs(module, r["state"], "generator_ema")["generator"] for r in (zero3[0], ddp))
    assert float((ema - ddp_ema).abs().max()) < FUNCTION_TOLERANCE
    assert float((ema - reference["generator"]).abs().max()) > 100 * FUNCTION_TOLERANCE  # it is not the generator


@pytest.mark.slow
def test_zero2_with_the_optimizer_offloaded_to_cpu_trains_as_zero2(runs, tiny_digits_teacher):
    ours, zero2 = record(runs, "zero2_offload"), record(runs, "zero2")
    assert ours["offloaded"] == {"optimizer"} and not zero2["offloaded"] and ours["optimizer"] == "DeepSpeedZeroOptimizer"
    assert ours["role_updates"] == zero2["role_updates"]
    module = make_module(tiny_digits_teacher)
    offloaded, reference = network_outputs(module, ours["state"]), network_outputs(module, zero2["state"])
    assert largest_output_difference(offloaded, reference) < FUNCTION_TOLERANCE


@pytest.mark.slow
def test_zero3_with_parameters_and_optimizer_offloaded_to_cpu_trains_as_zero3(runs, tiny_digits_teacher):
    ours, zero3 = record(runs, "zero3_offload"), record(runs, "zero3_stopped")  # both BUDGET // 2
    assert ours["offloaded"] == {"optimizer", "parameters"} and ours["optimizer"] == "DeepSpeedZeroOptimizer_Stage3"
    assert all(ours["partitioned"].values()) and ours["role_updates"] == zero3["role_updates"]
    module = make_module(tiny_digits_teacher)
    offloaded, reference = network_outputs(module, ours["state"]), network_outputs(module, zero3["state"])
    assert largest_output_difference(offloaded, reference) < FUNCTION_TOLERANCE


@pytest.mark.slow
@pytest.mark.parametrize("run", ["zero2", "zero3", "zero2_offload", "zero3_offload", "zero2_lora", "zero3_shared"])
def test_a_generator_step_leaves_the_fake_score_its_master_weights_and_the_teacher_untouched(runs, run):
    budget = BUDGET if run in ("zero2", "zero3", "zero2_offload") else BUDGET // 2
    for rank in range(WORLD_SIZE):
        assert record(runs, run, rank)["untouched"] == [True] * budget


@pytest.mark.slow
@pytest.mark.parametrize("run", ["zero2", "zero3", "zero2_offload"])
def test_each_role_is_clipped_by_its_own_grad_clip_inside_deepspeeds_step(runs, run):
    clips, ddp = record(runs, run)["clips"], record(runs, "ddp")["clips"]
    assert [c["role"] for c in clips] == [c["role"] for c in ddp] and len(clips) == 3 * BUDGET - 1
    for ours, theirs in zip(clips, ddp):
        assert ours["before"] == pytest.approx(theirs["before"], rel=1e-5)  # DeepSpeed's norm: the active role's
        if ours["role"] == "generator":  # clipped to its grad_clip, as DDP's clip_grad_norm_ does
            assert ours["max_norm"] == GENERATOR_CLIP and ours["before"] > 10 * GENERATOR_CLIP
            assert ours["after"] <= GENERATOR_CLIP and ours["after"] == pytest.approx(GENERATOR_CLIP, rel=1e-4)
        else:  # under its own, larger grad_clip nothing changes
            assert ours["max_norm"] == FAKE_SCORE_CLIP and ours["after"] == pytest.approx(ours["before"], rel=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3])
def test_resume_from_a_deepspeed_checkpoint_folder_continues_bit_for_bit(runs, stage):
    stopped, resumed = record(runs, f"zero{stage}_stopped"), record(runs, f"zero{stage}_resumed")
    assert stopped["role_updates"] == {"generator": BUDGET // 2, "fake_score": BUDGET - 1}
    assert resumed["role_updates"] == record(runs, f"zero{stage}")["role_updates"]
    assert_same_states(resumed["state"], record(runs, f"zero{stage}")["state"])  # the EMA included
    assert len(resumed["untouched"]) == BUDGET - BUDGET // 2  # it ran only its own updates


@pytest.mark.slow
def test_resuming_on_another_number_of_processes_is_refused_naming_both(runs_on_one):
    assert deepspeed_world_size(runs_on_one / "zero2_stopped.ckpt") == WORLD_SIZE
    error = record(runs_on_one, "zero2_on_one")["error"]
    assert "zero2_stopped.ckpt' was written by 2 processes and this run has 1" in error
    assert "resume with 2 processes (devices × num_nodes)" in error


@pytest.mark.slow
@pytest.mark.parametrize(("folder", "run", "model_files"), [
    ("checkpoints/last.ckpt", "zero2_resumed", ["mp_rank_00_model_states.pt"]),
    ("zero3.ckpt", "zero3", [f"zero_pp_rank_{r}_mp_rank_00_model_states.pt" for r in range(WORLD_SIZE)]),
])
def test_the_checkpoint_folder_leaves_the_frozen_networks_out_and_loads_in_one_process(runs, folder, run, model_files):
    from rdm_lightning.tools import load_module

    folder = runs / folder
    assert is_deepspeed_checkpoint(folder) and (folder / DEEPSPEED_TAG_FILE).read_text().strip() == "checkpoint"
    optim_files = [f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in range(WORLD_SIZE)]
    assert sorted(p.name for p in (folder / "checkpoint").iterdir()) == sorted(model_files + optim_files)
    trained = record(runs, run)["state"]
    model_state = torch.load(folder / "checkpoint" / model_files[0], weights_only=False)
    assert {key.split(".")[0] for key in model_state["module"]} == set(trained)  # no teacher, no backbone
    # DeepSpeed's copy of the parameters outside its optimizer holds the EMA only.
    assert {key.split(".")[0] for key in model_state["frozen_param_shapes"]} == set(trained) - {
        "generator", "fake_score", "discriminator_head"}
    saved = read_checkpoint(folder)  # what `rdm fit --ckpt_path` reads first
    assert saved["rdm"]["role_updates"] == {"generator": BUDGET, "fake_score": 2 * BUDGET - 1}
    assert saved["hyper_parameters"]["_class_path"] == "rdm_lightning.methods.DMD" and "module" not in saved
    state = deepspeed_state_dict(folder)
    assert state.keys() == {f"{name}.{key}" for name in trained for key in trained[name]}
    assert all(torch.equal(state[f"{name}.{key}"], value) for name in trained for key, value in trained[name].items())
    module = load_module(folder)  # `rdm sample` / `rdm export`
    assert isinstance(module, DMD) and (module.generator_ema is not None) == ("generator_ema" in trained)
    assert_same_states({name: getattr(module, name).state_dict() for name in trained}, trained)


@pytest.mark.slow
@pytest.mark.parametrize(("run", "layouts"), [
    ("zero2_lora", {"generator": "lora", "fake_score": "lora"}),  # own frozen bases
    ("zero3_shared", {"fake_score": "shared_lora"}),  # an adapter on the partitioned teacher's own weights
])
def test_lora_role_layouts_train_under_zero_as_ddp(runs, tiny_digits_teacher, run, layouts):
    pytest.importorskip("peft")
    ours, ddp = record(runs, run), record(runs, "ddp_" + run.split("_")[1])
    assert ours["role_updates"] == ddp["role_updates"] == {"generator": BUDGET // 2, "fake_score": BUDGET - 1}
    trained = [v for k, v in ours["state"]["fake_score"].items() if ".lora_B." in k]
    assert trained and any(bool(v.abs().sum() > 0) for v in trained)  # B starts at 0: the adapter did train
    module = make_module(tiny_digits_teacher, RolesConfig(**{r: RoleConfig(layout=l, rank=2) for r, l in layouts.items()}))
    assert largest_output_difference(network_outputs(module, ours["state"]), network_outputs(module, ddp["state"])) < FUNCTION_TOLERANCE


def ema_by_hand(start: dict[str, torch.Tensor], history: list[dict[str, torch.Tensor]], dtype: torch.dtype) -> dict:
    """``ema ← ema + (1 − decay)·(live − ema)`` over the generator's recorded states, held in ``dtype``."""
    ema = {k: v.to(dtype, copy=True) for k, v in start.items()}
    for live in history:
        for key, value in ema.items():
            value.lerp_(live[key].to(dtype), 1.0 - BF16_EMA_DECAY)
    return ema


@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3])
def test_under_bf16_the_ema_stays_float32_and_keeps_averaging(runs, stage):
    ours = record(runs, f"zero{stage}_bf16")
    # DeepSpeed cast every network (and under ZeRO-3 every partition) to bf16, but the EMA is float32 again.
    assert ours["dtypes"]["generator_ema"] == {torch.float32}
    assert all(ours["dtypes"][name] == {torch.bfloat16} for name in ("generator", "fake_score", "teacher"))
    assert ours["partitioned"]["generator_ema"] == (stage == 3)
    history = ours["generator_history"]
    assert len(history) == BUDGET and all(v.dtype == torch.bfloat16 for v in history[-1].values())
    expected = ema_by_hand(ours["start_state"]["generator_ema"], history, torch.float32)
    assert_same_states({"generator_ema": ours["state"]["generator_ema"]}, {"generator_ema": expected})
    # A bf16 EMA would have dropped the averaging steps below its resolution: it ends elsewhere.
    in_bf16 = ema_by_hand(ours["start_state"]["generator_ema"], history, torch.bfloat16)
    lost = max(float((in_bf16[k].float() - expected[k]).abs().max()) for k in expected)
    moved = max(float((expected[k] - ours["start_state"]["generator_ema"][k]).abs().max()) for k in expected)
    assert lost > 0.1 * moved > 0
    # The checkpoint folder holds the float32 EMA, read back in one process as `rdm sample` reads it.
    saved = deepspeed_state_dict(runs / f"zero{stage}_bf16.ckpt")
    assert all(torch.equal(saved[f"generator_ema.{k}"], v) for k, v in expected.items())


@pytest.mark.slow
def test_under_bf16_a_shared_lora_ema_holds_its_adapter_in_float32_over_the_bf16_base(runs):
    pytest.importorskip("peft")
    ours = record(runs, "zero2_bf16_shared")
    ema = ours["state"]["generator_ema"]
    adapter = {k for k in ema if ".lora_" in k}
    assert adapter and {ema[k].dtype for k in adapter} == {torch.float32}
    assert {v.dtype for k, v in ema.items() if k not in adapter} == {torch.bfloat16}  # the teacher's own weights
    expected = ema_by_hand(ours["start_state"]["generator_ema"], ours["generator_history"], torch.float32)
    for key in adapter:
        assert torch.equal(ema[key], expected[key]), key
    assert any(not torch.equal(ema[k], ours["start_state"]["generator_ema"][k]) for k in adapter)


@pytest.mark.slow
def test_a_bf16_run_resumes_bit_for_bit_with_its_float32_ema(runs):
    stopped, resumed, whole = (record(runs, f"zero2_bf16{part}") for part in ("_stopped", "_resumed", ""))
    assert stopped["role_updates"] == {"generator": BUDGET // 2, "fake_score": BUDGET - 1}
    assert resumed["dtypes"]["generator_ema"] == {torch.float32}
    assert all(v.dtype == torch.float32 for v in resumed["start_state"]["generator_ema"].values())
    assert_same_states(resumed["state"], whole["state"])


# ---- in this process: the module's DeepSpeed checks and clipping, without DeepSpeed ----------------------
def deepspeed_strategy(cls: type = DeepSpeedZeroStrategy, config: dict | None = None) -> DeepSpeedStrategy:
    """An uninitialised DeepSpeed strategy with ``config`` (the module's checks read only its type and config)."""
    strategy = object.__new__(cls)
    strategy.config = {"zero_optimization": {"stage": 2}} if config is None else config
    return strategy


def attached(module: DMD, strategy) -> DMD:
    module._trainer = SimpleNamespace(strategy=strategy)
    return module


def test_every_digits_network_takes_its_inputs_in_its_own_dtype(tiny_digits_teacher):
    """Under bf16-mixed DeepSpeed's engine casts every parameter of the module to bf16, while the sampler's noise
    stays float32 and the strategy puts the EMA back in float32: each network casts its inputs to its weights'."""
    module = make_module(tiny_digits_teacher)
    ema = module.enable_generator_ema()
    backbone = module.backbone
    cond = backbone.encode_prompts([f"a handwritten digit {i}" for i in range(4)])
    noise = torch.Generator().manual_seed(0)
    x_t, level = torch.randn(4, 1, 8, 8, generator=noise), torch.full((4,), 0.5)
    reference = backbone.predict_x0(module.generator, x_t, level, cond)
    reference_logits = module.discriminator_head(backbone.features(module.fake_score, x_t, level, cond))
    for network in (module.generator, module.fake_score, module.discriminator_head, module.teacher, backbone):
        network.bfloat16()
    bf16_cond = backbone.encode_prompts([f"a handwritten digit {i}" for i in range(4)])
    assert bf16_cond.tensors["text"].dtype == torch.bfloat16
    assert torch.equal(backbone.predict_x0(ema, x_t, level, cond), reference)  # float32 weights, float32 inputs
    assert backbone.predict_x0(ema, x_t, level, bf16_cond).dtype == torch.float32
    x0 = backbone.predict_x0(module.generator, x_t, level, bf16_cond)
    assert x0.dtype == torch.float32 and torch.allclose(x0, reference, atol=0.1) and not torch.equal(x0, reference)
    logits = module.discriminator_head(backbone.features(module.fake_score, x_t, level, bf16_cond))
    assert logits.dtype == torch.bfloat16 and torch.allclose(logits.float(), reference_logits, atol=0.05)


def test_keep_float32_casts_back_every_parameter_but_the_shared_ones():
    base = nn.Linear(3, 3)
    live, ema = nn.Sequential(base, nn.Linear(3, 2)), nn.Sequential(base, nn.Linear(3, 2))
    partition = torch.randn(2, dtype=torch.bfloat16)
    ema[1].bias.ds_tensor = partition  # as ZeRO-3 partitions it: its gathers follow the partition's dtype
    for module in (live, ema):
        module.bfloat16()
    values = [p.detach().clone() for p in ema[1].parameters()]
    assert keep_float32(ema, live) == 2
    assert [p.dtype for p in ema[1].parameters()] == [torch.float32] * 2
    assert all(torch.equal(p, v.float()) for p, v in zip(ema[1].parameters(), values))  # bf16 → float32 is exact
    assert ema[1].bias.ds_tensor.dtype == torch.float32 and torch.equal(ema[1].bias.ds_tensor, partition.float())
    assert base.weight.dtype == torch.bfloat16  # the generator's own tensor stays as the engine holds it
    assert keep_float32(ema, live) == 0


def test_an_offloaded_optimizer_must_be_left_to_the_module():
    config = {"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}}}
    with pytest.raises(ValueError, match=r"offload_optimizer.device='cpu' with zero_force_ds_cpu_optimizer=True: "
                                         r"DeepSpeed would demand its own CPU Adam.*set zero_force_ds_cpu_optimizer: false"):
        check_zero_config(config, {"generator": 0.5, "fake_score": None})
    check_zero_config({**config, "zero_force_ds_cpu_optimizer": False}, {"generator": 0.5, "fake_score": None})
    check_zero_config({"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "none"}}}, {"generator": 0.5})
    for name in ("deepspeed_zero2_offload", "deepspeed_zero3_offload"):
        check_zero_config(preset_config(name), {"generator": 0.5, "fake_score": 1.0})


def test_clipping_set_twice_is_refused_naming_both_values():
    config = {"zero_optimization": {"stage": 2}, "gradient_clipping": 1.0}
    with pytest.raises(ValueError, match=r"clipping set twice: the DeepSpeed config's gradient_clipping=1.0 and "
                                         r"\{'generator_optimizer.grad_clip': 0.5\}"):
        check_zero_config(config, {"generator": 0.5, "fake_score": None})
    check_zero_config(config, {"generator": None, "fake_score": None})  # the config clips every role
    check_zero_config({**config, "gradient_clipping": 0.0}, {"generator": 0.5, "fake_score": 10.0})


@pytest.mark.parametrize("config", [{}, {"zero_optimization": {"stage": 0}}, {"zero_optimization": {}}])
def test_deepspeed_without_zero_is_refused(config):
    assert zero_stage(config) == 0
    with pytest.raises(ValueError, match=r"DeepSpeed ZeRO stage 0: a distillation module trains under ZeRO stages "
                                         r"\(1, 2, 3\).*deepspeed_zero2.yaml"):
        check_zero_config(config, {"generator": 1.0, "fake_score": 1.0})


class FakeZeroOptimizer:
    """Stands in for DeepSpeed's ZeRO optimizer: it keeps the client optimizer in ``.optimizer``, clips by its
    ``clip_grad`` inside ``step()``; here it records the ``clip_grad`` of each step."""

    def __init__(self, optimizer: torch.optim.Optimizer, clip_grad: float = 0.0):
        self.optimizer, self.clip_grad, self.step_clips = optimizer, clip_grad, []
        self.param_groups = optimizer.param_groups

    def step(self, closure=None):
        self.step_clips.append(self.clip_grad)
        return self.optimizer.step(closure)

    def zero_grad(self, set_to_none: bool = True):
        self.optimizer.zero_grad(set_to_none=set_to_none)


def test_set_step_clipping_sets_the_zero_optimizers_clip_grad():
    zero = FakeZeroOptimizer(torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))]), clip_grad=3.0)
    set_step_clipping(LightningOptimizer(zero), 0.25)  # through Lightning's wrapper
    assert zero.clip_grad == 0.25
    set_step_clipping(zero, None)
    assert zero.clip_grad == 0.0
    with pytest.raises(TypeError, match="AdamW has no clip_grad: per-role grad_clip under DeepSpeed needs its ZeRO"):
        set_step_clipping(LightningOptimizer(zero.optimizer), 1.0)


@pytest.mark.parametrize(("fake_clip", "expected"), [(None, [GENERATOR_CLIP, 0.0]), (0.5, [GENERATOR_CLIP, 0.5])])
def test_step_role_gives_each_step_its_roles_grad_clip(tiny_digits_teacher, monkeypatch, fake_clip, expected):
    """A generator step then a fake-score step: DeepSpeed's step() sees the generator's grad_clip, then the fake
    score's (0, no clipping, when it has none, rather than the generator's left over)."""
    module = make_module(tiny_digits_teacher, fake_score=OptimizerConfig(lr=1e-3, grad_clip=fake_clip))
    attached(module, deepspeed_strategy())
    module.setup("fit")
    (optimizer,), (scheduler,) = module.configure_optimizers()
    zero = FakeZeroOptimizer(optimizer)
    wrapped = LightningOptimizer(zero)
    monkeypatch.setattr(wrapped, "step", lambda closure=None: zero.step())
    monkeypatch.setattr(module, "optimizers", lambda use_pl_optimizer=True: wrapped)
    monkeypatch.setattr(module, "lr_schedulers", lambda: scheduler)
    monkeypatch.setattr(module, "manual_backward", lambda loss: loss.backward())
    for role in ("generator", "fake_score"):
        network = module.generator if role == "generator" else module.fake_score
        with module.trainable_role(role):
            loss = sum(p.square().sum() for p in network.parameters())
        module.step_role(role, loss)
    assert zero.step_clips == expected
    module._trainer = None


def test_the_module_sets_up_under_deepspeed_and_warns_under_lightnings_own_strategy(tiny_digits_teacher, recwarn):
    module = make_module(tiny_digits_teacher)
    attached(module, deepspeed_strategy(config={"zero_optimization": {"stage": 3}, "gradient_clipping": 2.0}))
    with pytest.raises(ValueError, match="clipping set twice"):
        module.setup("fit")
    attached(module, deepspeed_strategy())
    module.setup("fit")  # DDP's find_unused_parameters check does not apply to DeepSpeed (a DDPStrategy subclass)
    assert not [w for w in recwarn if "saves the frozen teacher" in str(w.message)]
    attached(module, deepspeed_strategy(DeepSpeedStrategy))
    with pytest.warns(UserWarning, match="DeepSpeedStrategy saves the frozen teacher, backbone and LoRA bases into "
                                         "every checkpoint.*DeepSpeedZeroStrategy"):
        module.setup("fit")
    module._trainer = None


def test_the_deepspeed_presets_are_second_configs(capsys, monkeypatch):
    from rdm_lightning.cli import main

    monkeypatch.setattr(sys, "argv", ["rdm"])  # LightningCLI warns when it is given args beside pytest's
    for stage in (2, 3):
        with pytest.raises(SystemExit):
            main(["fit", "--config", str(CONFIGS / "sdxl" / "dmd.yaml"),
                  "--config", str(CONFIGS / "strategy" / f"deepspeed_zero{stage}.yaml"), "--print_config"])
        printed = capsys.readouterr().out
        assert "class_path: rdm_lightning.strategies.DeepSpeedZeroStrategy" in printed
        assert f"stage: {stage}" in printed and "deepspeed_stage_2" not in printed
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(CONFIGS / "sdxl" / "dmd.yaml"),
              "--config", str(CONFIGS / "strategy" / "deepspeed_zero2_offload.yaml"), "--print_config"])
    printed = capsys.readouterr().out
    # jsonargparse prints the parsed config dict as the string of a Python literal
    config = ast.literal_eval(yaml.safe_load(printed)["trainer"]["strategy"]["init_args"]["config"])
    assert config["zero_optimization"]["offload_optimizer"]["device"] == "cpu" and config["zero_force_ds_cpu_optimizer"] is False


def test_a_deepspeed_folder_is_a_checkpoint_folder_whose_metadata_is_lightnings_state(tmp_path):
    """A folder in the layout DeepSpeed writes (built here; the slow tests read ones a real engine wrote):
    the module-state file mixes DeepSpeed's entries with Lightning's, and only Lightning's are the checkpoint."""
    folder = tmp_path / "last.ckpt"
    (folder / "checkpoint").mkdir(parents=True)
    assert not is_checkpoint_folder(folder)  # no `latest` yet
    (folder / DEEPSPEED_TAG_FILE).write_text("checkpoint")
    assert not is_deepspeed_checkpoint(folder)  # no module state in the tag folder
    lightning_state = {"epoch": 0, "hyper_parameters": {"_class_path": "rdm_lightning.methods.DMD"},
                       "rdm": {"role_updates": {"generator": 2, "fake_score": 3}}}
    torch.save({"module": {"generator.w": torch.zeros(2)}, "buffer_names": [], "param_shapes": [{}],
                "frozen_param_shapes": {}, "frozen_param_fragments": {}, "shared_params": {}, "ds_config": {},
                "ds_version": "0.19.8", "global_steps": 5, "dp_world_size": 2, **lightning_state},
               folder / "checkpoint" / "mp_rank_00_model_states.pt")
    assert is_deepspeed_checkpoint(folder) and is_checkpoint_folder(folder)
    assert read_deepspeed_metadata(folder) == lightning_state
    assert read_checkpoint(folder) == lightning_state
    # The number of processes that wrote it: one ZeRO optimizer partition each (bf16_ under bf16).
    assert deepspeed_world_size(folder) == 0
    for rank in range(3):
        torch.save({}, folder / "checkpoint" / f"bf16_zero_pp_rank_{rank}_mp_rank_00_optim_states.pt")
    assert deepspeed_world_size(folder) == 3
    with pytest.raises(ValueError, match=r"is not a DeepSpeed checkpoint folder \(one with latest"):
        read_deepspeed_metadata(tmp_path)
    with pytest.raises(ValueError, match=r"is not a DeepSpeed checkpoint folder"):
        deepspeed_world_size(tmp_path)
