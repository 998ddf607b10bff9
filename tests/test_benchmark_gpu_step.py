"""benchmarks/gpu_step.py: the analytic FLOP counters against closed forms and torch's FlopCounterMode (tiny
diffusers transformers, and the published configs on the meta device), the device peaks, and one ``--tiny`` run."""
from __future__ import annotations

import importlib.util
import json
import statistics
import sys
from pathlib import Path

import pytest
import torch
from diffusers import Flux2KleinPipeline, Flux2Transformer2DModel, SD3Transformer2DModel
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from rdm_lightning.backbones import Flux2KleinBackbone, SD3Backbone
from rdm_lightning.methods.lora import add_lora

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_step.py"
spec = importlib.util.spec_from_file_location("gpu_step_benchmark", SCRIPT)
gpu_step = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = gpu_step  # its dataclasses resolve their annotations through it
spec.loader.exec_module(gpu_step)

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")

BATCH = 2
SD3_TINY = dict(sample_size=8, patch_size=2, in_channels=4, num_layers=6, attention_head_dim=8, num_attention_heads=4,
                caption_projection_dim=32, joint_attention_dim=48, pooled_projection_dim=24, out_channels=4,
                dual_attention_layers=(0, 1), qk_norm="rms_norm", pos_embed_max_size=16)
FLUX2_TINY = dict(patch_size=1, in_channels=16, num_layers=2, num_single_layers=4, attention_head_dim=16,
                  num_attention_heads=2, joint_attention_dim=48, timestep_guidance_channels=256, axes_dims_rope=(4, 4, 4, 4),
                  guidance_embeds=False)


def counted(run) -> int:
    """FLOPs torch counts for ``run()``, attention in the math kernel (the CPU's fused kernel has no FLOP formula)."""
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        run()
    return counter.get_total_flops()


def sd3_inputs(config: dict, batch: int, side: int, text_tokens: int, device: str = "cpu") -> dict:
    with torch.device(device):
        return dict(hidden_states=torch.randn(batch, config["in_channels"], side, side),
                    encoder_hidden_states=torch.randn(batch, text_tokens, config["joint_attention_dim"]),
                    pooled_projections=torch.randn(batch, config["pooled_projection_dim"]),
                    timestep=torch.rand(batch) * 1000, return_dict=False)


def flux2_inputs(config: dict, batch: int, side: int, text_tokens: int, device: str = "cpu") -> dict:
    with torch.device(device):
        latents = torch.randn(batch, config["in_channels"], side, side)
        embeds = torch.randn(batch, text_tokens, config["joint_attention_dim"])
        return dict(hidden_states=Flux2KleinPipeline._pack_latents(latents), encoder_hidden_states=embeds,
                    timestep=torch.rand(batch), txt_ids=Flux2KleinPipeline._prepare_text_ids(embeds),
                    img_ids=Flux2KleinPipeline._prepare_latent_ids(latents), return_dict=False)


def network_flops(network, inputs: dict, mode: str) -> int:
    """FlopCounterMode's count of one call of ``network`` differentiated as ``mode`` (gpu_step.MODES)."""
    for name, parameter in network.named_parameters():
        parameter.requires_grad_(mode == "full" or (mode == "adapter" and "lora_" in name))
    inputs["hidden_states"].requires_grad_(mode == "input")
    if mode == "forward":
        return counted(lambda: network(**inputs))
    return counted(lambda: network(**inputs)[0].square().mean().backward())


def test_one_linear_layer_forward_and_both_backwards_by_hand():
    rows, d_in, d_out = 3, 4, 5
    layer = torch.nn.Linear(d_in, d_out)
    cost = gpu_step.ForwardCost((gpu_step.Linear("layer", rows, d_in, d_out),), attention=0)
    forward = 2 * rows * d_in * d_out  # 120: a multiply and an add per term
    x = torch.randn(rows, d_in, requires_grad=True)  # inside a network: the input of a layer needs its gradient
    assert gpu_step.call_flops(cost, "forward") == forward == counted(lambda: layer(x))
    # Trained: dX and dW, each one forward's worth.
    assert gpu_step.call_flops(cost, "full") == 3 * forward == counted(lambda: layer(x).sum().backward())
    # Frozen, through the input only: dX.
    layer.requires_grad_(False)
    assert gpu_step.call_flops(cost, "input") == 2 * forward == counted(lambda: layer(x).sum().backward())


def test_attention_products_by_hand_forward_and_backward():
    batch, heads, q_len, kv_len, head_dim = 2, 3, 5, 7, 4
    # Q·Kᵀ and P·V: 2·q·kv·d each, per head.
    assert gpu_step.attention_flops(batch, heads, q_len, kv_len, head_dim) == 2 * 2 * batch * heads * q_len * kv_len * head_dim
    q = torch.randn(batch, heads, q_len, head_dim, requires_grad=True)
    k, v = (torch.randn(batch, heads, kv_len, head_dim, requires_grad=True) for _ in range(2))
    cost = gpu_step.ForwardCost((), gpu_step.attention_flops(batch, heads, q_len, kv_len, head_dim))
    sdpa = torch.nn.functional.scaled_dot_product_attention
    assert counted(lambda: sdpa(q, k, v)) == gpu_step.call_flops(cost, "forward")
    # Backward: dP = dO·Vᵀ, dV = Pᵀ·dO, dQ = dS·K, dK = dSᵀ·Q, twice the forward, frozen or not.
    assert counted(lambda: sdpa(q, k, v).sum().backward()) == gpu_step.call_flops(cost, "input") == 3 * cost.attention


def test_one_joint_block_sd3_transformer_by_hand():
    """A one-layer SD3 transformer: its single block is context_pre_only (no text output projection or MLP)."""
    config = dict(SD3_TINY, num_layers=1, dual_attention_layers=())
    b, side, text, d, c, p = BATCH, 8, 5, 32, 4, 2
    image = (side // p) ** 2
    mm = lambda rows, n, k: 2 * rows * n * k  # noqa: E731
    by_hand = (
        mm(b * image, d, c * p * p) + mm(b, d, 256) + mm(b, d, d) + mm(b, d, 24) + mm(b, d, d) + mm(b * text, d, 48)
        + mm(b, 6 * d, d) + mm(b, 2 * d, d)  # AdaLN-Zero of the image, continuous AdaLN of the text
        + 4 * mm(b * image, d, d) + 3 * mm(b * text, d, d)  # q, k, v, out of the image; q, k, v of the text
        + 2 * mm(b * 4 * (image + text), image + text, 8)  # joint attention, 4 heads of 8
        + mm(b * image, 4 * d, d) + mm(b * image, d, 4 * d)  # the image MLP
        + mm(b, 2 * d, d) + mm(b * image, c * p * p, d)  # norm_out, proj_out
    )
    cost = gpu_step.sd3_forward(config, b, image, text)
    assert gpu_step.call_flops(cost, "forward") == by_hand
    network = SD3Transformer2DModel(**config)
    assert network_flops(network, sd3_inputs(config, b, side, text), "forward") == by_hand


@pytest.mark.parametrize("family", ["sd35", "flux2_klein"])
def test_tiny_transformer_flops_match_flop_counter_mode(family):
    """Forward exactly; backward high by the input gradients autograd skips (layers no gradient reaches: the input
    projections, the timestep path, and under adapters the first block's projections), within a few %."""
    if family == "sd35":
        network, make_inputs, side, targets, adapter_tolerance = (
            SD3Transformer2DModel(**SD3_TINY), sd3_inputs, 16, SD3Backbone.lora_target_modules, 0.04)
    else:
        network, make_inputs, side, targets, adapter_tolerance = (
            Flux2Transformer2DModel(**FLUX2_TINY), flux2_inputs, 8, Flux2KleinBackbone.lora_target_modules, 0.03)
    config, text = dict(network.config), 7  # every setting, as the backbone reads them from config.json
    inputs = make_inputs(config, BATCH, side, text)
    cost = gpu_step.FORWARD_COSTS[family](config, BATCH, 64, text)
    assert gpu_step.image_tokens(family, config, inputs["hidden_states"].shape) == 64
    # Every weight matmul of the network is counted once, with its shape.
    modules = {name: m for name, m in network.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))}
    assert {linear.name for linear in cost.linears} == set(modules)
    for linear in cost.linears:
        weight = modules[linear.name].weight
        assert (weight.shape[0], weight[0].numel()) == (linear.d_out, linear.d_in), linear.name
    assert network_flops(network, inputs, "forward") == gpu_step.call_flops(cost, "forward")
    for mode in ("full", "input"):
        analytic, measured = gpu_step.call_flops(cost, mode), network_flops(network, inputs, mode)
        assert 0 <= analytic / measured - 1 < 0.01, mode
    rank = 4
    add_lora(network, targets, rank, 4.0, "generator")
    assert network_flops(network, inputs, "forward") == gpu_step.call_flops(cost, "forward", targets, rank)
    for mode, tolerance in (("adapter", adapter_tolerance), ("input", 0.01)):
        analytic, measured = gpu_step.call_flops(cost, mode, targets, rank), network_flops(network, inputs, mode)
        assert 0 <= analytic / measured - 1 < tolerance, mode


@pytest.mark.parametrize("family", ["sd35", "flux2_klein"])
def test_published_configs_forward_flops_on_the_meta_device(family):
    """The real-size networks at 512 px (shapes only, on the meta device): the count is exact."""
    config = {"sd35": gpu_step.SD35_MEDIUM, "flux2_klein": gpu_step.FLUX2_KLEIN_4B}[family]
    cls, make_inputs, side, text = {"sd35": (SD3Transformer2DModel, sd3_inputs, 64, 333),
                                    "flux2_klein": (Flux2Transformer2DModel, flux2_inputs, 32, 512)}[family]
    with torch.device("meta"):
        network = cls.from_config(config)
    inputs = make_inputs(config, 1, side, text, device="meta")
    cost = gpu_step.FORWARD_COSTS[family](config, 1, gpu_step.image_tokens(family, config, inputs["hidden_states"].shape), text)
    assert counted(lambda: network(**inputs)) == gpu_step.call_flops(cost, "forward")


def test_calls_and_flops_of_an_iteration_are_checked_against_the_method():
    layout = "shared_lora"
    calls = [gpu_step.RecordedCall(c.network, c.batch, c.mode, 16, 7)
             for c in gpu_step.expected_calls("dmd", 4, layout, prefix_steps=2)]
    gpu_step.check_calls("dmd", 4, layout, calls)  # two backward-simulation steps, then the DM loss and the critic
    with pytest.raises(RuntimeError, match="expected"):
        gpu_step.check_calls("dmd", 4, layout, [c for c in calls if c.network != "teacher"])
    with pytest.raises(RuntimeError, match="at most 3"):
        gpu_step.check_calls("dmd", 4, layout, calls[:1] * 4 + calls)
    # RTDMD: 4 rollout steps, the critic's 2 passes, 2 PPO steps, the final x̂0 and the auxiliary's 2 estimates.
    rtdmd = gpu_step.expected_calls("rtdmd", 4, "full")
    assert [(c.network, c.batch, c.mode) for c in rtdmd] == (
        [("generator", 4, "forward")] * 4 + [("fake_score", 4, "full"), ("fake_score", 8, "full")]
        + [("generator", 4, "full")] * 3 + [("teacher", 8, "forward"), ("fake_score", 4, "forward")])


def test_peaks_by_device_name_and_mfu():
    assert gpu_step.peak_tflops("NVIDIA H100 80GB HBM3", None) == 989.0
    assert gpu_step.peak_tflops("NVIDIA H200", None) == 989.0
    assert gpu_step.peak_tflops("NVIDIA A100-SXM4-80GB", None) == 312.0
    with pytest.raises(ValueError, match="--peak-tflops"):
        gpu_step.peak_tflops("NVIDIA H100 PCIe", None)
    assert gpu_step.peak_tflops("NVIDIA H100 PCIe", 756.0) == 756.0
    assert gpu_step.mfu(494.5e12, 2.0, 989.0) == pytest.approx(0.25)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message a machine without CUDA gets")
def test_the_real_size_benchmark_refuses_to_start_without_a_gpu():
    with pytest.raises(SystemExit, match="needs a GPU.*use --tiny on CPU"):
        gpu_step.main(["--methods", "dmd", "--families", "sd35"])


def test_tiny_rtdmd_iteration_under_ddp(tmp_path, capsys):
    """One RTDMD run with shared adapters on the tiny FLUX.2-klein (its FSDP2 run is skipped: FSDP2 refuses
    shared_lora): the table row follows from the timed iterations, whose calls and FLOPs are RTDMD's."""
    out = tmp_path / "gpu_step.json"
    rows = gpu_step.main(["--tiny", "--methods", "rtdmd", "--families", "flux2_klein", "--layouts", "shared_lora",
                          "--strategies", "ddp", "fsdp2", "--batch", "2", "--iterations", "2", "--warmup", "0",
                          "--peak-tflops", "1", "--json", str(out)])
    printed = capsys.readouterr().out
    assert len(rows) == 1, printed
    row = rows[0]
    assert "error" not in row, row
    assert {k: row[k] for k in ("method", "family", "layout", "strategy", "world_size", "resolution", "batch")} == dict(
        method="rtdmd", family="flux2_klein", layout="shared_lora", strategy="ddp", world_size=1, resolution=16, batch=2)
    assert "| rtdmd | flux2_klein | shared_lora | ddp | 1 | 16 | 2 |" in printed
    assert "skipped rtdmd flux2_klein shared_lora fsdp2" in printed
    iterations = json.loads(out.read_text())["runs"][0]["iterations"]
    assert len(iterations) == 2
    from tiny_flux2 import tiny_flux2_transformer

    config = dict(tiny_flux2_transformer(guidance_embeds=False).config)
    targets = Flux2KleinBackbone.lora_target_modules
    ranks = {"teacher": None, "generator": gpu_step.TINY_LORA["generator"][0], "fake_score": gpu_step.TINY_LORA["fake_score"][0]}
    # 16 px: the tiny VAE's factor 2 and the 2×2 patchify leave 4×4 image tokens; 512 text tokens.
    expected = sum(gpu_step.call_flops(gpu_step.flux2_forward(config, c.batch, 16, 512), c.mode, targets, ranks[c.network])
                   for c in gpu_step.expected_calls("rtdmd", 2, "shared_lora"))
    for iteration in iterations:
        assert [(c["network"], c["batch"], c["mode"], c["image_tokens"], c["text_tokens"]) for c in iteration["calls"]] == [
            (c.network, c.batch, c.mode, 16, 512) for c in gpu_step.expected_calls("rtdmd", 2, "shared_lora")]
        assert iteration["flops"] == expected
        roles = iteration["roles"]
        assert roles["fake_score"]["flops"] + roles["generator"]["flops"] == expected
        assert roles["fake_score"]["seconds"] + roles["generator"]["seconds"] == pytest.approx(iteration["seconds"])
    seconds = [it["seconds"] for it in iterations]
    assert row["seconds"] == pytest.approx(statistics.median(seconds))
    assert row["images_per_second"] == pytest.approx(2 / row["seconds"])
    assert row["mfu"] == pytest.approx(2 * expected / sum(seconds) / 1e12)
    assert row["peak_gib"] > 0
