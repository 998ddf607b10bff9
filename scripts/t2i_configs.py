#!/usr/bin/env python
"""Write the text-to-image method configs, ``configs/<family>/<method>.yaml``, from two tables.

``FAMILIES`` holds what is true of a model family (its adapter, hub id, size, guidance, resolution)
and which published run each method takes its model-specific numbers from; ``METHODS`` holds what
is true of a method on every family (its class, the switches the references fix, its budgets'
shape). ``config(family, method)`` combines them, so the 59 files cannot drift apart: edit the
tables here, then

    python scripts/t2i_configs.py            # (re)write every config, and the matrix in docs/configs.md
    python scripts/t2i_configs.py --check    # exit 1 listing every stale, missing or unknown file
    python scripts/t2i_configs.py --list     # family/method of every generated config

The published numbers come from the authors' code as the method pages record them
(docs/methods/*.md; the RTDMD, GNDM and GDMD ones are tabled in docs/configs.md, "Published
settings"). Where a family has no published value the nearest published model's is used, and
the config's header says which: below ~8B parameters SD3-Medium's DMDR row, from ~8B SD3.5-Large's;
for RTDMD the same family first (FLUX.2), otherwise the published model nearest in size.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
DOCS = REPO / "docs" / "configs.md"
MATRIX_BEGIN = "<!-- matrix:begin (scripts/t2i_configs.py writes this table) -->"
MATRIX_END = "<!-- matrix:end -->"

EVAL_PROMPTS_FILE = "prompts.txt"  # T2IEvaluation scores the first EVAL_SAMPLES training prompts, fixed noise
EVAL_SAMPLES = 64
SAMPLE_PROMPTS = ["a photo of a cat", "an astronaut riding a horse", "a bowl of ramen, studio lighting"]

# ---- rewards (docs/rewards.md) -----------------------------------------------------------------------------
# Local paths, relative to the working directory and named as the hub repos that publish the files.
CLIP_L = "openai/clip-vit-large-patch14"
PICKSCORE = "yuvalkirstain/PickScore_v1"
PICKSCORE_TRAIN_SCALE = round(1 / 26, 7)  # RTDMD trains PickScore / 26 (docs/configs.md, "Published settings")
HPS_V21 = "xswu/HPSv2/HPS_v2.1_compressed.pt"
DFN_CLIP = "apple/DFN5B-CLIP-ViT-H-14/open_clip_pytorch_model.bin"
OPEN_CLIP_BPE = "open_clip/bpe_simple_vocab_16e6.txt.gz"
IMAGE_REWARD = "THUDM/ImageReward"
BERT_TOKENIZER = "google-bert/bert-base-uncased"
DMDR_HPS_PREFIX = "Realistic photo"  # DMDR scores HPSv2.1 against "Realistic photo <prompt>" (docs/methods/dmdr.md)


def reward(alias: str, **init_args) -> dict:
    return {"class_path": alias, "init_args": init_args}


def dmdr_rewards() -> list[dict]:
    """DMDR's two ReFL rewards as its training code scores them: DFN5B-CLIP and HPSv2.1 on the prompt
    prefixed with "Realistic photo", both on images squashed to 224 × 224."""
    return [reward("dfn_clip", checkpoint_path=DFN_CLIP, bpe_path=OPEN_CLIP_BPE, name="clip"),
            reward("hpsv2", checkpoint_path=HPS_V21, bpe_path=OPEN_CLIP_BPE, prompt_prefix=DMDR_HPS_PREFIX,
                   resize_mode="squash", name="hps")]


def rtdmd_rewards() -> list[dict]:
    """RTDMD's differentiable training rewards (its backprop R = clip + pickscore/26 + hps; GenEval, the
    fourth advantage reward, runs out of process and is not in the library)."""
    return [reward("clip_score", model_path=CLIP_L, name="clip"),
            reward("pickscore", model_path=PICKSCORE, train_scale=PICKSCORE_TRAIN_SCALE, name="pickscore"),
            reward("hpsv2", checkpoint_path=HPS_V21, bpe_path=OPEN_CLIP_BPE, name="hps")]


def gold_rewards() -> list[dict]:
    """ImageReward, logged beside the optimized rewards and never optimized: a BLIP scorer that shares no
    network with them, so that reward hacking shows as the optimized rewards rising while it falls."""
    return [reward("image_reward", checkpoint_path=f"{IMAGE_REWARD}/ImageReward.pt",
                   med_config_path=f"{IMAGE_REWARD}/med_config.json", tokenizer_path=BERT_TOKENIZER,
                   name="image_reward")]


# ---- published runs (docs/methods/dmd.md, docs/methods/dmdr.md; docs/configs.md "Published settings") --
# DMD2 (docs/methods/dmd.md, "Published settings the text-to-image configs follow").
DMD2_SD15 = dict(levels=[999], num_steps=1, cfg=1.75, ttur=10, lr=(1e-5, 1e-5), warmup=500, grad_clip=10.0,
                 weight_decay=(0.01, 0.01), batch=32, updates=4000, source="DMD2's SD1.5 stage 1: 1 step at t = 999, "
                 "CFG 1.75, TTUR 10, lr 1e-5, batch 32/GPU (64 GPUs), bf16, grad clip 10, 500-update warm-up, no EMA; "
                 "39k iterations ≈ 4000 generator updates")
DMD2_SDXL = dict(levels=[999, 749, 499, 249], num_steps=4, cfg=8.0, ttur=5, lr=(5e-7, 5e-7), warmup=500,
                 grad_clip=10.0, weight_decay=(0.01, 0.01), batch=2, updates=3800, source="DMD2's SDXL 4-step: levels "
                 "[999, 749, 499, 249] with backward simulation, CFG 8, TTUR 5, lr 5e-7, batch 2/GPU (64 GPUs), bf16, "
                 "VAE float32; 19k iterations = 3800 generator updates")
# DMDR (docs/methods/dmdr.md, "Published settings the text-to-image configs follow"): 8-bit AdamW, weight decay
# 0.01 / 0 (generator / fake score), grad clip 1, TTUR 5, DeepSpeed ZeRO-2. The library keeps one lr per role:
# the cold-start lr is used throughout (the published run lowers it when the reward term switches on).
DMDR_SD3M = dict(num_steps=4, cfg=7.0, lr=(1e-6, 5e-7), rl_lr=(5e-7, 2e-7), cold=2000, total=4000, batch=8,
                 weights=0.3, resolution=512, dynamics=True,
                 source="DMDR's SD3-M run: 4 steps, 512 px, bf16, batch 8/GPU (cold) → 4 (RL) on 24 GPUs, lr "
                 "1e-6 / 5e-7 (cold) → 5e-7 / 2e-7 (RL), CFG 7, 2000 → 4000 generator updates, ReFL weights CLIP 0.3 / HPS 0.3")
DMDR_SD35L = dict(num_steps=4, cfg=4.0, lr=(1e-6, 2e-8), rl_lr=(1e-7, 5e-9), cold=2000, total=3000, batch=4,
                  weights=0.1, resolution=1024, dynamics=True,
                  source="DMDR's SD3.5-L run: 4 steps, 1024 px, bf16, batch 4/GPU (cold) → 2 (RL) on 24 GPUs, lr "
                  "1e-6 / 2e-8 (cold) → 1e-7 / 5e-9 (RL), CFG 4, 2000 → 3000 generator updates, ReFL weights 0.1 / 0.1")
DMDR_SDXL = dict(levels=[399], num_steps=1, cfg=7.0, lr=(1e-7, 1e-7), rl_lr=(5e-8, 5e-8), cold=3000, total=4000,
                 batch=8, weights=0.3, resolution=1024, dynamics=False,
                 source="DMDR's SDXL run: 1 step at t = 399, 1024 px, fp16 with a tiny VAE, batch 8/GPU (cold) → 4 (RL) "
                 "on 24 GPUs, lr 1e-7 (cold) → 5e-8 (RL) for both roles, CFG 7, 3000 → 4000 generator updates, "
                 "weights 0.3 / 0.3, DynaDG off (its generator starts from an ODE-regression checkpoint)")
# RTDMD (docs/methods/rtdmd.md; numbers: docs/configs.md, "Published settings"). Stage 1: AdamW β (0.9, 0.999),
# weight decay 0, clip 1, constant lr, TTUR 10, batch 9/GPU, EMA 0.99 per iteration, 1500 generator updates.
# Stage 2 columns: K images per prompt, per-GPU batch, GPUs (one RL epoch = 16 batches), fake-score lr, consistency.
RTDMD_SD3M = dict(cfg=7.0, lr=3e-5, resolution=1024, K=16, gpu_batch=2, gpus=16, fake_lr=3e-5, consistency=True,
                  name="SD3-M")
RTDMD_SD35M = dict(cfg=4.5, lr=3e-5, resolution=512, K=24, gpu_batch=9, gpus=8, fake_lr=3e-5, consistency=True,
                   name="SD3.5-M")
RTDMD_FLUX2_4B = dict(cfg=4.0, lr=1e-6, resolution=512, K=24, gpu_batch=6, gpus=16, fake_lr=1e-6, consistency=True,
                      name="FLUX.2-klein-4B")
RTDMD_FLUX2_9B = dict(cfg=4.0, lr=1e-6, resolution=512, K=24, gpu_batch=3, gpus=32, fake_lr=1e-6, consistency=False,
                      name="FLUX.2-klein-9B")
RTDMD_FLUX1 = dict(cfg=3.5, lr=3e-5, resolution=512, K=24, gpu_batch=3, gpus=32, fake_lr=1e-6, consistency=False,
                   name="FLUX.1-dev")
RTDMD_BATCHES_PER_EPOCH = 16

# ---- the families ----------------------------------------------------------------------------------------
# layout: "full" copies below ~8B parameters, "shared_lora" adapters on the teacher's weights from ~8B.
FAMILIES: dict[str, dict] = {
    "sd15": dict(
        title="Stable Diffusion 1.5", params=0.9, flow=False, layout="full",
        backbone="rdm_lightning.backbones.StableDiffusionBackbone", path="runwayml/stable-diffusion-v1-5",
        local="/models/stable-diffusion-v1-5", resolution=512, teacher=dict(num_steps=50, guidance_scale=7.5),
        teacher_note="Teacher sampler: 50 DDIM steps at the SD1.5 pipeline's CFG 7.5 (a baseline for `rdm sample "
                     "--role teacher`; not a published distillation setting)",
        dmd=DMD2_SD15,
        substrate=dict(DMDR_SDXL, levels=[999], cfg=1.75, lr=(1e-5, 1e-5), rl_lr=None, batch=32, resolution=512,
                       source=None),
        substrate_note="DMDR published no SD1.5 run: the student (1 step at t = 999), CFG 1.75, lr 1e-5 and batch "
                       "32/GPU are DMD2's SD1.5 run's (docs/methods/dmd.md); the method's settings (TTUR 5, weight "
                       "decay 0.01 / 0, grad clip 1, 3000 → 4000 generator updates, weights 0.3 / 0.3, no "
                       "DynaDG/DynaRS) are DMDR's SDXL run's, the nearest DMDR model (ε-prediction UNet)",
    ),
    "sdxl": dict(
        title="SDXL", params=2.6, flow=False, layout="full", vae_dtype="float32",
        backbone="rdm_lightning.backbones.StableDiffusionBackbone", path="stabilityai/stable-diffusion-xl-base-1.0",
        local="/models/stable-diffusion-xl-base-1.0", resolution=1024, teacher=dict(num_steps=50, guidance_scale=8.0),
        teacher_note="Teacher sampler: 50 DDIM steps at DMD2's CFG 8",
        dmd=DMD2_SDXL,
        substrate=DMDR_SDXL,
        substrate_note="DMDR's SDXL generator starts from DMD2's 1-step LPIPS-regression checkpoint (docs/methods/dmd.md, "
                       "SDXL 1-step warm start): give it as roles.generator.init; from the teacher, lr 1e-7 moves slowly",
    ),
    "sd3": dict(
        title="SD3-Medium", params=2.0, flow=True, layout="full",
        backbone="rdm_lightning.backbones.SD3Backbone", path="stabilityai/stable-diffusion-3-medium-diffusers",
        local="/models/stable-diffusion-3-medium-diffusers", resolution=512,
        teacher=dict(num_steps=50, guidance_scale=7.0),
        teacher_note="Teacher sampler: 50 Euler steps at CFG 7 (RTDMD's SD3-M teacher baseline: 100 NFE with CFG)",
        levels_note="σ = [1, 0.9, 0.75, 0.5] (shift 3 of [1, 0.75, 0.5, 0.25], from the scheduler)",
        substrate=DMDR_SD3M, substrate_note=None,
        rtdmd=RTDMD_SD3M, rtdmd_note=None,
    ),
    "sd35": dict(
        title="SD3.5-Medium", params=2.5, flow=True, layout="full",
        backbone="rdm_lightning.backbones.SD3Backbone", path="stabilityai/stable-diffusion-3.5-medium",
        local="/models/stable-diffusion-3.5-medium", resolution=512,
        teacher=dict(num_steps=50, guidance_scale=4.5),
        teacher_note="Teacher sampler: 50 Euler steps at CFG 4.5 (RTDMD's SD3.5-M teacher CFG)",
        levels_note="σ = [1, 0.9, 0.75, 0.5] (shift 3, from the scheduler)",
        substrate=dict(DMDR_SD3M, cfg=4.5),
        substrate_note="DMDR published no SD3.5-M run: SD3-M's run (the same shift and about its size) with RTDMD's "
                       "SD3.5-M teacher CFG 4.5",
        rtdmd=RTDMD_SD35M, rtdmd_note=None,
        switch_to_large=True,
    ),
    "flux1": dict(
        title="FLUX.1-dev", params=12.0, flow=True, layout="shared_lora", guidance_embedding=True,
        student_guidance=1.0,
        backbone="rdm_lightning.backbones.flux.FluxBackbone", path="black-forest-labs/FLUX.1-dev",
        local="/models/FLUX.1-dev", resolution=512,
        teacher=dict(num_steps=50, guidance_scale=3.5),
        teacher_note="Teacher sampler: 50 Euler steps at embedded guidance 3.5",
        levels_note="σ: FLUX.1-dev's dynamic shift at this resolution, from the scheduler",
        substrate=dict(DMDR_SD35L, cfg=3.5, resolution=512),
        substrate_note="DMDR published no FLUX run: SD3.5-L's run (the largest DMDR model) with RTDMD's FLUX.1-dev "
                       "teacher guidance 3.5 (through the guidance embedding) and its 512 px",
        rtdmd=RTDMD_FLUX1, rtdmd_note=None,
    ),
    "flux2": dict(
        title="FLUX.2-dev", params=32.0, flow=True, layout="shared_lora", guidance_embedding=True,
        student_guidance=1.0,
        backbone="rdm_lightning.backbones.flux2.Flux2Backbone", path="black-forest-labs/FLUX.2-dev",
        local="/models/FLUX.2-dev", resolution=512,
        teacher=dict(num_steps=50, guidance_scale=4.0),
        teacher_note="Teacher sampler: 50 Euler steps at embedded guidance 4.0 (RTDMD's FLUX.2 baselines run 50 steps)",
        levels_note="σ: FLUX.2's exponential dynamic shift at this resolution, from the scheduler",
        substrate=dict(DMDR_SD35L, cfg=4.0, resolution=512),
        substrate_note="DMDR published no FLUX.2 run: SD3.5-L's run (the largest DMDR model) with RTDMD's FLUX.2 "
                       "teacher guidance 4.0 (here through FLUX.2-dev's guidance embedding) and its 512 px",
        rtdmd=RTDMD_FLUX2_9B,
        rtdmd_note="RTDMD published FLUX.2-klein (4B, 9B), not FLUX.2-dev: the FLUX.2 stage-1 values (CFG 4.0, lr 1e-6) "
                   "and the 9B stage-2 column, the largest FLUX.2; the student and fake score run at embedded "
                   "guidance 1 as RTDMD's FLUX.1-dev does",
    ),
    "flux2_klein": dict(
        title="FLUX.2-klein-4B", params=4.0, flow=True, layout="full",
        backbone="rdm_lightning.backbones.flux2.Flux2KleinBackbone", path="black-forest-labs/FLUX.2-klein-base-4B",
        local="/models/FLUX.2-klein-base-4B", resolution=512,
        generator_init="/models/FLUX.2-klein-4B/transformer",
        teacher=dict(num_steps=50, guidance_scale=4.0),
        teacher_note="Teacher sampler: 50 Euler steps at true CFG 4.0 (RTDMD's FLUX.2 4B baseline: 50 NFE)",
        levels_note="σ ≈ [1, 0.943, 0.846, 0.646] at 512 px (FLUX.2's exponential shift at the pipelines' "
                    "empirical μ ≈ 1.70 for 50 steps)",
        substrate=dict(DMDR_SD3M, cfg=4.0),
        substrate_note="DMDR published no FLUX.2 run: SD3-M's run (the DMDR model nearest in size) with RTDMD's "
                       "FLUX.2 CFG 4.0; the generator starts from the distilled klein, as in RTDMD",
        rtdmd=RTDMD_FLUX2_4B, rtdmd_note=None,
    ),
    "qwen_image": dict(
        title="Qwen-Image", params=20.0, flow=True, layout="shared_lora",
        backbone="rdm_lightning.backbones.qwen_image.QwenImageBackbone", path="Qwen/Qwen-Image",
        local="/models/Qwen-Image", resolution=512,
        teacher=dict(num_steps=50, guidance_scale=4.0),
        teacher_note="Teacher sampler: 50 Euler steps at true CFG 4.0",
        levels_note="σ: Qwen-Image's dynamic shift at this resolution, from the scheduler",
        substrate=dict(DMDR_SD35L, cfg=4.0, resolution=512),
        substrate_note="No method published Qwen-Image: DMDR's SD3.5-L run (the largest DMDR model); CFG 4.0 is "
                       "RTDMD's FLUX.2 value (also the Qwen-Image pipeline's true_cfg_scale default); 512 px as RTDMD",
        rtdmd=dict(RTDMD_FLUX1, cfg=4.0),
        rtdmd_note="RTDMD published no Qwen-Image run: FLUX.1-dev's (the RTDMD model nearest in size, 12B, LoRA "
                   "roles) with CFG 4.0 (RTDMD's FLUX.2 value)",
    ),
    "z_image": dict(
        title="Z-Image", params=6.0, flow=True, layout="full",
        backbone="rdm_lightning.backbones.z_image.ZImageBackbone", path="Tongyi-MAI/Z-Image",
        local="/models/Z-Image", resolution=512,
        teacher=dict(num_steps=50, guidance_scale=4.0),
        teacher_note="Teacher sampler: 50 Euler steps at CFG 4.0 (RTDMD's Z-Image 6B baseline: 50 NFE)",
        levels_note="σ: Z-Image's scheduler shift, from the scheduler",
        substrate=dict(DMDR_SD3M, cfg=4.0),
        substrate_note="No method published Z-Image: DMDR's SD3-M run (full copies below ~8B); CFG 4.0 is RTDMD's "
                       "FLUX.2 value (the Z-Image pipeline's default guidance 5 is CFG 6 in this library's convention)",
        rtdmd=dict(RTDMD_FLUX2_4B),
        rtdmd_note="RTDMD published no Z-Image run (only its 50-step baseline): FLUX.2-klein-4B's (the RTDMD model "
                   "nearest in size, full copies)",
    ),
}
FLOW_FAMILIES = [name for name, fam in FAMILIES.items() if fam["flow"]]

# ---- the methods -----------------------------------------------------------------------------------------
METHODS: dict[str, dict] = {
    "dmd": dict(cls="rdm_lightning.methods.DMD", title="DMD2", doc="docs/methods/dmd.md", rewards=False),
    "dmdr": dict(cls="rdm_lightning.methods.DMDR", title="DMDR", doc="docs/methods/dmdr.md", rewards=True,
                 reward_hinge=0.7, guidance_jitter=0.5, dynadg_scale=0.5, norm_eps=1e-8, ttur=5),
    "gndm": dict(cls="rdm_lightning.methods.GNDM", title="GNDM", doc="docs/methods/gndm.md", rewards=False,
                 group_size=4, guidance_jitter=0.5, dynadg_scale=0.5, norm_eps=1e-8, ttur=5),
    "gndmr": dict(cls="rdm_lightning.methods.GNDM", title="GNDMR", doc="docs/methods/gndm.md", rewards=True,
                  group_size=4, guidance_jitter=0.5, dynadg_scale=0.5, norm_eps=1e-8, ttur=5, lambda_max=0.3,
                  lambda_ramp_updates=500),
    "gdmd": dict(cls="rdm_lightning.methods.GDMD", title="GDMD", doc="docs/methods/gdmd.md", rewards=True,
                 group_size=8, guidance_jitter=0.5, norm_eps=1e-8, ttur=5, omega=1.0),
    "rtdmd_stage1": dict(cls="rdm_lightning.methods.ACDMD", title="RTDMD stage 1 (AC-DMD)", doc="docs/methods/rtdmd.md",
                         rewards=False, flow_only=True, ttur=10, eta=0.9, consistency_weight=0.01, updates=1500,
                         gpu_batch=9, ema=round(0.99 ** 10, 4)),
    "rtdmd_stage2": dict(cls="rdm_lightning.methods.RTDMD", title="RTDMD stage 2 (RL, SubGRPO)",
                         doc="docs/methods/rtdmd.md", rewards=True, flow_only=True, eta=0.9, consistency_weight=0.01,
                         updates=1000, lr=3e-6, weight_decay=1e-4),
}
SUBSTRATE_METHODS = ("dmdr", "gndm", "gndmr", "gdmd")
GROUP_METHODS = ("gndm", "gndmr", "gdmd", "rtdmd_stage2")
# LoRA rank / alpha of the shared_lora layouts (docs/methods/dmdr.md: generator rank 64 α 128, critic rank 32
# α 32; docs/methods/rtdmd.md: rank 32 α 64 for both roles, both stages).
DMDR_LORA = {"generator": (64, 128), "fake_score": (32, 32)}
RTDMD_LORA = {"generator": (32, 64), "fake_score": (32, 64)}


def methods_of(family: str) -> list[str]:
    return [m for m, meta in METHODS.items() if FAMILIES[family]["flow"] or not meta.get("flow_only")]


def matrix() -> list[tuple[str, str]]:
    return [(family, method) for family in FAMILIES for method in methods_of(family)]


# ---- building one config ---------------------------------------------------------------------------------
def optimizer(lr: float, weight_decay: float, grad_clip: float, warmup: int = 0) -> dict:
    config = {"lr": lr, "weight_decay": weight_decay, "grad_clip": grad_clip}
    if warmup:
        config["warmup_updates"] = warmup
    return config


def lora_layout(method: str) -> dict[str, tuple[int, int]]:
    return RTDMD_LORA if method.startswith("rtdmd") else DMDR_LORA


def roles(family: str, method: str) -> dict:
    fam = FAMILIES[family]
    result = {}
    for role in ("generator", "fake_score"):
        config: dict = {}
        if fam["layout"] == "shared_lora":
            rank, alpha = lora_layout(method)[role]
            config.update(layout="shared_lora", rank=rank, alpha=alpha)
        if role == "generator" and fam.get("generator_init") and method != "rtdmd_stage2":
            config["init"] = fam["generator_init"]
        config["gradient_checkpointing"] = True
        result[role] = config
    return result


def resolution(family: str, method: str) -> int:
    fam = FAMILIES[family]
    if method.startswith("rtdmd"):
        return fam["rtdmd"]["resolution"]
    if method == "dmd" and "dmd" in fam:
        return fam["resolution"]
    return fam["substrate"]["resolution"]


def backbone(family: str, method: str) -> dict:
    fam = FAMILIES[family]
    size = resolution(family, method)
    args: dict = {"path": fam["path"], "height": size, "width": size, "frozen_dtype": "bfloat16"}
    if fam.get("vae_dtype"):
        args["vae_dtype"] = fam["vae_dtype"]
    if fam.get("guidance_embedding"):
        args["guidance"] = fam["student_guidance"]
    return {"class_path": fam["backbone"], "init_args": args}


def student(levels: list | None, num_steps: int) -> dict:
    return {"num_steps": num_steps, **({"levels": levels} if levels is not None else {})}


def teacher_sampling(family: str, cfg: float) -> dict:
    steps = FAMILIES[family]["teacher"]["num_steps"]
    guidance = FAMILIES[family]["teacher"]["guidance_scale"]
    return {"num_steps": steps, "guidance_scale": guidance if guidance is not None else cfg, "step_rule": "ode"}


def dmd_recipe(family: str) -> dict:
    """Plain DMD: DMD2's published run on SD1.5/SDXL, else the DMDR cold start without the reward term."""
    fam = FAMILIES[family]
    if "dmd" in fam:
        return fam["dmd"]
    sub = fam["substrate"]
    return dict(num_steps=sub["num_steps"], levels=sub.get("levels"), cfg=sub["cfg"], ttur=5, lr=sub["lr"],
                weight_decay=(0.01, 0.0), grad_clip=1.0, warmup=0, batch=sub["batch"], updates=sub["cold"],
                norm_eps=1e-8)


def dmdr_block(family: str, method: str, weights: dict | None) -> dict:
    """DMDR's schedules (``dmdr:`` of DMDR and GNDM): cold start, DynaRS, CFG jitter, DynaDG, hinge, weights."""
    sub, meta = FAMILIES[family]["substrate"], METHODS[method]
    shared_critic = FAMILIES[family]["layout"] == "shared_lora"
    k = sub["cold"] if sub["dynamics"] else 0
    block: dict = {"cold_start_updates": sub["cold"], "dynamic_renoise_updates": k,
                   "guidance_jitter": meta["guidance_jitter"]}
    if "reward_hinge" in meta:
        block["reward_hinge"] = meta["reward_hinge"]
    if weights is not None:
        block["reward_weights"] = weights
    if shared_critic and sub["dynamics"]:
        block.update(dynadg_scale=meta["dynadg_scale"], dynadg_updates=sub["cold"])
    return block


def model(family: str, method: str) -> dict:
    fam, meta = FAMILIES[family], METHODS[method]
    args: dict = {"backbone": backbone(family, method)}
    if method == "dmd":
        recipe = dmd_recipe(family)
        args.update(teacher_dtype="bfloat16", max_generator_updates=recipe["updates"])
        dmd = {"guidance_scale": recipe["cfg"], "generator_update_ratio": recipe["ttur"]}
        if recipe.get("norm_eps"):
            dmd["norm_eps"] = recipe["norm_eps"]
        args["dmd"] = dmd
        wd_g, wd_f = recipe["weight_decay"]
        args["generator_optimizer"] = optimizer(recipe["lr"][0], wd_g, recipe["grad_clip"], recipe["warmup"])
        args["fake_score_optimizer"] = optimizer(recipe["lr"][1], wd_f, recipe["grad_clip"], recipe["warmup"])
        args["roles"] = roles(family, method)
        args["student"] = student(recipe.get("levels"), recipe["num_steps"])
        args["teacher_sampling"] = teacher_sampling(family, recipe["cfg"])
        return args
    if method in SUBSTRATE_METHODS:
        sub = fam["substrate"]
        if meta["rewards"]:
            args["rewards"] = dmdr_rewards()
            args["gold_rewards"] = gold_rewards()
        args.update(teacher_dtype="bfloat16", max_generator_updates=sub["total"])
        if method == "dmdr":
            args["dmdr"] = dmdr_block(family, method, {"clip": sub["weights"], "hps": sub["weights"]})
        elif method in ("gndm", "gndmr"):
            gndm = {"group_size": meta["group_size"], "normalizer": "group_mean", "group_level": True,
                    "adv_weighting": "none"}
            weights = None
            if method == "gndmr":
                gndm.update(reward_combination="auto", lambda_ramp_updates=meta["lambda_ramp_updates"])
                weights = {"clip": meta["lambda_max"], "hps": meta["lambda_max"]}
            args["gndm"] = gndm
            args["dmdr"] = dmdr_block(family, method, weights)
        else:  # gdmd
            args["gdmd"] = {
                "group_size": meta["group_size"], "eta": 1.0, "weighting": "softmax", "temperature": 1.0, "w_max": 3.0,
                "reward_signal": "target", "cold_start_updates": sub["cold"],
                "dynamic_renoise_updates": sub["cold"] if sub["dynamics"] else 0,
                "guidance_jitter": meta["guidance_jitter"],
                "reward_weights": {"clip": meta["omega"], "hps": meta["omega"]}, "b2_weight": 0.0,
            }
        args["dmd"] = {"guidance_scale": sub["cfg"], "generator_update_ratio": meta["ttur"], "norm_eps": meta["norm_eps"]}
        args["generator_optimizer"] = optimizer(sub["lr"][0], 0.01, 1.0)
        args["fake_score_optimizer"] = optimizer(sub["lr"][1], 0.0, 1.0)
        args["roles"] = roles(family, method)
        args["student"] = student(sub.get("levels"), sub["num_steps"])
        args["teacher_sampling"] = teacher_sampling(family, sub["cfg"])
        return args
    rt = fam["rtdmd"]
    acdmd = {"eta": meta["eta"], "consistency_weight": meta["consistency_weight"]}
    if method == "rtdmd_stage1":
        args.update(teacher_dtype="bfloat16", max_generator_updates=meta["updates"])
        args["acdmd"] = {**acdmd, "consistency_max_delta": 200, "renoise_clamp": [20.0, 980.0], "adsm_weight_cap": 10.0}
        args["dmd"] = {"guidance_scale": rt["cfg"], "generator_update_ratio": meta["ttur"]}
        args["generator_optimizer"] = optimizer(rt["lr"], 0.0, 1.0)
        args["fake_score_optimizer"] = optimizer(rt["lr"], 0.0, 1.0)
    else:
        args["stage1_checkpoint"] = f"runs/{family}/rtdmd_stage1/version_0/checkpoints/last.ckpt"
        args["rewards"] = rtdmd_rewards()
        args["gold_rewards"] = gold_rewards()
        args.update(teacher_dtype="bfloat16", max_generator_updates=meta["updates"])
        args["rtdmd"] = {"group_size": rt["K"], "num_selected_steps": 2, "clip_range": 1e-5, "advantage_clip": 5.0,
                         "reward_weights": {"clip": 1.0, "pickscore": 1.0, "hps": 1.0}, "acdmd_weight": 1e-3,
                         "backprop_weight": 1e-4, "backprop_hinge": 3.0}
        args["acdmd"] = {**acdmd, "consistency_weight": meta["consistency_weight"] if rt["consistency"] else 0.0}
        args["dmd"] = {"guidance_scale": rt["cfg"]}
        args["generator_optimizer"] = optimizer(meta["lr"], meta["weight_decay"], 1.0)
        args["fake_score_optimizer"] = optimizer(rt["fake_lr"], 0.0, 1.0)
    args["roles"] = roles(family, method)
    args["student"] = {"num_steps": 4}
    args["teacher_sampling"] = teacher_sampling(family, rt["cfg"])
    return args


def batch_size(family: str, method: str) -> int:
    fam, meta = FAMILIES[family], METHODS[method]
    if method == "dmd":
        return dmd_recipe(family)["batch"]
    if method == "rtdmd_stage1":
        return meta["gpu_batch"]
    if method == "rtdmd_stage2":
        return fam["rtdmd"]["gpu_batch"] * RTDMD_BATCHES_PER_EPOCH
    return max(fam["substrate"]["batch"], meta.get("group_size", 1))


def group_size(family: str, method: str) -> int:
    if method == "rtdmd_stage2":
        return FAMILIES[family]["rtdmd"]["K"]
    return METHODS[method].get("group_size", 1)


def trainer(family: str, method: str) -> dict:
    interval = 50 if method == "rtdmd_stage2" else 250
    callbacks = []
    if method == "rtdmd_stage1":
        callbacks.append({"class_path": "rdm_lightning.callbacks.GeneratorEMA",
                          "init_args": {"decay": METHODS[method]["ema"]}})
    elif method == "rtdmd_stage2":
        callbacks.append({"class_path": "rdm_lightning.callbacks.GeneratorEMA",
                          "init_args": {"decay": 0.9, "every_n_updates": 8, "warmup": True}})
    callbacks.append({"class_path": "rdm_lightning.callbacks.SampleGrid", "init_args": {
        "prompts": SAMPLE_PROMPTS, "num_per_prompt": 4, "every_n_updates": interval, "scale": 1}})
    if METHODS[method]["rewards"]:
        optimized = [spec["init_args"]["name"] for spec in (rtdmd_rewards() if method == "rtdmd_stage2" else dmdr_rewards())]
        gold = [f"gold/{spec['init_args']['name']}" for spec in gold_rewards()]
        callbacks.append({"class_path": "rdm_lightning.callbacks.T2IEvaluation", "init_args": {
            "prompts": EVAL_PROMPTS_FILE, "num_samples": EVAL_SAMPLES, "every_n_updates": interval, "batch_size": 8}})
        callbacks.append({"class_path": "rdm_lightning.callbacks.RewardHackingMonitor", "init_args": {
            "optimized": optimized, "gold": gold, "window": 3}})
    callbacks.append({"class_path": "rdm_lightning.callbacks.RunCheckpoint", "init_args": {"every_n_updates": interval}})
    # The library's ZeRO-2 (configs/strategy/deepspeed_zero2.yaml): per-role clipping, frozen networks out of checkpoints.
    strategy = {"class_path": "rdm_lightning.strategies.DeepSpeedZeroStrategy", "init_args": {"stage": 2}}
    config: dict = {"accelerator": "gpu", "devices": -1, "strategy": strategy, "precision": "bf16-mixed",
                    "max_epochs": -1, "limit_val_batches": 0}
    if group_size(family, method) > 1:
        config["use_distributed_sampler"] = False  # GroupBatchSampler gives every rank its own whole groups
    config["logger"] = {"class_path": "rdm_lightning.loggers.RunCSVLogger",
                        "init_args": {"save_dir": f"runs/{family}", "name": method}}
    config["callbacks"] = callbacks
    return config


def data(family: str, method: str) -> dict:
    args: dict = {"train_file": "prompts.txt", "batch_size": batch_size(family, method)}
    if group_size(family, method) > 1:
        args["group_size"] = group_size(family, method)
    return {"class_path": "rdm_lightning.data.PromptDataModule", "init_args": args}


def config(family: str, method: str) -> dict:
    return {"seed_everything": 0, "trainer": trainer(family, method),
            "model": {"class_path": METHODS[method]["cls"], "init_args": model(family, method)},
            "data": data(family, method)}


# ---- the header ------------------------------------------------------------------------------------------
def fmt(value: float) -> str:
    """``value`` as the method pages write it: 3.5, 0.01, 1e-6."""
    text = f"{value:g}"
    if "e" in text:
        mantissa, exponent = text.split("e")
        text = f"{mantissa}e{int(exponent)}"
    return text


def layout_text(family: str, method: str) -> str:
    fam = FAMILIES[family]
    if fam["layout"] == "full":
        text = (f"full copies: the generator and the fake score are trainable copies of the {fam['params']:g}B "
                "denoiser (below ~8B parameters), with gradient checkpointing")
        if fam.get("generator_init") and method != "rtdmd_stage2":
            text += (f"; the generator starts from the distilled FLUX.2-klein-4B transformer (roles.generator.init: "
                     f"{fam['generator_init']}, a diffusers model folder), the teacher and fake score from "
                     "klein-base, as RTDMD does")
        elif fam.get("generator_init"):
            text += "; the generator and fake score start from stage 1's (whose generator started from the distilled klein)"
        return text
    (g_rank, g_alpha), (f_rank, f_alpha) = lora_layout(method)["generator"], lora_layout(method)["fake_score"]
    source = "RTDMD's, both roles" if method.startswith("rtdmd") else "DMDR's generator and LoRA critic"
    text = (f"shared_lora for both roles ({fam['params']:g}B, from ~8B up): one copy of the denoiser's weights, the "
            f"generator a LoRA rank {g_rank} α {g_alpha} and the fake score a LoRA rank {f_rank} α {f_alpha} on it "
            f"({source}), on the backbone's LoRA target modules, with gradient checkpointing")
    if method == "rtdmd_stage2":
        text += "; stage 2 continues stage 1's shared_lora adapters (the reference merges them and trains fresh ones)"
    return text


def published_lines(family: str, method: str) -> list[str]:
    fam = FAMILIES[family]
    lines = []
    if method == "dmd":
        if "dmd" in fam:
            lines.append(fam["dmd"]["source"] + " (docs/methods/dmd.md).")
        else:
            sub = fam["substrate"]
            lines.append(f"DMD2 on DMDR's cold start without the reward term (docs/methods/dmd.md, docs/methods/dmdr.md): "
                         f"CFG {fmt(sub['cfg'])}, TTUR 5, ε_n 1e-8, lr {fmt(sub['lr'][0])} / {fmt(sub['lr'][1])}, "
                         f"weight decay 0.01 / 0, grad clip 1, batch {sub['batch']}/GPU, {sub['cold']} generator updates "
                         f"(the cold start), {sub['num_steps']} steps.")
            if sub.get("source"):
                lines.append("From " + sub["source"] + ".")
    elif method in SUBSTRATE_METHODS:
        sub = fam["substrate"]
        if sub.get("source"):
            lines.append(sub["source"] + " (docs/methods/dmdr.md).")
        if method == "dmdr":
            dynars = ", DynaRS over the cold start" if sub["dynamics"] else ""
            lines.append(f"DMDR: ReFL hinge 0.7 on each reward after the cold start, CFG jitter ±0.5{dynars}, ε_n 1e-8, "
                         "TTUR 5, grad clip 1, weight decay 0.01 / 0 (docs/methods/dmdr.md).")
        elif method in ("gndm", "gndmr"):
            lines.append("GNDM on DMDR's substrate (docs/methods/gndm.md, library formulation): K = 4, A1 group-mean "
                         "normaliser with one DM level per group, no advantage weighting, no importance sampling.")
            if method == "gndmr":
                lines.append("GNDMR: W2 scale-matched reward gradients for the differentiable rewards, λ^max 0.3 each, "
                             "W3 cosine ramp over 500 generator updates after N0 = the cold start (docs/methods/gndm.md).")
        else:
            lines.append("GDMD B1 (docs/methods/gdmd.md, library formulation): K = 8, η 1, softmax weights (T 1, w_max 3) "
                         "of the group advantages of R(decode(x − g)), ω 1 per reward, B2 off, cold start as DMDR's.")
        if not sub["dynamics"]:
            lines.append("DynaDG and DynaRS are off, as in DMDR's SDXL run (K_rs = K_dg = 0).")
        if "levels" in sub and family in ("sd15", "sdxl"):
            lines.append(f"Student: 1 step at t = {sub['levels'][0]}.")
    else:
        rt = fam["rtdmd"]
        lines.append(f"RTDMD (docs/methods/rtdmd.md; numbers: docs/configs.md, \"Published settings\"), the {rt['name']} "
                     f"column: teacher CFG {fmt(rt['cfg'])}, {rt['resolution']} px, 4 CPS steps at η 0.9, "
                     f"{fam['levels_note']}.")
        if method == "rtdmd_stage1":
            lines.append(f"Stage 1: TTUR 10, AdamW lr {fmt(rt['lr'])} for both roles, weight decay 0, grad clip 1, no "
                         f"warm-up, batch 9/GPU, consistency γ 0.01 (Δ ≤ 200), t_r clamped to [20, 980], ADSM cap 10, "
                         f"1500 generator updates (stage 2 starts from checkpoint-15000); EMA 0.99 per iteration = "
                         f"{METHODS[method]['ema']} per generator update (GeneratorEMA steps once per update).")
        else:
            prompts = rt["gpus"] * rt["gpu_batch"] * RTDMD_BATCHES_PER_EPOCH // rt["K"]
            lines.append(f"Stage 2: K = {rt['K']} images per prompt; one RL iteration is the reference's epoch of "
                         f"{RTDMD_BATCHES_PER_EPOCH} batches of {rt['gpu_batch']} per GPU on {rt['gpus']} GPUs "
                         f"({prompts} prompts), here one K-repeated batch of {batch_size(family, method)} per GPU "
                         "(lower it, a multiple of K, if it does not fit); SubGRPO on 2 of the steps {0, 1, 2}, PPO "
                         "clip 1e-5, advantages clipped ±5, AC-DMD auxiliary 1e-3, reward backprop "
                         "1e-4·mean(ReLU(3 − R)) with R = clip + pickscore/26.")
            lines.append(f"Generator AdamW lr 3e-6, weight decay 1e-4, clip 1; fake score lr {fmt(rt['fake_lr'])} "
                         f"(weight decay 0, stage 1's), consistency {'on' if rt['consistency'] else 'off'}; EMA "
                         "min((1+n)/(10+n), 0.9) every 8 updates; 1000 RL iterations (the reference's inference "
                         "checkpoint). Run configs/" + family + "/rtdmd_stage1.yaml first: stage1_checkpoint names its "
                         "last.ckpt.")
    return lines


def nearest_lines(family: str, method: str) -> list[str]:
    fam = FAMILIES[family]
    notes = []
    if method.startswith("rtdmd"):
        if fam.get("rtdmd_note"):
            notes.append(fam["rtdmd_note"] + ".")
    elif method == "dmd" and "dmd" in fam:
        pass
    elif fam.get("substrate_note"):
        notes.append(fam["substrate_note"] + ".")
    if fam.get("guidance_embedding") and not method.startswith("rtdmd"):
        notes.append("The student and fake score run at embedded guidance 1 (backbone guidance), as RTDMD's FLUX.1-dev "
                     "(docs/methods/rtdmd.md: the fake velocity at guidance 1).")
    if METHODS[method]["rewards"] and method in SUBSTRATE_METHODS and fam["substrate"].get("rl_lr"):
        g, f = fam["substrate"]["rl_lr"]
        notes.append(f"One lr per role: the cold-start lr throughout (the published run drops to {fmt(g)} / {fmt(f)} "
                     "when the reward term starts).")
    if method in SUBSTRATE_METHODS and fam["layout"] == "full" and fam["substrate"]["dynamics"] and method != "gdmd":
        notes.append("DynaDG needs the LoRA-on-teacher critic, so it is off with this full-copy fake score; for the "
                     "paper's critic set roles.fake_score {layout: shared_lora, rank: 32, alpha: 32} and dmdr "
                     "{dynadg_scale: 0.5, dynadg_updates: " + str(fam["substrate"]["cold"]) + "}.")
    if method == "gdmd" and fam["layout"] == "shared_lora":
        notes.append("GDMD exposes no DynaDG: its LoRA critic runs at DMDR's fake scale 2.0 without the annealed real score.")
    if method in ("gndm", "gndmr", "gdmd"):
        notes.append(f"Batch {batch_size(family, method)}/GPU of K-repeated prompts (group_size {group_size(family, method)}"
                     "; data.group_size must equal it).")
    return notes


def reward_lines(method: str) -> list[str]:
    if not METHODS[method]["rewards"]:
        return []
    if method == "rtdmd_stage2":
        optimized = ("RTDMD's rewards (docs/rewards.md): the CLIP score of " + CLIP_L + " (\"clip\"), PickScore v1 "
                     "(\"pickscore\", train_scale 1/26) and HPSv2.1 (\"hps\"), each an advantage with weight 1 and "
                     "together the backprop R = clip + pickscore/26 + hps; GenEval, its fourth advantage reward, is not "
                     "in the library.")
    else:
        optimized = ("DMDR's rewards (docs/rewards.md): DFN5B-CLIP (\"clip\") and HPSv2.1 (\"hps\") against \""
                     + DMDR_HPS_PREFIX + " <prompt>\", both on images squashed to 224 px as DMDR's training scores them.")
    specs = (rtdmd_rewards() if method == "rtdmd_stage2" else dmdr_rewards()) + gold_rewards()
    paths = list(dict.fromkeys(value for spec in specs for key, value in spec["init_args"].items()
                               if key.endswith("_path")))
    notes = {OPEN_CLIP_BPE: " (open_clip's BPE vocabulary; an open_clip_torch installed with --no-deps ships it)",
             PICKSCORE: " (with the tokenizer of laion/CLIP-ViT-H-14-laion2B-s32B-b79K copied in)"}
    return [
        optimized + " Gold reward, logged and never optimized: ImageReward v1.0. Reward files are local paths, here "
        "relative to the working directory under the names of the hub repos that publish them (docs/rewards.md): "
        + ", ".join(path + notes.get(path, "") for path in paths) + ".",
        f"T2IEvaluation scores every reward on fixed noise for the first {EVAL_SAMPLES} prompts of {EVAL_PROMPTS_FILE} at "
        "each sample-grid interval (eval/<reward>/mean, metrics.json; add extractor and fid_sd for FID-SD, "
        "docs/evaluation.md), and RewardHackingMonitor warns when an optimized reward rises while ImageReward falls "
        "over 3 evaluations (stop: true ends the run instead).",
    ]


def wrap(text: str, width: int = 116, indent: str = "# ") -> list[str]:
    words, lines, line = text.split(), [], ""
    for word in words:
        if line and len(indent) + len(line) + 1 + len(word) > width:
            lines.append(indent + line)
            line = word
        else:
            line = f"{line} {word}" if line else word
    if line:
        lines.append(indent + line)
    return lines


def header(family: str, method: str) -> str:
    fam, meta = FAMILIES[family], METHODS[method]
    lines = wrap(f"{meta['title']} on {fam['title']} ({fam['path']}). Generated by scripts/t2i_configs.py from its "
                 "FAMILIES and METHODS tables: edit those, then run it (a test fails on a stale file).")
    for text in published_lines(family, method):
        lines += wrap(text)
    for text in nearest_lines(family, method):
        lines += wrap(text)
    lines += wrap("Role layout: " + layout_text(family, method) + ".")
    for text in reward_lines(method):
        lines += wrap(text)
    if method == "dmd" and family in ("sd15", "sdxl"):
        lines += wrap("The reference adds a GAN head (docs/methods/dmd.md): set dmd.gan_generator_weight and use a "
                      "datamodule whose batches carry \"images\". It trained with "
                      + ("DDP" if family == "sd15" else "FSDP") + "; every config here uses DeepSpeed ZeRO-2.")
    if fam.get("switch_to_large"):
        lines += wrap("SD3.5-Large (8B): path stabilityai/stable-diffusion-3.5-large (shift 5 comes with its scheduler), "
                      "height/width 1024, and roles.generator / roles.fake_score {layout: shared_lora, gradient_checkpointing: "
                      "true} with rank 64 α 128 / 32 α 32 (RTDMD: 32 α 64 both); for DMDR, GNDM and GDMD also DMDR's "
                      "SD3.5-L numbers: CFG 4, lr 1e-6 / 2e-8, cold start 2000 of 3000 updates, batch 4, ReFL weights "
                      "0.1 / 0.1, DynaDG 0.5 over 2000 (docs/methods/dmdr.md).")
    lines += wrap(fam["teacher_note"] + ".")
    lines += wrap("Local weights (the backbone loads offline; a hub id must already be in the Hugging Face cache), "
                  "prompts and cached text embeddings (docs/configs.md):")
    lines.append(f"#   rdm fit --config configs/{family}/{method}.yaml "
                 f"--model.init_args.backbone.init_args.path={fam['local']} \\")
    lines.append("#           --data.init_args.train_file=/data/prompts.txt")
    return "\n".join(lines) + "\n"


class _Dumper(yaml.SafeDumper):
    """Block style for mappings and lists of mappings, flow style for the leaves' small collections;
    list items indented under their key, as the hand-written configs have them."""

    def increase_indent(self, flow: bool = False, indentless: bool = False):
        return super().increase_indent(flow, False)


def _represent_list(dumper, data):
    flow = all(not isinstance(item, (dict, list)) for item in data)
    return dumper.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=flow)


def _represent_dict(dumper, data):
    flow = all(not isinstance(value, (dict, list)) for value in data.values()) and len(data) <= 6
    return dumper.represent_mapping("tag:yaml.org,2002:map", data.items(), flow_style=flow)


_Dumper.add_representer(list, _represent_list)
_Dumper.add_representer(dict, _represent_dict)


def render(family: str, method: str) -> str:
    body = yaml.dump(config(family, method), Dumper=_Dumper, sort_keys=False, width=116, allow_unicode=True)
    return header(family, method) + body


# ---- the matrix in docs/configs.md ------------------------------------------------------------------------
def steps_text(family: str, method: str) -> str:
    args = config(family, method)["model"]["init_args"]
    student_config = args["student"]
    if "levels" in student_config:
        return f"{student_config['num_steps']} (t = {', '.join(str(v) for v in student_config['levels'])})"
    return str(student_config["num_steps"]) + (" CPS" if method.startswith("rtdmd") else "")


def layout_cell(family: str, method: str) -> str:
    roles_config = config(family, method)["model"]["init_args"]["roles"]
    if roles_config["generator"].get("layout") != "shared_lora":
        return "full" + (" (G: klein)" if "init" in roles_config["generator"] else "")
    g, f = roles_config["generator"], roles_config["fake_score"]
    return f"shared_lora G r{g['rank']}/α{g['alpha']}, F r{f['rank']}/α{f['alpha']}"


def cfg_cell(family: str, method: str) -> str:
    args = config(family, method)["model"]["init_args"]
    value = fmt(args["dmd"]["guidance_scale"])
    return value + (" (embedded)" if FAMILIES[family].get("guidance_embedding") else "")


def matrix_table() -> str:
    header_row = "| family | method | role layout | CFG | steps | lr G / F | budget (generator updates) | batch/GPU (K) |"
    rows = [header_row, "|---|---|---|---|---|---|---|---|"]
    for family, method in matrix():
        args = config(family, method)["model"]["init_args"]
        data_args = config(family, method)["data"]["init_args"]
        lr = f"{fmt(args['generator_optimizer']['lr'])} / {fmt(args['fake_score_optimizer']['lr'])}"
        batch = str(data_args["batch_size"]) + (f" ({data_args['group_size']})" if "group_size" in data_args else "")
        rows.append(f"| {family} | [{method}](../configs/{family}/{method}.yaml) | {layout_cell(family, method)} | "
                    f"{cfg_cell(family, method)} | {steps_text(family, method)} | {lr} | "
                    f"{args['max_generator_updates']} | {batch} |")
    return "\n".join(rows) + "\n"


def docs_text(current: str) -> str | None:
    """``current`` (docs/configs.md) with its matrix block regenerated; None when the markers are missing."""
    if MATRIX_BEGIN not in current or MATRIX_END not in current:
        return None
    before, rest = current.split(MATRIX_BEGIN, 1)
    _, after = rest.split(MATRIX_END, 1)
    return before + MATRIX_BEGIN + "\n" + matrix_table() + MATRIX_END + after


# ---- entry point ---------------------------------------------------------------------------------------------
def generated() -> dict[Path, str]:
    return {CONFIGS / family / f"{method}.yaml": render(family, method) for family, method in matrix()}


def check() -> list[str]:
    """Problems with the files on disk: stale or missing configs, unknown files in the families' folders, a stale matrix."""
    problems = []
    files = generated()
    for path, text in files.items():
        if not path.is_file():
            problems.append(f"missing: {path.relative_to(REPO)}")
        elif path.read_text(encoding="utf-8") != text:
            problems.append(f"stale: {path.relative_to(REPO)}")
    for family in FAMILIES:
        for path in sorted((CONFIGS / family).glob("*.yaml")):
            if path not in files:
                problems.append(f"not generated (remove it or add it to the tables): {path.relative_to(REPO)}")
    if not DOCS.is_file():
        problems.append(f"missing: {DOCS.relative_to(REPO)}")
    else:
        current = DOCS.read_text(encoding="utf-8")
        updated = docs_text(current)
        if updated is None:
            problems.append(f"{DOCS.relative_to(REPO)} lacks the matrix markers {MATRIX_BEGIN!r} … {MATRIX_END!r}")
        elif updated != current:
            problems.append(f"stale: {DOCS.relative_to(REPO)} (the matrix table)")
    return problems


def write() -> list[Path]:
    written = []
    for path, text in generated().items():
        if not path.is_file() or path.read_text(encoding="utf-8") != text:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text, encoding="utf-8")
            written.append(path)
    if DOCS.is_file():
        current = DOCS.read_text(encoding="utf-8")
        updated = docs_text(current)
        if updated is not None and updated != current:
            DOCS.write_text(updated, encoding="utf-8")
            written.append(DOCS)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--check", action="store_true", help="exit 1 listing stale, missing or unknown files")
    group.add_argument("--list", action="store_true", help="print family/method of every generated config")
    args = parser.parse_args(argv)
    if args.list:
        for family, method in matrix():
            print(f"{family}/{method}")
        return 0
    if args.check:
        problems = check()
        for problem in problems:
            print(problem)
        if problems:
            print(f"{len(problems)} problem(s): run `python scripts/t2i_configs.py` to regenerate")
            return 1
        print(f"{len(generated())} configs up to date")
        return 0
    written = write()
    for path in written:
        print(f"wrote {path.relative_to(REPO)}")
    print(f"{len(generated())} configs, {len(written)} file(s) changed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
