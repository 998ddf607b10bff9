"""DMD iteration time and resident memory with and without the text-embedding cache (docs/embedding_cache.md).

    python benchmarks/embedding_cache.py [--models sd3_t5 flux2_klein] [--iterations 6] [--batch-size 2]

Models (random weights, diffusers folder layout, built in a temporary folder):
- ``sd3_t5``: a small SD3 pipeline (``tests/tiny_models.py``'s CLIP encoders and VAE, a 2-block
  ``SD3Transformer2DModel``) with a T5 encoder of 8 layers of width 1024 (78M parameters: a scaled-down
  T5-XXL, the encoder the cache exists to keep out of training), 256 T5 tokens;
- ``flux2_klein``: a small FLUX.2-klein pipeline (``tests/tiny_flux2.py``) with a Qwen3 text encoder of
  27 layers of width 512 (klein reads layers 9, 18 and 27; 60M parameters), 512 tokens.

Each (model, cache) pair runs in its own process at one torch thread: DMD with TTUR 1, a 1-step student,
``--iterations`` iterations on prompts that are new at every iteration (as in the first epoch over a
prompt set). With the cache, ``rdm cache-embeddings`` has been run on the prompts first, so the text
encoders never load. Reported: seconds per iteration (after the first), and the peak resident memory of
the process over building the module and training, less its memory before the backbone was built.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from torch.utils.data import IterableDataset

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO / "benchmarks"))
from memory import MB, PeakSampler, resident_bytes  # noqa: E402

MODELS = ("sd3_t5", "flux2_klein")
ENCODER_LAYERS, ENCODER_WIDTH = 8, 1024
KLEIN_ENCODER_WIDTH = 512


def make_sd3_t5(path: Path) -> Path:
    """SD3 pipeline with a 78M-parameter T5 (8 layers of width 1024) and small CLIP encoders."""
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import T5Config, T5EncoderModel

    from tiny_models import tiny_clip_text_encoder, tiny_clip_tokenizer, tiny_t5_tokenizer, tiny_vae

    tokenizer, t5_tokenizer = tiny_clip_tokenizer(), tiny_t5_tokenizer()
    torch.manual_seed(4)
    t5 = T5EncoderModel(T5Config(vocab_size=128, d_model=ENCODER_WIDTH, d_ff=2816, d_kv=64, num_layers=ENCODER_LAYERS,
                                 num_heads=16, pad_token_id=t5_tokenizer.pad_token_id,
                                 eos_token_id=t5_tokenizer.eos_token_id)).eval()
    torch.manual_seed(0)
    transformer = SD3Transformer2DModel(sample_size=16, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=32,
                                        num_attention_heads=4, caption_projection_dim=128,
                                        joint_attention_dim=ENCODER_WIDTH, pooled_projection_dim=32, out_channels=4)
    StableDiffusion3Pipeline(
        transformer=transformer.eval(), scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=tiny_vae(shift_factor=0.1, scaling_factor=1.5),
        text_encoder=tiny_clip_text_encoder(tokenizer, hidden=16, projection=16, seed=2),
        text_encoder_2=tiny_clip_text_encoder(tokenizer, hidden=16, projection=16, seed=3),
        text_encoder_3=t5, tokenizer=tokenizer, tokenizer_2=tokenizer, tokenizer_3=t5_tokenizer,
    ).save_pretrained(path)
    return path


def make_flux2_klein(path: Path) -> Path:
    """FLUX.2-klein pipeline with a Qwen3 text encoder of 27 layers of width 512."""
    from tiny_flux2 import make_tiny_flux2_klein

    return make_tiny_flux2_klein(path, text_width=KLEIN_ENCODER_WIDTH)


def backbone_class(model: str):
    if model == "sd3_t5":
        from rdm_lightning.backbones import SD3Backbone

        return SD3Backbone
    from rdm_lightning.backbones.flux2 import Flux2KleinBackbone

    return Flux2KleinBackbone


class NewPrompts(IterableDataset):
    """Batches of prompts never seen before in the run: ``prompt 0``, ``prompt 1``, ..."""

    def __init__(self, batch_size: int):
        self.batch_size = batch_size

    def __iter__(self):
        index = 0
        while True:
            yield {"prompts": [f"a photo of object number {index + i}" for i in range(self.batch_size)]}
            index += self.batch_size


def measure(model: str, cached: bool, iterations: int, batch_size: int, folder: Path) -> dict:
    """One (model, cache) pair's figures (runs in its own process)."""
    import lightning as L
    import torch
    from lightning.pytorch.callbacks import Callback
    from torch.utils.data import DataLoader

    from rdm_lightning.methods import DMD, DMDConfig, OptimizerConfig, StudentConfig

    torch.set_num_threads(1)
    pipeline = (make_sd3_t5 if model == "sd3_t5" else make_flux2_klein)(folder / model)
    cache = str(folder / "cache") if cached else None
    cls = backbone_class(model)
    if cached:  # `rdm cache-embeddings` on the prompts, in another process
        prompts = folder / "prompts.txt"
        batches = iter(NewPrompts(batch_size))
        prompts.write_text("\n".join(p for _ in range(iterations) for p in next(batches)["prompts"]) + "\n")
        config = folder / "fit.yaml"
        config.write_text(json.dumps({"model": {"init_args": {"backbone": {
            "class_path": f"{cls.__module__}.{cls.__name__}", "init_args": {"path": str(pipeline), "embedding_cache": cache}}}}}))
        subprocess.run([sys.executable, "-m", "rdm_lightning", "cache-embeddings", "--config", str(config),
                        "--prompts-file", str(prompts)], check=True, capture_output=True)
    before = resident_bytes()
    sampler = PeakSampler()
    sampler.start()
    backbone = cls(str(pipeline), embedding_cache=cache)
    module = DMD(backbone, dmd=DMDConfig(guidance_scale=1.5, generator_update_ratio=1),
                 generator_optimizer=OptimizerConfig(lr=1e-5), fake_score_optimizer=OptimizerConfig(lr=1e-5),
                 student=StudentConfig(num_steps=1), max_generator_updates=iterations)
    ends: list[float] = []

    class Clock(Callback):
        def on_train_batch_end(self, *args, **kwargs):
            ends.append(time.perf_counter())

    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, callbacks=[Clock()],
                        enable_progress_bar=False, enable_model_summary=False, max_epochs=-1)
    trainer.fit(module, train_dataloaders=DataLoader(NewPrompts(batch_size), batch_size=None))
    peak = sampler.stop()
    # TTUR 1: each training batch is one iteration with both role updates.
    seconds = (ends[-1] - ends[0]) / (len(ends) - 1)
    return {"model": model, "cache": cached, "text encoders loaded": backbone.text_encoders_loaded,
            "s/iteration": seconds, "peak MB": (peak - before) / MB, "iterations": len(ends)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--iterations", type=int, default=6)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--one", nargs=2, metavar=("MODEL", "CACHED"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        with tempfile.TemporaryDirectory() as folder:
            row = measure(args.one[0], args.one[1] == "1", args.iterations, args.batch_size, Path(folder))
        print(json.dumps(row))
        return
    rows = []
    for model in args.models:
        for cached in (False, True):
            print(f"{model} cache={cached} ...", file=sys.stderr, flush=True)
            command = [sys.executable, __file__, "--one", model, str(int(cached)), "--iterations", str(args.iterations),
                       "--batch-size", str(args.batch_size)]
            out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
            rows.append(json.loads(out.strip().splitlines()[-1]))
            print(f"  {rows[-1]}", file=sys.stderr, flush=True)
    lines = ["| model | embedding cache | text encoders loaded | s/iteration | peak MB |", "|---|---|---|---|---|"]
    for row in rows:
        lines.append(f"| {row['model']} | {'yes' if row['cache'] else 'no'} | {'yes' if row['text encoders loaded'] else 'no'} "
                     f"| {row['s/iteration']:.3f} | {row['peak MB']:.0f} |")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
