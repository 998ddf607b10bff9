"""One training iteration of DMD, GNDM and RTDMD stage 2 on real-size SD3.5-M and FLUX.2-klein-4B transformers:
seconds, images per second, model FLOPs utilisation (MFU) and peak memory, per method × family × role layout
(docs/roles.md) × strategy (docs/scaling.md).

    python benchmarks/gpu_step.py [--methods dmd gndm rtdmd] [--families sd35 flux2_klein]
                                  [--layouts full shared_lora] [--strategies ddp zero2 fsdp2]
                                  [--resolution 512] [--batch 8] [--iterations 5] [--warmup 2]
                                  [--peak-tflops T] [--json results.json] [--tiny]

Networks: the diffusers classes at their published configs (``SD3Transformer2DModel`` of
stabilityai/stable-diffusion-3.5-medium, ``Flux2Transformer2DModel`` of black-forest-labs/FLUX.2-klein-4B), with
seeded random weights (teacher, generator and fake score start equal, as from one checkpoint). The text encoders
and the VAE are narrow random ones with the real output widths and sequence lengths (CLIP-L/G projections 768 +
1280 and 77 CLIP + 256 (zero) T5 tokens for SD3.5; Qwen3 width 2560, 27 layers, 512 tokens for klein; VAEs of
scale factor 8 with 8 channels), so the step measures the transformer roles. Precision as in the configs: the
trainer's ``bf16-mixed`` (bf16 compute; the roles' trained weights float32) and a bf16 teacher, with gradient
checkpointing of both roles.

One iteration is one generator update and one fake-score update: DMD and GNDM at TTUR 1 (a run at TTUR r adds
r − 1 critic-only iterations per generator update), RTDMD stage 2's RL iteration (rollout, fake-score step,
generator step). Each (method, family, layout, strategy, resolution, batch) runs in its own process group: one
process per GPU under ``torchrun``, or one process on a single GPU. ``shared_lora`` roles under FSDP2 are skipped:
FSDP2 refuses them (docs/scaling.md, "Role layouts").

MFU: the FLOPs of every network call the iteration makes (recorded by forward hooks on the teacher, generator and
fake score, and checked against the method's documented calls, :func:`expected_calls`), each counted analytically
from the architecture (:func:`sd3_forward`, :func:`flux2_forward`: 2·m·n·k per matmul; backward: dX of every matmul,
twice the attention products, dW of the trained weights), over the measured seconds and the GPU's bf16 dense peak
(:data:`PEAK_TFLOPS`). Gradient checkpointing's recomputation is not counted (model FLOPs, not hardware FLOPs).

``--tiny`` runs the same code path on CPU (gloo) with the tiny random pipelines of ``tests/tiny_models.py`` and
``tests/tiny_flux2.py``: for CI, not for numbers (no MFU without ``--peak-tflops``; peak memory is the rise of the
process's resident memory during training).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Sequence

from torch.utils.data import IterableDataset

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO / "benchmarks"))
from memory import PeakSampler, resident_bytes  # noqa: E402

METHODS = ("dmd", "gndm", "rtdmd")
FAMILIES = ("sd35", "flux2_klein")
LAYOUTS = ("full", "lora", "shared_lora")
STRATEGIES = ("ddp", "zero2", "fsdp2")
GiB = 2**30

SD35_MEDIUM = {
    "sample_size": 128, "patch_size": 2, "in_channels": 16, "num_layers": 24, "attention_head_dim": 64,
    "num_attention_heads": 24, "joint_attention_dim": 4096, "caption_projection_dim": 1536,
    "pooled_projection_dim": 2048, "out_channels": 16, "pos_embed_max_size": 384,
    "dual_attention_layers": list(range(13)), "qk_norm": "rms_norm",
}
"""``transformer/config.json`` of stabilityai/stable-diffusion-3.5-medium (MMDiT-X: dual attention in blocks 0–12)."""
FLUX2_KLEIN_4B = {
    "patch_size": 1, "in_channels": 128, "out_channels": None, "num_layers": 5, "num_single_layers": 20,
    "attention_head_dim": 128, "num_attention_heads": 24, "joint_attention_dim": 7680,
    "timestep_guidance_channels": 256, "mlp_ratio": 3.0, "axes_dims_rope": [32, 32, 32, 32], "rope_theta": 2000,
    "eps": 1e-6, "guidance_embeds": False,
}
"""``transformer/config.json`` of black-forest-labs/FLUX.2-klein-4B (klein-base-4B has the same architecture)."""
SD3_CLIP_PROJECTIONS = (768, 1280)
"""CLIP-L and CLIP-G projection widths: SD3's pooled embedding is both, 2048 channels."""
QWEN3_4B_WIDTH = 2560
"""Qwen3-4B's hidden size: klein's text input stacks three of its layers, 3 × 2560 = 7680 channels."""
VAE_CHANNELS = 8
"""Channels of every level of the benchmark's narrow VAEs (four levels: scale factor 8, as the real ones)."""
GUIDANCE = {"sd35": 4.5, "flux2_klein": 4.0}
"""The teacher's CFG scale in the library's configs (configs/sd35/*.yaml, configs/flux2_klein/*.yaml)."""
STUDENT_STEPS = 4
"""The configs' few-step student."""
SELECTED_STEPS = 2
"""RTDMD's SubGRPO steps per RL iteration (|S|, the configs' ``num_selected_steps``)."""
LORA = {"generator": (64, 128.0), "fake_score": (32, 32.0)}
"""``(rank, alpha)`` of each role's adapter under a LoRA layout (the configs' large-model shared adapters)."""
TINY_LORA = {"generator": (4, 8.0), "fake_score": (2, 2.0)}
"""The same under ``--tiny``, whose networks are 32 channels wide."""
INIT_SEED = 0
"""Seed of every transformer's random weights (the same on every rank and for every role)."""
DEFAULT_RESOLUTION = {False: 512, True: 16}
"""Image side in pixels by ``--tiny``: the configs' 512, and 16 for the tiny pipelines (8×8 and 4×4 latent tokens)."""
PEAK_TFLOPS = (
    (r"H100.*(SXM|HBM3)", 989.0),
    (r"H200", 989.0),
    (r"A100", 312.0),
)
"""bf16 dense peak TFLOPs by CUDA device name (``torch.cuda.get_device_name``): H100 SXM, H200, A100."""


# ---- FLOPs, counted analytically ----------------------------------------------------------------------------
def matmul_flops(m: int, n: int, k: int) -> int:
    """FLOPs of an ``(m × k) @ (k × n)`` product: ``2·m·n·k`` (a multiply and an add per term)."""
    return 2 * m * n * k


def attention_flops(batch: int, heads: int, q_len: int, kv_len: int, head_dim: int) -> int:
    """FLOPs of attention's two activation products, ``Q·Kᵀ`` and ``P·V``, over ``batch × heads`` heads."""
    return 2 * matmul_flops(batch * heads * q_len, kv_len, head_dim)


@dataclass(frozen=True)
class Linear:
    """One weight matmul of a forward: ``rows`` input vectors of width ``d_in`` mapped to ``d_out`` by the module
    ``name`` (its name in the diffusers model, which LoRA targets match)."""

    name: str
    rows: int
    d_in: int
    d_out: int

    @property
    def flops(self) -> int:
        return matmul_flops(self.rows, self.d_out, self.d_in)


def is_lora_target(name: str, targets: Sequence[str] | str) -> bool:
    """Whether peft's ``target_modules`` adapt the module ``name``: a regex matched against the whole name, or
    a list of names each matched as the name itself or its dotted suffix (docs/roles.md, ``target_modules``)."""
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == target or name.endswith("." + target) for target in targets)


@dataclass(frozen=True)
class ForwardCost:
    """The matmuls of one network forward: its weight matmuls and the FLOPs of its attention products."""

    linears: tuple[Linear, ...]
    attention: int

    @property
    def weights(self) -> int:
        """FLOPs of the weight matmuls."""
        return sum(linear.flops for linear in self.linears)

    def adapter(self, targets: Sequence[str] | str, rank: int) -> int:
        """FLOPs of rank-``rank`` LoRA adapters on the linears ``targets`` adapts: ``x·Aᵀ`` then ``·Bᵀ``."""
        return sum(matmul_flops(linear.rows, rank, linear.d_in) + matmul_flops(linear.rows, linear.d_out, rank)
                   for linear in self.linears if is_lora_target(linear.name, targets))


MODES = ("forward", "full", "adapter", "input")
"""How a network call is differentiated: ``forward`` (no backward), ``full`` (backward into every weight: a full
role), ``adapter`` (into its LoRA weights only, the base frozen: a ``lora``/``shared_lora`` role) and ``input``
(frozen, backward through its input only)."""


def call_flops(cost: ForwardCost, mode: str, targets: Sequence[str] | str | None = None, rank: int | None = None) -> int:
    """FLOPs of one network call (forward, and backward by ``mode``) of a network with ``cost`` per forward,
    carrying rank-``rank`` adapters on ``targets`` (``None``: no adapter).

    Backward: the input gradient of every matmul (``dX = dY·W``: once the weight FLOPs; attention's four
    products: twice its forward), plus the weight gradient (``dW = dYᵀ·X``: once more) of the trained weights.
    So a full role costs 3× its forward, and a frozen network's backward is 1× its weight matmuls.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if mode == "adapter" and rank is None:
        raise ValueError("mode 'adapter' trains a LoRA adapter: give its rank and targets")
    adapter = 0 if rank is None else cost.adapter(targets, rank)
    forward = cost.weights + cost.attention + adapter
    if mode == "forward":
        return forward
    input_grads = cost.weights + 2 * cost.attention + adapter
    weight_grads = {"full": cost.weights, "adapter": adapter, "input": 0}[mode]
    return forward + input_grads + weight_grads


def sd3_forward(config: dict, batch: int, image_tokens: int, text_tokens: int) -> ForwardCost:
    """The matmuls of one ``SD3Transformer2DModel`` forward (``config``: its config.json) on ``batch`` samples of
    ``image_tokens`` patches and ``text_tokens`` text tokens.

    Joint blocks: AdaLN-Zero modulation per sample (9·d with dual attention, MMDiT-X), q/k/v/out on each stream,
    joint attention over image + text, a second image-only attention in ``dual_attention_layers``, GELU MLPs of
    ratio 4 on each stream. The last block is ``context_pre_only``: its text stream has a continuous AdaLN
    (2·d), no output projection and no MLP, though its text queries still attend.
    """
    heads, head_dim = config["num_attention_heads"], config["attention_head_dim"]
    d = heads * head_dim
    if config["caption_projection_dim"] != d:
        raise ValueError(f"caption_projection_dim {config['caption_projection_dim']} must equal heads × head_dim = {d}")
    patch, layers = config["patch_size"], config["num_layers"]
    dual = set(config.get("dual_attention_layers") or ())
    out = patch * patch * (config.get("out_channels") or config["in_channels"])
    image, text, tokens = batch * image_tokens, batch * text_tokens, image_tokens + text_tokens
    linears = [
        Linear("pos_embed.proj", image, config["in_channels"] * patch * patch, d),
        Linear("time_text_embed.timestep_embedder.linear_1", batch, 256, d),
        Linear("time_text_embed.timestep_embedder.linear_2", batch, d, d),
        Linear("time_text_embed.text_embedder.linear_1", batch, config["pooled_projection_dim"], d),
        Linear("time_text_embed.text_embedder.linear_2", batch, d, d),
        Linear("context_embedder", text, config["joint_attention_dim"], d),
    ]
    attention = 0
    for i in range(layers):
        block, last = f"transformer_blocks.{i}", i == layers - 1
        linears.append(Linear(f"{block}.norm1.linear", batch, d, (9 if i in dual else 6) * d))
        linears.append(Linear(f"{block}.norm1_context.linear", batch, d, (2 if last else 6) * d))
        linears += [Linear(f"{block}.attn.{name}", image, d, d) for name in ("to_q", "to_k", "to_v", "to_out.0")]
        text_projections = ("add_q_proj", "add_k_proj", "add_v_proj") + (() if last else ("to_add_out",))
        linears += [Linear(f"{block}.attn.{name}", text, d, d) for name in text_projections]
        attention += attention_flops(batch, heads, tokens, tokens, head_dim)
        if i in dual:
            linears += [Linear(f"{block}.attn2.{name}", image, d, d) for name in ("to_q", "to_k", "to_v", "to_out.0")]
            attention += attention_flops(batch, heads, image_tokens, image_tokens, head_dim)
        streams = (("ff", image),) + (() if last else (("ff_context", text),))
        for name, rows in streams:
            linears += [Linear(f"{block}.{name}.net.0.proj", rows, d, 4 * d),
                        Linear(f"{block}.{name}.net.2", rows, 4 * d, d)]
    linears += [Linear("norm_out.linear", batch, d, 2 * d), Linear("proj_out", image, d, out)]
    return ForwardCost(tuple(linears), attention)


def flux2_forward(config: dict, batch: int, image_tokens: int, text_tokens: int) -> ForwardCost:
    """The matmuls of one ``Flux2Transformer2DModel`` forward (``config``: its config.json) on ``batch`` samples of
    ``image_tokens`` packed latent tokens and ``text_tokens`` text tokens.

    Shared modulation per sample (6·d per double-stream stream, 3·d for the single-stream blocks); double-stream
    blocks: q/k/v/out on each stream, joint attention, SwiGLU MLPs (in: 2·mlp, out: mlp) on each stream;
    single-stream blocks over image + text: the fused q/k/v + MLP-in projection (3·d + 2·mlp), attention and the
    fused attention + MLP-out projection (d + mlp → d).
    """
    heads, head_dim = config["num_attention_heads"], config["attention_head_dim"]
    d = heads * head_dim
    mlp = int(d * config["mlp_ratio"])
    patch = config["patch_size"]
    out = patch * patch * (config.get("out_channels") or config["in_channels"])
    image, text, tokens = batch * image_tokens, batch * text_tokens, image_tokens + text_tokens
    channels = config["timestep_guidance_channels"]
    embedders = ("timestep_embedder",) + (("guidance_embedder",) if config["guidance_embeds"] else ())
    linears = []
    for name in embedders:
        linears += [Linear(f"time_guidance_embed.{name}.linear_1", batch, channels, d),
                    Linear(f"time_guidance_embed.{name}.linear_2", batch, d, d)]
    linears += [
        Linear("double_stream_modulation_img.linear", batch, d, 6 * d),
        Linear("double_stream_modulation_txt.linear", batch, d, 6 * d),
        Linear("single_stream_modulation.linear", batch, d, 3 * d),
        Linear("x_embedder", image, config["in_channels"], d),
        Linear("context_embedder", text, config["joint_attention_dim"], d),
    ]
    attention = 0
    for i in range(config["num_layers"]):
        block = f"transformer_blocks.{i}"
        linears += [Linear(f"{block}.attn.{name}", image, d, d) for name in ("to_q", "to_k", "to_v", "to_out.0")]
        linears += [Linear(f"{block}.attn.{name}", text, d, d)
                    for name in ("add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")]
        attention += attention_flops(batch, heads, tokens, tokens, head_dim)
        for name, rows in (("ff", image), ("ff_context", text)):
            linears += [Linear(f"{block}.{name}.linear_in", rows, d, 2 * mlp),
                        Linear(f"{block}.{name}.linear_out", rows, mlp, d)]
    for i in range(config["num_single_layers"]):
        block = f"single_transformer_blocks.{i}"
        linears.append(Linear(f"{block}.attn.to_qkv_mlp_proj", batch * tokens, d, 3 * d + 2 * mlp))
        attention += attention_flops(batch, heads, tokens, tokens, head_dim)
        linears.append(Linear(f"{block}.attn.to_out", batch * tokens, d + mlp, d))
    linears += [Linear("norm_out.linear", batch, d, 2 * d), Linear("proj_out", image, d, out)]
    return ForwardCost(tuple(linears), attention)


FORWARD_COSTS: dict[str, Callable[[dict, int, int, int], ForwardCost]] = {
    "sd35": sd3_forward, "flux2_klein": flux2_forward,
}


def image_tokens(family: str, config: dict, hidden_states_shape: Sequence[int]) -> int:
    """Transformer image tokens of one sample from the shape of the ``hidden_states`` the backbone passes: an
    unpatchified ``(B, C, H, W)`` latent for SD3 (``patch_size``² cells a token), packed ``(B, tokens, C)``
    for FLUX.2."""
    if family == "sd35":
        patch = config["patch_size"]
        return (hidden_states_shape[2] // patch) * (hidden_states_shape[3] // patch)
    return hidden_states_shape[1]


# ---- the network calls of one iteration ---------------------------------------------------------------------
@dataclass(frozen=True)
class Call:
    """One network call: which network, on how many samples, differentiated how (:data:`MODES`)."""

    network: str
    batch: int
    mode: str


def role_mode(layout: str) -> str:
    """The backward mode of a trained role's calls in ``layout``: into every weight, or into its adapter only."""
    return "full" if layout == "full" else "adapter"


def expected_calls(method: str, batch: int, layout: str, prefix_steps: int = 0) -> list[Call]:
    """The network calls of one iteration of ``method`` (TTUR 1) on ``batch`` samples per process, in order.

    DMD and GNDM (docs/methods/dmd.md, docs/methods/gndm.md; GNDM in its cold start, no rewards, one R_dm draw):
    ``prefix_steps`` no-grad generator steps of backward simulation, the generator's x̂0 with grad, the real
    score (teacher, CFG: both branches as one batch) and the fake score without grad; then the fake-score loss.
    RTDMD stage 2 (docs/methods/rtdmd.md): the rollout's :data:`STUDENT_STEPS` no-grad generator steps; the fake
    score's ADSM term and its consistency pair (one batch of two); the generator's |S| PPO steps and its final
    x̂0 with grad, then the AC-DMD auxiliary's teacher (CFG) and fake score without grad.
    """
    trained = role_mode(layout)
    generator_step = [Call("generator", batch, trained), Call("teacher", 2 * batch, "forward"),
                      Call("fake_score", batch, "forward")]
    if method in ("dmd", "gndm"):
        if not 0 <= prefix_steps < STUDENT_STEPS:
            raise ValueError(f"backward simulation runs 0..{STUDENT_STEPS - 1} prefix steps, got {prefix_steps}")
        prefix = [Call("generator", batch, "forward")] * prefix_steps
        return prefix + generator_step + [Call("fake_score", batch, trained)]
    if method == "rtdmd":
        return ([Call("generator", batch, "forward")] * STUDENT_STEPS
                + [Call("fake_score", batch, trained), Call("fake_score", 2 * batch, trained)]
                + [Call("generator", batch, trained)] * SELECTED_STEPS + generator_step)
    raise ValueError(f"method must be one of {METHODS}, got {method!r}")


@dataclass(frozen=True)
class RecordedCall:
    """A network call as the forward hooks saw it: the :class:`Call` and its tokens per sample."""

    network: str
    batch: int
    mode: str
    image_tokens: int
    text_tokens: int

    @property
    def call(self) -> Call:
        return Call(self.network, self.batch, self.mode)


def prefix_steps(calls: Sequence[RecordedCall]) -> int:
    """The generator forwards before the iteration's first differentiated call (DMD's backward-simulation prefix)."""
    count = 0
    for call in calls:
        if call.network != "generator" or call.mode != "forward":
            break
        count += 1
    return count


def check_calls(method: str, batch: int, layout: str, calls: Sequence[RecordedCall]) -> None:
    """A RuntimeError unless the recorded ``calls`` of one iteration are :func:`expected_calls` (the FLOPs would
    count other calls than the method makes)."""
    prefix = prefix_steps(calls) if method != "rtdmd" else 0
    if prefix >= STUDENT_STEPS:
        raise RuntimeError(f"{method} ran {prefix} generator forwards before its first trained call; backward "
                           f"simulation runs at most {STUDENT_STEPS - 1} (docs/methods/dmd.md)")
    expected = expected_calls(method, batch, layout, prefix)
    got = [call.call for call in calls]
    if got != expected:
        raise RuntimeError(f"{method} made the network calls {got}, expected {expected} (docs/methods/{method}.md)")


def iteration_flops(family: str, config: dict, calls: Sequence[RecordedCall], targets: Sequence[str] | str,
                    ranks: dict[str, int | None]) -> int:
    """FLOPs of the recorded ``calls`` of the family's transformer at ``config``, each network with its adapter
    rank (``ranks``; ``None``: no adapter) on the modules ``targets`` adapts."""
    forward = FORWARD_COSTS[family]
    return sum(call_flops(forward(config, c.batch, c.image_tokens, c.text_tokens), c.mode, targets, ranks[c.network])
               for c in calls)


# ---- results --------------------------------------------------------------------------------------------
def peak_tflops(device_name: str, override: float | None) -> float:
    """The bf16 dense peak of ``device_name`` (:data:`PEAK_TFLOPS`), or ``override`` (``--peak-tflops``)."""
    if override is not None:
        if not override > 0:
            raise ValueError(f"--peak-tflops must be > 0, got {override}")
        return override
    for pattern, value in PEAK_TFLOPS:
        if re.search(pattern, device_name):
            return value
    known = ", ".join(pattern for pattern, _ in PEAK_TFLOPS)
    raise ValueError(f"no bf16 peak known for the GPU {device_name!r} (known: {known}); pass --peak-tflops")


def mfu(flops: float, seconds: float, peak: float) -> float:
    """Model FLOPs utilisation: ``flops`` done in ``seconds`` on one device of ``peak`` TFLOPs."""
    return flops / seconds / (peak * 1e12)


def summarize(result: dict, peak: float | None) -> dict:
    """The table row of one run: median seconds of its timed iterations, images per second over every process,
    MFU of the iteration and of its generator step (total FLOPs over total seconds), peak memory."""
    keys = ("method", "family", "layout", "strategy", "resolution", "batch", "world_size")
    row = {key: result[key] for key in keys}
    if "error" in result:
        return {**row, "error": result["error"]}
    timed = result["iterations"]
    seconds = [it["seconds"] for it in timed]
    median = statistics.median(seconds)
    row.update(seconds=median, images_per_second=result["batch"] * result["world_size"] / median,
               peak_gib=result["peak_bytes"] / GiB, flops=statistics.mean(it["flops"] for it in timed))
    row["mfu"] = None if peak is None else mfu(sum(it["flops"] for it in timed), sum(seconds), peak)
    generator = [it["roles"]["generator"] for it in timed]
    row["generator_mfu"] = None if peak is None else mfu(
        sum(g["flops"] for g in generator), sum(g["seconds"] for g in generator), peak)
    return row


def percent(value: float | None) -> str:
    """A fraction as a percentage, ``n/a`` for none."""
    return "n/a" if value is None else f"{100 * value:.1f}%"


def markdown_table(rows: Sequence[dict]) -> str:
    """The rows as a markdown table (a failed run shows its error in place of the figures)."""
    header = ("| method | family | layout | strategy | GPUs | resolution | batch/GPU | s/iteration | images/s | MFU "
              "| generator-step MFU | peak GiB |")
    lines = [header, "|---" * 12 + "|"]
    for row in rows:
        key = " | ".join(str(row[k]) for k in ("method", "family", "layout", "strategy"))
        if "error" in row:
            lines.append(f"| {key} | {row['world_size']} | {row['resolution']} | {row['batch']} | failed: {row['error']} "
                         "| | | | | |")
            continue
        lines.append(f"| {key} | {row['world_size']} | {row['resolution']} | {row['batch']} | {row['seconds']:.3f} "
                     f"| {row['images_per_second']:.2f} | {percent(row['mfu'])} | {percent(row['generator_mfu'])} "
                     f"| {row['peak_gib']:.1f} |")
    return "\n".join(lines)


# ---- one run (a worker process, one per GPU) ----------------------------------------------------------------
@dataclass(frozen=True)
class Spec:
    """One run of the grid, as the worker processes receive it."""

    method: str
    family: str
    layout: str
    strategy: str
    resolution: int
    batch: int
    iterations: int
    warmup: int
    tiny: bool
    gradient_checkpointing: bool
    pipeline: str
    """The pipeline folder (text encoders, VAE, scheduler and the transformer's config.json)."""


def group_size(method: str, batch: int) -> int:
    """K of the K-repeated batch: 4 (the configs' GNDM K) when it divides ``batch``, else 2, else 1; RTDMD's
    group-relative advantages need K >= 2."""
    size = next(k for k in (4, 2, 1) if batch % k == 0)
    if method == "rtdmd" and size < 2:
        raise ValueError(f"rtdmd needs an even batch (groups of K >= 2 images per prompt), got --batch {batch}")
    return size


class GroupedPrompts(IterableDataset):
    """Endless prompts, ``batch`` at a time the same K-repeated batch (the text never changes the cost). Batched
    by the loader (a real batch sampler: DeepSpeed reads its batch size)."""

    def __init__(self, batch: int, group: int):
        self.prompts = [f"a photo of object number {i // group}" for i in range(batch)]

    def __iter__(self):
        while True:
            yield from self.prompts


def prompt_batch(prompts: list[str]) -> dict:
    """The loader's batch: the prompts only, as the methods' batches are."""
    return {"prompts": list(prompts)}


def backbone_class(family: str):
    """The family's adapter, with :func:`random_denoiser` in place of loading the transformer's weights."""
    from diffusers import Flux2Transformer2DModel, SD3Transformer2DModel

    from rdm_lightning.backbones import Flux2KleinBackbone, SD3Backbone

    base, denoiser = {"sd35": (SD3Backbone, SD3Transformer2DModel),
                      "flux2_klein": (Flux2KleinBackbone, Flux2Transformer2DModel)}[family]

    class RandomTransformerBackbone(base):
        """``load_denoiser``: the folder's transformer config, :data:`INIT_SEED` random weights, on ``init_device``."""

        def __init__(self, *args, init_device: str = "cpu", **kwargs):
            super().__init__(*args, **kwargs)
            self.init_device = init_device

        def load_denoiser(self):
            return random_denoiser(denoiser, self.transformer_config, self.init_device)

    RandomTransformerBackbone.__name__ = f"Random{base.__name__}"
    return RandomTransformerBackbone


def random_denoiser(cls, config: dict, device: str):
    """``cls`` at ``config`` with float32 weights drawn from :data:`INIT_SEED` on ``device`` (equal on every call)."""
    import torch

    devices = [torch.device(device)] if torch.device(device).type == "cuda" else []
    with torch.random.fork_rng(devices=devices), torch.device(device):
        torch.manual_seed(INIT_SEED)  # every device's generator
        return cls.from_config(config).float()


def roles_config(layout: str, tiny: bool, gradient_checkpointing: bool):
    """Both roles in ``layout``, with :data:`LORA` (:data:`TINY_LORA`) adapters under a LoRA layout."""
    from rdm_lightning.methods.roles import RoleConfig, RolesConfig

    def role(name: str) -> RoleConfig:
        if layout == "full":
            return RoleConfig(gradient_checkpointing=gradient_checkpointing)
        rank, alpha = (TINY_LORA if tiny else LORA)[name]
        return RoleConfig(layout=layout, rank=rank, alpha=alpha, gradient_checkpointing=gradient_checkpointing)

    return RolesConfig(generator=role("generator"), fake_score=role("fake_score"))


def build_module(spec: Spec, backbone):
    """The method's module as its config has it (docs/methods/<method>.md), at TTUR 1, a 4-step student, a bf16
    teacher, and a budget of ``warmup + iterations`` generator updates."""
    from rdm_lightning.methods import (
        DMD, GNDM, RTDMD, DMDConfig, GNDMConfig, OptimizerConfig, RTDMDConfig, StudentConfig,
    )
    from rdm_lightning.rewards import StrokeContrastReward

    common = dict(student=StudentConfig(num_steps=STUDENT_STEPS), teacher_dtype="bfloat16",
                  max_generator_updates=spec.warmup + spec.iterations,
                  roles=roles_config(spec.layout, spec.tiny, spec.gradient_checkpointing))
    scale, group = GUIDANCE[spec.family], group_size(spec.method, spec.batch)
    if spec.method == "rtdmd":
        # A cheap differentiable reward: the reward backprop's cost is the VAE decode, not a reward network.
        return RTDMD(backbone, rewards=[StrokeContrastReward(name="contrast")],
                     rtdmd=RTDMDConfig(group_size=group, num_selected_steps=SELECTED_STEPS),
                     dmd=DMDConfig(guidance_scale=scale), **common)
    optimizer = OptimizerConfig(lr=1e-6, grad_clip=1.0)
    dmd = DMDConfig(guidance_scale=scale, generator_update_ratio=1, norm_eps=1e-8)
    if spec.method == "gndm":
        return GNDM(backbone, gndm=GNDMConfig(group_size=group), dmd=dmd, generator_optimizer=optimizer,
                    fake_score_optimizer=optimizer, **common)
    return DMD(backbone, dmd=dmd, generator_optimizer=optimizer, fake_score_optimizer=optimizer, **common)


def make_strategy(name: str, cuda: bool):
    """The strategy of the presets in configs/strategy/: DDP (``find_unused_parameters``, as the module needs),
    :class:`~rdm_lightning.strategies.DeepSpeedZeroStrategy` at ZeRO-2 or
    :class:`~rdm_lightning.strategies.FSDP2Strategy`; gloo on CPU."""
    from lightning.pytorch.strategies import DDPStrategy

    from rdm_lightning.strategies import DeepSpeedZeroStrategy, FSDP2Strategy

    backend = None if cuda else "gloo"
    if name == "ddp":
        return DDPStrategy(find_unused_parameters=True, process_group_backend=backend)
    if name == "fsdp2":
        return FSDP2Strategy(process_group_backend=backend)
    if name == "zero2":
        if not cuda:
            raise ValueError("strategy zero2 (DeepSpeed) needs CUDA; with --tiny use ddp or fsdp2")
        return DeepSpeedZeroStrategy(stage=2)
    raise ValueError(f"strategy must be one of {STRATEGIES}, got {name!r}")


class CallRecorder:
    """Forward pre-hooks on the teacher, generator and fake score that record each call (:class:`RecordedCall`):
    its samples and tokens, and how it will be differentiated, read from the grad mode and which of the
    network's parameters require grad at the call (the live parameters: FSDP2 replaces them when it shards)."""

    def __init__(self, module, family: str, config: dict):
        self.family, self.config, self.calls = family, config, []
        for name in ("teacher", "generator", "fake_score"):
            network = getattr(module, name)
            network.register_forward_pre_hook(self._hook(name, network), with_kwargs=True)

    def _hook(self, name: str, network):
        import torch

        from rdm_lightning.methods.lora import is_adapter_weight

        def record(module, args, kwargs) -> None:
            if "hidden_states" not in kwargs or "encoder_hidden_states" not in kwargs:
                raise RuntimeError(f"{name} was called without hidden_states/encoder_hidden_states keywords: "
                                   "the benchmark cannot count its tokens")
            x, text = kwargs["hidden_states"], kwargs["encoder_hidden_states"]
            mode = "forward"
            if torch.is_grad_enabled():
                trained = [n for n, p in network.named_parameters() if p.requires_grad]
                if any(not is_adapter_weight(n) for n in trained):
                    mode = "full"
                elif trained:
                    mode = "adapter"
                elif x.requires_grad:
                    mode = "input"
            tokens = image_tokens(self.family, self.config, x.shape)
            self.calls.append(RecordedCall(name, x.shape[0], mode, tokens, text.shape[1]))

        return record


def stamp_role_steps(module, on_step: Callable[[str], None]) -> None:
    """Call ``on_step(role)`` after each of the module's role steps (backward, clipping, optimizer step)."""
    step_role = module.step_role

    def stamped(role, loss) -> None:
        step_role(role, loss)
        on_step(role)

    module.step_role = stamped


def role_segments(start: float, end: float, stamps: Sequence[tuple[str, float, int]],
                  calls: Sequence[RecordedCall]) -> dict:
    """Each role's share of one iteration: from the previous role step's end (the iteration's start) to its own
    step's end, the last role taking the rest of the iteration; ``stamps`` are ``(role, time, calls so far)``."""
    segments, begin, first = {}, start, 0
    for index, (role, at, count) in enumerate(stamps):
        last = index == len(stamps) - 1
        segments[role] = {"seconds": (end if last else at) - begin,
                          "calls": list(calls[first:] if last else calls[first:count])}
        begin, first = at, count
    return segments


def run(spec: Spec) -> dict | None:
    """Train ``spec.warmup + spec.iterations`` iterations and time the last ``spec.iterations``; rank 0's result."""
    import lightning as L
    import torch
    from lightning.pytorch.callbacks import Callback
    from torch.utils.data import DataLoader

    cuda = not spec.tiny
    if cuda:
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
        torch.cuda.set_device(device)
    else:
        device = "cpu"
        # One thread (the tiny networks gain nothing from more), which Lightning keeps under DDP when this is set.
        os.environ["OMP_NUM_THREADS"] = "1"
        torch.set_num_threads(1)
    L.seed_everything(0, verbose=False)
    cls = backbone_class(spec.family)
    backbone = cls(spec.pipeline, height=spec.resolution, width=spec.resolution, frozen_dtype="bfloat16",
                   init_device=device)
    config = backbone.transformer_config
    module = build_module(spec, backbone)
    recorder = CallRecorder(module, spec.family, config)
    lora = TINY_LORA if spec.tiny else LORA
    ranks = {"teacher": None, **{role: None if spec.layout == "full" else lora[role][0] for role in lora}}
    iterations: list[dict] = []

    def flops_of(calls: Sequence[RecordedCall]) -> int:
        return iteration_flops(spec.family, config, calls, backbone.lora_target_modules, ranks)

    def sync() -> float:
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter()

    class Timer(Callback):
        def on_train_start(self, trainer, pl_module):
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            else:
                self.before, self.sampler = resident_bytes(), PeakSampler()
                self.sampler.start()

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            recorder.calls.clear()
            self.stamps, self.start = [], sync()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            end = sync()
            calls = list(recorder.calls)
            check_calls(spec.method, spec.batch, spec.layout, calls)
            segments = role_segments(self.start, end, self.stamps, calls)
            iterations.append({
                "seconds": end - self.start,
                "flops": flops_of(calls),
                "roles": {role: {"seconds": s["seconds"], "flops": flops_of(s["calls"])} for role, s in segments.items()},
                "calls": [asdict(c) for c in calls],
            })

        def on_train_end(self, trainer, pl_module):
            # The largest of every process's peak.
            peak = torch.cuda.max_memory_allocated() if cuda else self.sampler.stop() - self.before
            value = torch.tensor([float(peak)], device=device)
            if torch.distributed.is_initialized():
                torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.MAX)
            self.peak = int(value.item())

    timer = Timer()
    stamp_role_steps(module, lambda role: timer.stamps.append((role, sync(), len(recorder.calls))))
    with tempfile.TemporaryDirectory() as root:
        trainer = L.Trainer(
            accelerator="gpu" if cuda else "cpu", devices=int(os.environ.get("LOCAL_WORLD_SIZE", 1)), num_nodes=1,
            strategy=make_strategy(spec.strategy, cuda), precision="bf16-mixed", max_epochs=-1, logger=False,
            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
            num_sanity_val_steps=0, callbacks=[timer], default_root_dir=root,
        )
        prompts = GroupedPrompts(spec.batch, group_size(spec.method, spec.batch))
        data = DataLoader(prompts, batch_size=spec.batch, collate_fn=prompt_batch)
        trainer.fit(module, data)
    if trainer.global_rank != 0:
        return None
    if len(iterations) != spec.warmup + spec.iterations:
        raise RuntimeError(f"trained {len(iterations)} iterations, expected {spec.warmup + spec.iterations}")
    return {**asdict(spec), "world_size": trainer.world_size, "peak_bytes": timer.peak,
            "device": torch.cuda.get_device_name(device) if cuda else "cpu",
            "iterations": iterations[spec.warmup:]}


# ---- pipeline folders ---------------------------------------------------------------------------------------
def write_transformer_config(folder: Path, cls_name: str, config: dict) -> None:
    """``folder/transformer/config.json``: the transformer the benchmark builds with random weights (no weight
    files: the backbone's ``load_denoiser`` is :func:`random_denoiser`), and its entry in ``model_index.json``."""
    import diffusers

    transformer = folder / "transformer"
    if transformer.exists():
        shutil.rmtree(transformer)
    transformer.mkdir()
    (transformer / "config.json").write_text(json.dumps(
        {"_class_name": cls_name, "_diffusers_version": diffusers.__version__, **config}, indent=2))
    index_file = folder / "model_index.json"
    index = json.loads(index_file.read_text())
    index["transformer"] = ["diffusers", cls_name]
    index_file.write_text(json.dumps(index, indent=2))


def narrow_vae(cls, latent_channels: int, **kwargs):
    """A random VAE of ``cls`` with four levels of :data:`VAE_CHANNELS` channels (scale factor 8, as the real
    ones) and no mid-block attention: the latent shapes of the real VAE at a negligible cost."""
    import torch

    torch.manual_seed(1)
    return cls(
        in_channels=3, out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(VAE_CHANNELS,) * 4, layers_per_block=1, latent_channels=latent_channels,
        norm_num_groups=VAE_CHANNELS, mid_block_add_attention=False, **kwargs,
    ).eval()


def narrow_qwen3(tokenizer, width: int):
    """A 27-layer ``Qwen3ForCausalLM`` of hidden size ``width`` (klein's layers 9, 18 and 27 stacked are 3 × width
    channels) with one 16-channel head and an MLP of 16: the real text width at a few million parameters."""
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    config = Qwen3Config(
        vocab_size=len(tokenizer), hidden_size=width, intermediate_size=16, num_hidden_layers=27,
        num_attention_heads=1, num_key_value_heads=1, head_dim=16, max_position_embeddings=1024,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(6)
    return Qwen3ForCausalLM(config).eval()


def write_pipeline(family: str, tiny: bool, folder: Path) -> Path:
    """The pipeline folder a family's runs train: under ``tiny`` the tests' tiny pipeline (tests/tiny_models.py,
    tests/tiny_flux2.py), else narrow text encoders and VAE of the real widths and the published transformer config."""
    if tiny:
        if family == "sd35":
            from tiny_models import make_tiny_sd3

            return make_tiny_sd3(folder, sd35="medium")
        from tiny_flux2 import make_tiny_flux2_klein

        return make_tiny_flux2_klein(folder)
    if family == "sd35":
        from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

        from tiny_models import tiny_clip_text_encoder, tiny_clip_tokenizer

        tokenizer = tiny_clip_tokenizer()
        StableDiffusion3Pipeline(
            transformer=None, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
            vae=narrow_vae(AutoencoderKL, 16, scaling_factor=1.5305, shift_factor=0.0609),
            text_encoder=tiny_clip_text_encoder(tokenizer, hidden=16, projection=SD3_CLIP_PROJECTIONS[0], seed=2),
            text_encoder_2=tiny_clip_text_encoder(tokenizer, hidden=16, projection=SD3_CLIP_PROJECTIONS[1], seed=3),
            text_encoder_3=None, tokenizer=tokenizer, tokenizer_2=tokenizer, tokenizer_3=None,
        ).save_pretrained(folder)
        write_transformer_config(folder, "SD3Transformer2DModel", SD35_MEDIUM)
        return folder
    from diffusers import AutoencoderKLFlux2, Flux2KleinPipeline

    from tiny_flux2 import flux2_scheduler
    from tiny_z_image import tiny_qwen2_tokenizer

    tokenizer = tiny_qwen2_tokenizer()
    Flux2KleinPipeline(
        scheduler=flux2_scheduler(), vae=narrow_vae(AutoencoderKLFlux2, FLUX2_KLEIN_4B["in_channels"] // 4),
        text_encoder=narrow_qwen3(tokenizer, QWEN3_4B_WIDTH), tokenizer=tokenizer, transformer=None,
        is_distilled=False,
    ).save_pretrained(folder)
    write_transformer_config(folder, "Flux2Transformer2DModel", FLUX2_KLEIN_4B)
    return folder


# ---- the grid ---------------------------------------------------------------------------------------------
def worker_command(spec: Spec, result: Path, processes: int) -> list[str]:
    """The command of one run: ``torchrun`` with one process per GPU, or one plain process."""
    worker = [str(Path(__file__).resolve()), "--one", json.dumps(asdict(spec)), "--result", str(result)]
    if processes > 1:
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}", *worker]
    return [sys.executable, *worker]


def last_error_line(stderr: str) -> str:
    """The last line of a failed run's stderr that names an error (an exception, CUDA out of memory)."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    named = [line for line in lines if re.search(r"Error|error:|out of memory", line)]
    return (named or lines or ["no output"])[-1][:160]


def cuda_device_name() -> str:
    """The name of GPU 0, asked in a child process so that this one never holds a CUDA context on it."""
    command = [sys.executable, "-c", "import torch; print(torch.cuda.get_device_name(0))"]
    return subprocess.run(command, check=True, capture_output=True, text=True).stdout.strip()


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """The command line, checked (a SystemExit names a bad value), with the mode's default strategies and size."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--families", nargs="+", default=list(FAMILIES), choices=FAMILIES)
    parser.add_argument("--layouts", nargs="+", default=["full", "shared_lora"], choices=LAYOUTS)
    parser.add_argument("--strategies", nargs="+", choices=STRATEGIES,
                        help="default: all three; --tiny: ddp and fsdp2 (DeepSpeed needs CUDA)")
    parser.add_argument("--resolution", nargs="+", type=int, help="image side in pixels (default 512; --tiny: 16)")
    parser.add_argument("--batch", nargs="+", type=int, default=[8], help="samples per GPU")
    parser.add_argument("--iterations", type=int, default=5, help="timed iterations (after the warm-up)")
    parser.add_argument("--warmup", type=int, default=2, help="iterations before timing")
    parser.add_argument("--peak-tflops", type=float, help="bf16 dense peak of one device, for a GPU not in the table")
    parser.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=True,
                        help="recompute both roles' activations in backward, as the configs do")
    parser.add_argument("--json", type=Path, help="also write the rows (and every timed iteration) here")
    parser.add_argument("--tiny", action="store_true", help="tiny random pipelines on CPU (the CI check of this script)")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    for name in ("iterations", "batch"):
        values = getattr(args, name)
        if min(values if isinstance(values, list) else [values]) < 1:
            raise SystemExit(f"--{name} must be >= 1, got {values}")
    if args.warmup < 0:
        raise SystemExit(f"--warmup must be >= 0, got {args.warmup}")
    if args.tiny and args.strategies is not None and "zero2" in args.strategies:
        raise SystemExit("--tiny runs on CPU, where DeepSpeed (zero2) does not: use --strategies ddp fsdp2")
    args.strategies = args.strategies or [s for s in STRATEGIES if not (args.tiny and s == "zero2")]
    args.resolution = args.resolution or [DEFAULT_RESOLUTION[args.tiny]]
    return args


def main(argv: Sequence[str] | None = None) -> list[dict]:
    """Run the grid (each run in its own processes), print the markdown table, and return its rows."""
    args = parse_args(argv)
    if args.one:
        result = run(Spec(**json.loads(args.one)))
        if result is not None:
            args.result.write_text(json.dumps(result))
        return []
    import torch
    from tqdm import tqdm

    if args.tiny:
        processes, device = 1, "cpu"
        peak = None if args.peak_tflops is None else peak_tflops(device, args.peak_tflops)
    else:
        if not torch.cuda.is_available():
            raise SystemExit("benchmarks/gpu_step.py needs a GPU (CUDA is not available here); use --tiny on CPU")
        processes, device = torch.cuda.device_count(), cuda_device_name()
        try:
            peak = peak_tflops(device, args.peak_tflops)
        except ValueError as err:
            raise SystemExit(str(err)) from err
    grid = [(m, f, lay, s, r, b) for f in args.families for m in args.methods for lay in args.layouts
            for s in args.strategies for r in args.resolution for b in args.batch]
    for method, *_, batch in grid:
        try:
            group_size(method, batch)
        except ValueError as err:
            raise SystemExit(str(err)) from err
    skipped = [g for g in grid if g[2] == "shared_lora" and g[3] == "fsdp2"]
    rows, results = [], []
    with tempfile.TemporaryDirectory() as folder:
        pipelines = {f: str(write_pipeline(f, args.tiny, Path(folder) / f)) for f in args.families}
        for method, family, layout, strategy, resolution, batch in tqdm([g for g in grid if g not in skipped],
                                                                        desc="gpu_step runs", file=sys.stderr):
            spec = Spec(method, family, layout, strategy, resolution, batch, args.iterations, args.warmup, args.tiny,
                        args.gradient_checkpointing, pipelines[family])
            result_file = Path(folder) / "result.json"
            result_file.unlink(missing_ok=True)
            done = subprocess.run(worker_command(spec, result_file, processes), capture_output=True, text=True)
            if done.returncode != 0 or not result_file.is_file():
                sys.stderr.write(done.stderr[-4000:])
                result = {**asdict(spec), "world_size": processes, "error": last_error_line(done.stderr)}
            else:
                result = json.loads(result_file.read_text())
            results.append(result)
            rows.append(summarize(result, peak))
    print(f"device: {device} × {processes}, bf16 peak: {'n/a' if peak is None else f'{peak:g} TFLOPs'}")
    print(markdown_table(rows))
    for method, family, layout, strategy, resolution, batch in skipped:
        print(f"skipped {method} {family} {layout} {strategy}: FSDP2 refuses shared_lora roles (docs/scaling.md)")
    if args.json is not None:
        args.json.write_text(json.dumps({"device": device, "processes": processes, "peak_tflops": peak, "rows": rows,
                                         "runs": results}, indent=2))
    return rows


if __name__ == "__main__":
    main()
