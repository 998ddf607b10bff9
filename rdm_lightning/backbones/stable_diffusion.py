"""Stable Diffusion 1.5 and SDXL adapters (diffusers ``UNet2DConditionModel``, VP schedule).

Also holds :class:`DiffusersBackbone`, the part shared with the SD3 adapter:
resolving the pipeline folder, the frozen VAE and its latent scaling, CLIP
tokenisation and the export to a stock diffusers pipeline folder.
"""
from __future__ import annotations

import inspect
import json
from pathlib import Path
from abc import abstractmethod
from typing import Any, Literal, Sequence

import torch
from diffusers import AutoencoderKL, DDPMScheduler, DiffusionPipeline, LCMScheduler, UNet2DConditionModel
from torch import Tensor, nn
from transformers import AutoTokenizer, CLIPTextModel, CLIPTextModelWithProjection

from rdm_lightning.backbones.base import Backbone, Conditioning, network_dtype, require_path, torch_dtype
from rdm_lightning.backbones.embedding_cache import EmbeddingCache, component_fingerprint
from rdm_lightning.core.parameterization import Prediction
from rdm_lightning.core.schedules import VPSchedule

EMPTY_PROMPT_MODES = ("empty_string", "zeros")
VP_PREDICTIONS = {"epsilon": Prediction.EPSILON, "v_prediction": Prediction.V_PREDICTION}
EXPORT_MANIFEST = "rdm_export.json"
# Pipeline components whose files decide the text embeddings (the embedding cache's fingerprint).
TEXT_COMPONENT_PREFIXES = ("text_encoder", "tokenizer", "processor")
# LCM's boundary condition mixes the input back in: x̂ = c_out·x̂0 + c_skip·x_t with
# c_skip = 0.25 / ((s·t)² + 0.25). A DMD2 student predicts x̂0 itself, so a large s
# makes (c_skip, c_out) = (0, 1) to float precision at every timestep t ≥ 1.
LCM_TIMESTEP_SCALING = 1.0e4
BOUNDARY_TOLERANCE = 1e-6


def resolve_pipeline_folder(path: str, variant: str | None, local_files_only: bool) -> Path:
    """A local diffusers pipeline folder for ``path``: the folder itself, or a hub id's snapshot.

    Raises FileNotFoundError naming ``path`` when it is neither a folder nor a
    (cached, with ``local_files_only``) hub repository.
    """
    folder = Path(path).expanduser()
    if folder.exists():
        return folder
    try:
        return Path(DiffusionPipeline.download(path, variant=variant, local_files_only=local_files_only))
    except (OSError, ValueError) as err:
        where = "the local hub cache" if local_files_only else "the hub"
        raise FileNotFoundError(
            f"diffusers pipeline folder not found at {path!r}: not a local folder, nor a hub id in {where} ({err})"
        ) from err


def freeze(module: nn.Module) -> nn.Module:
    """``module`` in eval mode with gradients off."""
    return module.requires_grad_(False).eval()


def write_export_manifest(output_dir: Path, num_steps: int, timesteps: Sequence[float], **extra: Any) -> None:
    """``rdm_export.json``: how to call the exported pipeline (the student needs no CFG)."""
    manifest = {"num_inference_steps": num_steps, "guidance_scale": 1.0, "timesteps": list(timesteps), **extra}
    (output_dir / EXPORT_MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")


def config_for(cls: type, config: dict[str, Any]) -> dict[str, Any]:
    """The entries of a (teacher's) scheduler ``config`` that ``cls`` accepts; diffusers warns on the rest."""
    accepted = inspect.signature(cls.__init__).parameters
    return {key: value for key, value in config.items() if key in accepted}


def check_levels(levels: Tensor, num_steps: int) -> Tensor:
    """``levels`` as a 1-D tensor of ``num_steps`` strictly decreasing values."""
    levels = torch.as_tensor(levels).flatten()
    if len(levels) != num_steps:
        raise ValueError(f"got {len(levels)} levels {levels.tolist()} for num_steps={num_steps}")
    if (levels[1:] >= levels[:-1]).any():
        raise ValueError(f"levels must be strictly decreasing (noisiest first), got {levels.tolist()}")
    return levels


def check_image_size(height: int, width: int, multiple: int) -> tuple[int, int]:
    """``(height, width)`` if both are positive multiples of ``multiple`` pixels (what the VAE and the
    denoiser's downsampling or patching take), else a ValueError naming the size."""
    for name, side in (("height", height), ("width", width)):
        if not isinstance(side, int) or side <= 0 or side % multiple:
            raise ValueError(
                f"{name} must be a positive multiple of {multiple} pixels for this model, got {side!r} "
                f"(image size {height}x{width})"
            )
    return height, width


def read_model_index(folder: Path) -> dict[str, Any]:
    """``folder/model_index.json``: the pipeline class the folder was saved from (``_class_name``), its
    components' classes and the pipeline's own settings (e.g. FLUX.2-klein's ``is_distilled``)."""
    index = require_path(folder / "model_index.json", "model_index.json of the diffusers pipeline folder")
    return json.loads(index.read_text())


class DiffusersBackbone(Backbone):
    """Shared base of the diffusers latent-diffusion adapters (not used on its own).

    Holds the resolved pipeline folder, the frozen VAE and the loading options.
    Subclasses load their text encoders, schedule and denoiser config.
    """

    denoiser_subfolder: str
    pipeline_classes: tuple[str, ...]
    """``model_index.json`` ``_class_name`` values of the pipelines this adapter reads."""
    vae_class: type = AutoencoderKL
    negative_prompt: str = ""
    """The prompt of CFG's unconditional branch (the pipelines' default negative prompt)."""

    @property
    def lora_file_prefix(self) -> str:
        """diffusers' LoRA files name the denoiser's modules under its component name."""
        return f"{self.denoiser_subfolder}."

    def __init__(
        self,
        path: str,
        variant: str | None,
        frozen_dtype: str,
        vae_dtype: str | None,
        local_files_only: bool,
        embedding_cache: str | None = None,
        embedding_cache_refresh: bool = False,
    ):
        super().__init__()
        self.variant = variant
        self.embedding_cache_folder = embedding_cache
        self.embedding_cache_refresh = embedding_cache_refresh
        self.embedding_cache: EmbeddingCache | None = None
        self.text_encoders_loaded = False
        self.frozen_dtype = torch_dtype(frozen_dtype)
        self.folder = resolve_pipeline_folder(path, variant, local_files_only)
        self.model_index = read_model_index(self.folder)
        found = self.model_index.get("_class_name", "")
        if found not in self.pipeline_classes:
            raise ValueError(
                f"{str(self.folder)!r} holds a {found or 'unnamed'} pipeline (model_index.json _class_name), "
                f"which {type(self).__name__} does not read; accepted: {', '.join(self.pipeline_classes)}"
            )
        self.pipeline_class = found
        self.vae = freeze(
            self.vae_class.from_pretrained(
                self.subfolder("vae"), variant=variant, torch_dtype=torch_dtype(vae_dtype or frozen_dtype)
            )
        )
        self.vae_scale_factor = self._vae_scale_factor()
        self._empty_prompt: Conditioning | None = None

    def _vae_scale_factor(self) -> int:
        """Pixels per latent cell: the VAE halves the image once per encoder block but the last."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    def image_size(self, height: int | None, width: int | None, default: int, multiple: int) -> tuple[int, int]:
        """The configured ``(height, width)`` (each defaulting to ``default`` pixels), checked against
        ``multiple``, which :meth:`set_image_size` checks later sizes against too."""
        self.image_multiple = multiple
        return check_image_size(default if height is None else height, default if width is None else width, multiple)

    def set_image_size(self, height: int, width: int) -> None:
        """Generate at ``height`` × ``width`` pixels from now on (``rdm sample --height/--width``); a
        resolution-dependent schedule (the FLUX dynamic shift) follows the new size."""
        self.height, self.width = check_image_size(height, width, self.image_multiple)
        self.schedule = self.schedule_for_image_size()

    def schedule_for_image_size(self):
        """The noise schedule at the current image size; size-independent by default."""
        return self.schedule

    @abstractmethod
    def load_text_encoders(self) -> None:
        """Load the tokenizers and (frozen) text encoders as attributes."""

    @abstractmethod
    def encode_text(self, prompts: Sequence[str]) -> Conditioning:
        """Run the text encoders on ``prompts`` as the stock pipeline's ``encode_prompt`` does."""

    def text_settings(self) -> dict[str, Any]:
        """The adapter's settings that change what :meth:`encode_text` returns (e.g. the maximum
        sequence length); part of the embedding cache's fingerprint."""
        return {}

    def text_fingerprint(self) -> dict[str, Any]:
        """What the embeddings depend on: adapter, pipeline, dtype, settings, and the files of every
        text encoder and tokenizer component (``docs/embedding_cache.md``)."""
        components = sorted(
            p.name for p in self.folder.iterdir() if p.is_dir() and p.name.startswith(TEXT_COMPONENT_PREFIXES)
        )
        return {
            "backbone": type(self).__name__,
            "pipeline": self.pipeline_class,
            "frozen_dtype": str(self.frozen_dtype).removeprefix("torch."),
            "settings": self.text_settings(),
            "components": {name: component_fingerprint(self.folder / name) for name in components},
        }

    def prepare_text_encoders(self) -> None:
        """Called at the end of an adapter's ``__init__``: without an embedding cache the text encoders
        load now; with one they load only if a prompt is missing from it."""
        if self.embedding_cache_folder is None:
            self.ensure_text_encoders()
            return
        self.embedding_cache = EmbeddingCache(
            self.embedding_cache_folder, self.text_fingerprint(), refresh=self.embedding_cache_refresh
        )

    def ensure_text_encoders(self) -> None:
        """Load the text encoders (once), on the device of the rest of the adapter."""
        if self.text_encoders_loaded:
            return
        before = set(dict(self.named_children()))
        self.load_text_encoders()
        for name, child in self.named_children():
            if name not in before:
                child.to(self.vae.device)
        self.text_encoders_loaded = True

    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str]) -> Conditioning:
        """Text conditioning for ``prompts``: from the embedding cache, encoding (and adding) the
        prompts it does not hold; without a cache, :meth:`encode_text`."""
        if self.embedding_cache is None:
            self.ensure_text_encoders()
            return self.encode_text(prompts)
        missing = self.embedding_cache.missing(prompts)
        if missing:
            self.ensure_text_encoders()
            self.embedding_cache.add(missing, self.encode_text(missing))
        cond = self.embedding_cache.get(prompts)
        return Conditioning({k: v.to(self.vae.device) for k, v in cond.tensors.items()})

    def fill_embedding_cache(self, prompts: Sequence[str], batch_size: int, progress=None) -> int:
        """Encode the prompts the embedding cache lacks (and the unconditional :attr:`negative_prompt`),
        ``batch_size`` at a time; returns how many were encoded. ``progress(n)`` follows each batch."""
        if self.embedding_cache is None:
            raise ValueError(f"{type(self).__name__} has no embedding_cache folder to fill: set embedding_cache")

        def encode(chunk: Sequence[str]) -> Conditioning:
            self.ensure_text_encoders()
            return self.encode_text(chunk)

        return self.embedding_cache.fill([self.negative_prompt, *prompts], encode, batch_size, progress)

    def flush_embedding_cache(self) -> None:
        """Write the embeddings encoded since the last flush to the cache folder."""
        if self.embedding_cache is not None:
            self.embedding_cache.flush()

    def subfolder(self, name: str) -> Path:
        """``folder/name``, or a FileNotFoundError naming that path."""
        return require_path(self.folder / name, f"the {name}/ component of the diffusers pipeline")

    def has_subfolder(self, name: str) -> bool:
        """Whether the pipeline folder has the (optional) component ``name``."""
        return (self.folder / name).is_dir()

    def load_tokenizer(self, name: str):
        """The tokenizer saved in ``folder/name``."""
        return AutoTokenizer.from_pretrained(self.subfolder(name))

    def load_text_encoder(self, cls: type, name: str) -> nn.Module:
        """A frozen transformers text encoder of class ``cls`` in the frozen dtype."""
        encoder = cls.from_pretrained(self.subfolder(name), variant=self.variant, dtype=self.frozen_dtype)
        return freeze(encoder)

    def train(self, mode: bool = True) -> "DiffusersBackbone":
        # Everything the adapter owns is frozen: keep it in eval mode whatever the trainer asks.
        return super().train(False)

    def token_ids(self, tokenizer, prompts: Sequence[str], max_length: int, device: torch.device) -> Tensor:
        """Token ids padded/truncated to ``max_length``, as the diffusers pipelines tokenise."""
        ids = tokenizer(
            list(prompts), padding="max_length", max_length=max_length, truncation=True, return_tensors="pt"
        ).input_ids
        return ids.to(device)

    def empty_prompt_conditioning(self, n: int) -> Conditioning:
        """The unconditional prompt :attr:`negative_prompt`, encoded once per run, repeated ``n`` times."""
        if self._empty_prompt is None:
            self._empty_prompt = self.encode_prompts([self.negative_prompt])
        device = self.vae.device
        return Conditioning({k: v.to(device).expand(n, *v.shape[1:]) for k, v in self._empty_prompt.tensors.items()})

    def empty_conditioning(self, n: int) -> Conditioning:
        """The CFG unconditional branch: the empty prompt."""
        return self.empty_prompt_conditioning(n)

    def _latent_scaling(self) -> tuple[float, float]:
        shift = getattr(self.vae.config, "shift_factor", None)
        return self.vae.config.scaling_factor, 0.0 if shift is None else shift

    def decode(self, latents: Tensor) -> Tensor:
        """Latents ``(z − shift)·scale`` to images in ``[0, 1]`` (float32); differentiable."""
        scale, shift = self._latent_scaling()
        z = latents / scale + shift
        images = self.vae.decode(z.to(self.vae.dtype)).sample
        return (images.float() / 2 + 0.5).clamp(0, 1)

    @torch.no_grad()
    def encode_images(self, images: Tensor) -> Tensor:
        """Images in ``[0, 1]`` to latents ``(mode(z) − shift)·scale`` (float32)."""
        scale, shift = self._latent_scaling()
        z = self.vae.encode((2 * images - 1).to(self.vae.dtype)).latent_dist.mode()
        return (z.float() - shift) * scale

    def export_pipeline(
        self,
        network: nn.Module,
        network_cls: type,
        scheduler: Any,
        output_dir: str | Path,
        manifest: dict[str, Any],
        **load_kwargs: Any,
    ) -> Path:
        """Save this pipeline with ``network`` as the denoiser and ``scheduler``, plus the manifest."""
        if not isinstance(network, network_cls):
            raise TypeError(
                f"export needs a {network_cls.__name__} (merge any LoRA adapters and unwrap it first), "
                f"got {type(network).__name__}"
            )
        output_dir = Path(output_dir)
        pipe = DiffusionPipeline.from_pretrained(
            self.folder,
            variant=self.variant,
            local_files_only=True,
            scheduler=scheduler,
            **{self.denoiser_subfolder: network},
            **load_kwargs,
        )
        pipe.save_pretrained(output_dir)
        write_export_manifest(output_dir, **manifest)
        return output_dir


def unet_bottleneck(
    unet: UNet2DConditionModel,
    sample: Tensor,
    timestep: Tensor,
    encoder_hidden_states: Tensor,
    added_cond_kwargs: dict[str, Tensor] | None = None,
) -> Tensor:
    """Mid-block output of ``unet``: its forward pass (SD/SDXL path) stopped before the up blocks."""
    emb = unet.time_embedding(unet.get_time_embed(sample=sample, timestep=timestep), None)
    aug_emb = unet.get_aug_embed(
        emb=emb, encoder_hidden_states=encoder_hidden_states, added_cond_kwargs=added_cond_kwargs or {}
    )
    if aug_emb is not None:
        emb = emb + aug_emb
    if unet.time_embed_act is not None:
        emb = unet.time_embed_act(emb)
    hidden = unet.conv_in(sample)
    for block in unet.down_blocks:
        if getattr(block, "has_cross_attention", False):
            hidden, _ = block(hidden_states=hidden, temb=emb, encoder_hidden_states=encoder_hidden_states)
        else:
            hidden, _ = block(hidden_states=hidden, temb=emb)
    if getattr(unet.mid_block, "has_cross_attention", False):
        return unet.mid_block(hidden, emb, encoder_hidden_states=encoder_hidden_states)
    return unet.mid_block(hidden, emb)


def lcm_scheduler_for(scheduler_config: dict[str, Any], levels: Tensor, schedule: VPSchedule) -> LCMScheduler:
    """An LCMScheduler whose ``set_timesteps(len(levels))`` gives exactly ``levels``.

    With ``original_inference_steps = N`` LCM's timesteps are ``(N−i)·k − 1`` for
    ``k = num_train_timesteps // N``; DMD2's [999, 749, 499, 249] is k = 250. Any
    ``k`` is reached by setting ``num_train_timesteps = N·k`` and passing the
    teacher's betas explicitly (so ᾱ is unchanged), e.g. a 1-step student at 399
    gets ``num_train_timesteps = 400``. Other level sets raise a ValueError.
    """
    num_steps = len(levels)
    wanted = [int(t) for t in levels]
    k = wanted[-1] + 1
    reachable = [(num_steps - i) * k - 1 for i in range(num_steps)]
    if wanted != reachable or reachable[0] >= schedule.num_train_timesteps:
        raise ValueError(
            f"LCMScheduler with num_inference_steps={num_steps} only produces timesteps (N−i)·k−1 below "
            f"{schedule.num_train_timesteps} (e.g. {reachable} for k={k}); got {wanted}"
        )
    overrides: dict[str, Any] = dict(
        original_inference_steps=num_steps, timestep_scaling=LCM_TIMESTEP_SCALING, num_train_timesteps=num_steps * k
    )
    if num_steps * k != schedule.num_train_timesteps:
        teacher = DDPMScheduler.from_config(scheduler_config)
        # The betas are final (any zero-SNR rescale already applied): LCM must not rescale again.
        overrides.update(trained_betas=teacher.betas.tolist(), rescale_betas_zero_snr=False)
    scheduler = LCMScheduler.from_config(config_for(LCMScheduler, scheduler_config), **overrides)
    _check_lcm_scheduler(scheduler, wanted, schedule)
    return scheduler


def _check_lcm_scheduler(scheduler: LCMScheduler, levels: list[int], schedule: VPSchedule) -> None:
    scheduler.set_timesteps(len(levels))
    got = scheduler.timesteps.tolist()
    if got != levels:
        raise ValueError(f"exported LCMScheduler gives timesteps {got}, not the student's {levels}")
    index = torch.tensor(levels)
    if not torch.allclose(scheduler.alphas_cumprod[index].double(), schedule.alphas_cumprod[index], atol=1e-7):
        raise ValueError("exported LCMScheduler's alphas_cumprod differ from the teacher's at the student's timesteps")
    for t in levels:
        c_skip, c_out = scheduler.get_scalings_for_boundary_condition_discrete(torch.tensor(t))
        if abs(float(c_skip)) > BOUNDARY_TOLERANCE or abs(float(c_out) - 1) > BOUNDARY_TOLERANCE:
            raise ValueError(f"LCM boundary condition at t={t} is c_skip={c_skip}, c_out={c_out}, not (0, 1)")


class StableDiffusionBackbone(DiffusersBackbone):
    """SD1.5- and SDXL-style pipelines: ``UNet2DConditionModel`` on a VP/DDPM schedule.

    Args:
        path: diffusers pipeline folder (unet/, vae/, text_encoder/, tokenizer/,
            scheduler/, plus text_encoder_2/ and tokenizer_2/ for SDXL) or a hub id.
        height, width: image size in pixels, each a multiple of the VAE scale factor times the
            UNet's downsampling; default: the UNet's ``sample_size`` times the VAE scale factor
            (512 for SD1.5, 1024 for SDXL).
        variant: weight-file variant to load (e.g. ``"fp16"``); ``None`` for the default files.
        frozen_dtype: dtype of the frozen text encoders (and of the VAE unless
            ``vae_dtype`` is given): ``"float32"``, ``"float16"`` or ``"bfloat16"``.
        vae_dtype: dtype of the VAE; ``None`` means ``frozen_dtype``.
        empty_prompt_mode: unconditional branch for CFG: ``"empty_string"`` (the
            encoded prompt ``""``, SD1.5) or ``"zeros"`` (all-zero text and pooled
            embeddings, SDXL); default: ``"zeros"`` when there is a second text
            encoder, else ``"empty_string"``.
        local_files_only: never download; a hub id must already be in the cache.
        embedding_cache: folder of cached prompt embeddings (``docs/embedding_cache.md``); prompts
            missing from it are encoded and added, and with every prompt in it the text encoders
            never load. ``None``: encode every batch.
        embedding_cache_refresh: re-encode into ``embedding_cache`` when other text encoders or
            settings wrote it, instead of raising.

    SDXL is detected by the presence of text_encoder_2/; its UNet gets the pooled
    embedding of text_encoder_2 and ``time_ids = (h, w, 0, 0, h, w)`` of the image size.
    """

    denoiser_subfolder = "unet"
    pipeline_classes = ("StableDiffusionPipeline", "StableDiffusionXLPipeline")
    # Self- and cross-attention projections of the UNet's transformer blocks.
    lora_target_modules = ("to_q", "to_k", "to_v", "to_out.0")

    def __init__(
        self,
        path: str,
        height: int | None = None,
        width: int | None = None,
        variant: str | None = None,
        frozen_dtype: str = "float32",
        vae_dtype: str | None = None,
        empty_prompt_mode: Literal["empty_string", "zeros"] | None = None,
        local_files_only: bool = True,
        embedding_cache: str | None = None,
        embedding_cache_refresh: bool = False,
    ):
        super().__init__(
            path, variant, frozen_dtype, vae_dtype, local_files_only, embedding_cache, embedding_cache_refresh
        )
        self.scheduler_config = dict(DDPMScheduler.load_config(self.subfolder("scheduler")))
        scheduler = DDPMScheduler.from_config(self.scheduler_config)
        self.schedule = VPSchedule(scheduler.alphas_cumprod)
        self.prediction = self._prediction(scheduler.config.prediction_type)
        self.unet_config = dict(UNet2DConditionModel.load_config(self.subfolder("unet")))

        self.is_sdxl = self.pipeline_class == "StableDiffusionXLPipeline"

        mode = empty_prompt_mode or ("zeros" if self.is_sdxl else "empty_string")
        if mode not in EMPTY_PROMPT_MODES:
            raise ValueError(f"unknown empty_prompt_mode {mode!r}; accepted: {EMPTY_PROMPT_MODES}")
        self.empty_prompt_mode = mode

        # The UNet halves the latent once per down block but the last.
        self.unet_downsampling = 2 ** (len(self.unet_config["block_out_channels"]) - 1)
        self.height, self.width = self.image_size(
            height, width, self.unet_config["sample_size"] * self.vae_scale_factor,
            self.vae_scale_factor * self.unet_downsampling,
        )
        self.prepare_text_encoders()

    def shard_units(self, network: nn.Module) -> list[nn.Module]:
        """The UNet's down, mid and up blocks, and the time (and SDXL's added-conditions) embedding and
        ``conv_in``, which :meth:`features` (:func:`unet_bottleneck`) calls outside the UNet's forward."""
        extra = [network.add_embedding] if getattr(network, "add_embedding", None) is not None else []
        return [network.time_embedding, *extra, network.conv_in, *network.down_blocks, network.mid_block, *network.up_blocks]

    def load_text_encoders(self) -> None:
        """CLIP-L (SD1.5), plus OpenCLIP-G with its projection (SDXL)."""
        self.tokenizer = self.load_tokenizer("tokenizer")
        self.text_encoder = self.load_text_encoder(CLIPTextModel, "text_encoder")
        if self.is_sdxl:
            self.tokenizer_2 = self.load_tokenizer("tokenizer_2")
            self.text_encoder_2 = self.load_text_encoder(CLIPTextModelWithProjection, "text_encoder_2")

    @staticmethod
    def _prediction(prediction_type: str) -> Prediction:
        if prediction_type not in VP_PREDICTIONS:
            raise ValueError(
                f"unsupported scheduler prediction_type {prediction_type!r}; accepted: {tuple(VP_PREDICTIONS)}"
            )
        return VP_PREDICTIONS[prediction_type]

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        return self.unet_config["in_channels"], self.height // self.vae_scale_factor, self.width // self.vae_scale_factor

    def load_denoiser(self) -> UNet2DConditionModel:
        """A fresh float32 UNet from ``path/unet`` (a new copy on every call)."""
        return UNet2DConditionModel.from_pretrained(
            self.subfolder("unet"), variant=self.variant, torch_dtype=torch.float32
        )

    def encode_text(self, prompts: Sequence[str]) -> Conditioning:
        """``prompt_embeds`` (+ ``pooled_prompt_embeds`` for SDXL), as the diffusers pipelines encode.

        SD1.5: the final CLIP hidden state. SDXL: the penultimate hidden states of
        both encoders concatenated on channels; pooled: text_encoder_2's projection.
        """
        if not self.is_sdxl:
            ids = self.token_ids(self.tokenizer, prompts, self.tokenizer.model_max_length, self.text_encoder.device)
            return Conditioning({"prompt_embeds": self.text_encoder(ids)[0]})
        hidden = []
        for tokenizer, encoder in ((self.tokenizer, self.text_encoder), (self.tokenizer_2, self.text_encoder_2)):
            ids = self.token_ids(tokenizer, prompts, tokenizer.model_max_length, encoder.device)
            output = encoder(ids, output_hidden_states=True)
            hidden.append(output.hidden_states[-2])
        # ``output`` is text_encoder_2's: its first field is the projected pooled embedding.
        return Conditioning({"prompt_embeds": torch.cat(hidden, dim=-1), "pooled_prompt_embeds": output[0]})

    def empty_conditioning(self, n: int) -> Conditioning:
        """The CFG unconditional branch per ``empty_prompt_mode``."""
        empty = self.empty_prompt_conditioning(n)
        if self.empty_prompt_mode == "zeros":
            return Conditioning({k: torch.zeros_like(v) for k, v in empty.tensors.items()})
        return empty

    def _time_ids(self, x_t: Tensor, dtype: torch.dtype) -> Tensor:
        # SDXL micro-conditioning of the pipelines' defaults: original size = target size = image size, no crop.
        h, w = (side * self.vae_scale_factor for side in x_t.shape[-2:])
        return torch.tensor([h, w, 0, 0, h, w], dtype=dtype, device=x_t.device).expand(len(x_t), 6)

    def _unet_inputs(self, network: nn.Module, x_t: Tensor, level: Tensor, cond: Conditioning) -> dict[str, Any]:
        dtype = network_dtype(network)
        inputs: dict[str, Any] = dict(
            sample=x_t.to(dtype),
            timestep=self.schedule.model_timestep(level).to(x_t.device),
            encoder_hidden_states=cond.tensors["prompt_embeds"].to(dtype),
        )
        if self.is_sdxl:
            inputs["added_cond_kwargs"] = {
                "text_embeds": cond.tensors["pooled_prompt_embeds"].to(dtype),
                "time_ids": self._time_ids(x_t, dtype),
            }
        return inputs

    def network_output(self, network: nn.Module, x_t: Tensor, level: Tensor, cond: Conditioning) -> Tensor:
        """The UNet's ε or v prediction at ``x_t`` (integer timestep = level)."""
        return network(**self._unet_inputs(network, x_t, level, cond), return_dict=False)[0]

    def features(self, network: nn.Module, x_t: Tensor, level: Tensor, cond: Conditioning) -> Tensor:
        """UNet mid-block output (DMD2's GAN-head input)."""
        return unet_bottleneck(network, **self._unet_inputs(network, x_t, level, cond))

    @property
    def feature_shape(self) -> tuple[int, int, int]:
        channels, height, width = self.latent_shape
        down = self.unet_downsampling
        return self.unet_config["block_out_channels"][-1], height // down, width // down

    def export(self, network: nn.Module, output_dir: str | Path, num_steps: int, levels: Tensor) -> Path:
        """Save a stock diffusers pipeline: the student UNet and an LCMScheduler at ``levels``.

        ``pipe(prompt, num_inference_steps=num_steps, guidance_scale=1.0)`` then runs
        the student's few-step sampler (x̂0, re-noised to the next level with fresh noise).
        """
        levels = check_levels(levels, num_steps)
        scheduler = lcm_scheduler_for(self.scheduler_config, levels, self.schedule)
        timesteps = scheduler.timesteps.tolist()
        return self.export_pipeline(
            network, UNet2DConditionModel, scheduler, output_dir, dict(num_steps=num_steps, timesteps=timesteps)
        )
