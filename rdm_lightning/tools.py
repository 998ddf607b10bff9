"""``rdm sample``, ``rdm evaluate`` and ``rdm export`` work on checkpoints and sample files; ``rdm cache-embeddings``
encodes a config's prompts once; ``rdm slurm`` submits a fit."""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import time
import zipfile
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from tqdm import tqdm

from rdm_lightning.data.prompt_sets import load_prompt_set, prompt_set_names
from rdm_lightning.data.prompts import load_prompts
from rdm_lightning.evaluation.grid import save_image_grid
from rdm_lightning.methods.lora import merged_copy
from rdm_lightning.methods.roles import diffusers_lora_state, is_lora_file, read_weights
from rdm_lightning.slurm import add_slurm_parser
from rdm_lightning.state_files import first_sentence


# np.load's errors for a file that is not an .npz archive, or a damaged one.
_UNREADABLE_NPZ = (ValueError, OSError, EOFError, KeyError, zipfile.BadZipFile)
# The seeds a torch.Generator takes.
_SEED_RANGE = (-(2**63), 2**64)


def load_module(checkpoint: str | Path):
    """The LightningModule saved in ``checkpoint`` (a ``rdm fit`` checkpoint), in eval mode.

    Raises:
        FileNotFoundError: ``checkpoint`` is not a file.
        ValueError: the file is not a readable ``rdm fit`` checkpoint (e.g. truncated), or names
            a module class that cannot be imported.
    """
    import lightning as L

    from rdm_lightning import distributed_checkpoints
    from rdm_lightning.runs import read_checkpoint

    path = Path(checkpoint).expanduser()
    class_path = read_checkpoint(path).get("hyper_parameters", {}).get("_class_path")
    if class_path is None:
        raise ValueError(f"checkpoint {str(path)!r} was not written by `rdm fit` (no '_class_path' in its hyperparameters)")
    module_name, _, class_name = class_path.rpartition(".")
    try:
        cls = getattr(__import__(module_name, fromlist=[class_name]), class_name)
    except (ImportError, AttributeError, ValueError) as error:
        raise ValueError(f"checkpoint {str(path)!r} holds a {class_path}, which cannot be imported: {error}") from error
    if not (isinstance(cls, type) and issubclass(cls, L.LightningModule)):
        raise TypeError(f"{class_path} in {str(path)!r} is not a LightningModule")
    # A file, or the folder of an FSDP2 run (gathered into one process).
    return distributed_checkpoints.load_from_checkpoint(cls, path, map_location="cpu").eval()


def check_output_folder(output: str | Path, *, overwrite: bool = True) -> None:
    """Raise if ``output`` is a file, or (unless ``overwrite``) a non-empty folder."""
    output = Path(output).expanduser()
    if output.exists() and not output.is_dir():
        raise FileExistsError(f"--output {str(output)!r} is a file; give a folder to write into")
    if not overwrite and output.is_dir() and any(output.iterdir()):
        raise FileExistsError(
            f"--output {str(output)!r} is a non-empty folder; give a new or empty folder, "
            f"or add --overwrite to write into it (files of the same name are replaced)"
        )


def checked_sample_prompts(args: argparse.Namespace) -> list[str]:
    """The prompts to sample (each repeated ``--num-per-prompt`` times), after checking every
    ``rdm sample`` argument that needs no checkpoint, so that a bad one fails before it is loaded.

    Raises:
        FileNotFoundError, FileExistsError: a missing prompts file or prompt set, or an ``--output`` that is a file.
        ValueError: an empty prompt or prompts file, a malformed prompt set or an unknown set name
            (``--prompt-set``), a seed torch refuses, or ``--guidance`` without ``--role teacher``.
    """
    check_output_folder(args.output)
    if args.guidance is not None and args.role != "teacher":
        raise ValueError("--guidance applies to --role teacher only: the student samples without CFG")
    if not _SEED_RANGE[0] <= args.seed < _SEED_RANGE[1]:
        raise ValueError(f"--seed must be in [-2**63, 2**64), got {args.seed}")
    if args.prompts_file is not None:
        base = load_prompts(args.prompts_file)
    elif args.prompt_set is not None:
        name, colon, path = args.prompt_set.partition(":")
        if not (colon and name and path):
            raise ValueError(f"--prompt-set must be NAME:PATH (e.g. partiprompts:PartiPrompts.tsv), got "
                             f"{args.prompt_set!r}; accepted names: {', '.join(prompt_set_names())}")
        base = load_prompt_set(name, path)
    elif args.prompt.strip():
        base = [args.prompt]
    else:
        raise ValueError("--prompt must be a non-empty prompt, got an empty string")
    return [p for p in base for _ in range(args.num_per_prompt)]


def sample(args: argparse.Namespace) -> Path:
    """Write ``samples.npz`` (images N×H×W×C float32 in [0, 1], prompts) and ``grid.png``."""
    prompts = checked_sample_prompts(args)
    module = load_module(args.checkpoint)
    if args.steps is not None:
        if args.role == "generator":
            module.student = dataclasses.replace(module.student, num_steps=args.steps, levels=None)
        else:
            module.teacher_sampling = dataclasses.replace(module.teacher_sampling, num_steps=args.steps)
    if args.guidance is not None:
        module.teacher_sampling = dataclasses.replace(module.teacher_sampling, guidance_scale=args.guidance)
    if args.height is not None or args.width is not None:
        if not hasattr(module.backbone, "set_image_size"):
            raise ValueError(f"--height/--width: {type(module.backbone).__name__} generates at one fixed size")
        module.backbone.set_image_size(args.height or module.backbone.height, args.width or module.backbone.width)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    precision = args.precision or ("bfloat16" if device.type == "cuda" else "float32")
    module.to(device)
    generator = torch.Generator().manual_seed(args.seed)
    noise = torch.randn((len(prompts), *module.backbone.latent_shape), generator=generator)
    batches = []
    start = time.perf_counter()
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bfloat16"):
        for begin in tqdm(range(0, len(prompts), args.batch_size), desc=f"sampling ({args.role})", unit="batch"):
            chunk = slice(begin, begin + args.batch_size)
            latents = module.generate(prompts[chunk], noise[chunk].to(device), role=args.role, generator=generator)
            batches.append(module.backbone.decode(latents).float().cpu())
    module.backbone.flush_embedding_cache()
    seconds = time.perf_counter() - start
    images = torch.cat(batches)
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    np.savez(output / "samples.npz", images=images.permute(0, 2, 3, 1).numpy().astype(np.float32), prompts=np.array(prompts))
    scale = max(1, 64 // images.shape[-1])
    save_image_grid(images, output / "grid.png", columns=args.num_per_prompt, scale=scale)
    info = {"role": args.role, "nfe": module.nfe(args.role), "num_images": len(prompts), "device": str(device),
            "precision": precision, "seconds_per_image": seconds / len(prompts)}
    (output / "sampling.json").write_text(json.dumps(info, indent=2))
    print(json.dumps(info))
    return output


def load_samples(path: str | Path) -> tuple[Tensor, list[str]]:
    """The images ``(N, H, W, C)`` and prompts of a ``samples.npz`` that ``rdm sample`` wrote.

    Raises:
        FileNotFoundError, IsADirectoryError: ``path`` is missing or a folder.
        ValueError: the file is not a readable ``.npz`` archive, or lacks ``images`` or ``prompts``.
    """
    from rdm_lightning.backbones.base import require_path

    path = require_path(path, "samples file")
    if not path.is_file():
        raise IsADirectoryError(f"samples file {str(path)!r} is a folder; give the samples.npz in it")
    expected = "`rdm evaluate` reads the samples.npz that `rdm sample` writes"
    try:
        data = np.load(path)
    except _UNREADABLE_NPZ as error:
        raise ValueError(f"{str(path)!r} is not a readable .npz file ({first_sentence(error)}); {expected}") from error
    if not isinstance(data, np.lib.npyio.NpzFile):
        raise ValueError(f"{str(path)!r} holds one {type(data).__name__}, not an .npz archive; {expected}")
    with data:
        missing = {"images", "prompts"} - set(data.files)
        if missing:
            raise ValueError(f"{str(path)!r} lacks {sorted(missing)}; {expected}, with 'images' and 'prompts'")
        try:
            images, prompts = data["images"], data["prompts"]
        except _UNREADABLE_NPZ as error:
            raise ValueError(f"{str(path)!r} is damaged ({error}); {expected}") from error
    return torch.from_numpy(images), [str(p) for p in prompts]


TEXT_TO_IMAGE_OPTIONS = ("reward", "reference", "teacher_samples", "features", "inception", "cache_dir",
                         "prompts_file", "batch_size", "device")
"""The ``rdm evaluate`` options of text-to-image mode: with none of them, it scores 8×8 digits."""


def evaluate(args: argparse.Namespace) -> dict:
    """Metrics of ``--samples``: digits metrics when no text-to-image option is given
    (:data:`TEXT_TO_IMAGE_OPTIONS`), else rewards, FID and FID-SD (:func:`evaluate_text_to_image`)."""
    if any(getattr(args, name) not in (None, []) for name in TEXT_TO_IMAGE_OPTIONS):
        return evaluate_text_to_image(args)
    return evaluate_digits(args)


def evaluate_digits(args: argparse.Namespace) -> dict:
    """Digits metrics of a ``samples.npz``; prints them as JSON and writes ``metrics.json`` beside it
    (or into ``--output``)."""
    from rdm_lightning.evaluation.digits import DigitsEvaluator

    path = Path(args.samples)
    images, prompts = load_samples(path)
    output = Path(args.output).expanduser() if args.output is not None else path.parent
    check_output_folder(output)
    evaluator = DigitsEvaluator.default()
    try:
        metrics = evaluator.evaluate(images, prompts)
    except ValueError as error:
        raise ValueError(
            f"{str(path)!r}: {error} (with --samples alone `rdm evaluate` scores 8×8 digits samples; "
            f"give --reward, --reference or --teacher-samples for text-to-image metrics)"
        ) from error
    metrics["real_data_floor"] = evaluator.real_data_floor()
    sampling = path.parent / "sampling.json"
    if sampling.exists():
        metrics.update(json.loads(sampling.read_text()))
    output.mkdir(parents=True, exist_ok=True)
    (output / "metrics.json").write_text(json.dumps(metrics, indent=2))
    print(json.dumps(metrics, indent=2))
    return metrics


def evaluate_text_to_image(args: argparse.Namespace) -> dict:
    """Rewards of ``--samples`` (and ``--teacher-samples``), their FID against ``--reference`` and the
    student's FID-SD against the teacher; writes :func:`~rdm_lightning.evaluation.t2i.write_report`'s
    files into ``--output`` and prints the report as JSON.

    Raises:
        ValueError: nothing to evaluate, an option that does not apply (e.g. ``--inception`` without
            ``--reference`` or ``--teacher-samples``), teacher samples of other prompts, or what the
            readers and metrics refuse.
    """
    from rdm_lightning.evaluation.fid import extractor_fingerprint, reference_statistics
    from rdm_lightning.evaluation.t2i import feature_extractor, image_features, reward_scores, t2i_metrics, write_report

    wants_fid = args.reference is not None or args.teacher_samples is not None
    if not args.reward and not wants_fid:
        raise ValueError("nothing to evaluate: give --reward, --reference or --teacher-samples "
                         "(with --samples alone, `rdm evaluate` scores 8×8 digits samples)")
    if not wants_fid:
        for flag, value in (("--features", args.features), ("--inception", args.inception)):
            if value is not None:
                raise ValueError(f"{flag} sets the network of FID and FID-SD: add --reference or --teacher-samples")
    if args.cache_dir is not None and args.reference is None:
        raise ValueError("--cache-dir caches the statistics of --reference: add --reference, or leave it out")
    folders = [path for path in (args.samples, args.teacher_samples) if path and Path(path).expanduser().is_dir()]
    if args.prompts_file is not None and not folders:
        raise ValueError("--prompts-file gives the prompts of an image folder, but every samples.npz holds its own prompts")
    batch_size = args.batch_size or 32
    specs = [spec for text in args.reward for spec in reward_specs(text)]
    sets = {"student": read_image_set(args.samples, args.prompts_file, "--samples")}
    if args.teacher_samples is not None:
        sets["teacher"] = read_image_set(args.teacher_samples, args.prompts_file, "--teacher-samples")
        check_same_prompts(sets["student"][1], sets["teacher"][1])
    if args.features == "digits":
        for role, (images, _, _) in sets.items():
            if images.shape[1:] != (1, 8, 8):
                raise ValueError(f"--features digits takes 8×8 grey digits, but the {role}'s images are "
                                 f"{tuple(images.shape[1:])} (C, H, W); use --features inception")
    samples = Path(args.samples).expanduser()
    output = Path(args.output).expanduser() if args.output is not None else (
        samples.parent / f"{samples.name}_evaluation" if samples.is_dir() else samples.parent)
    check_output_folder(output)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    rewards = build_rewards(specs, device)
    extractor = feature_extractor(args.features, args.inception, device) if wants_fid else None
    reference = None if args.reference is None else reference_statistics(args.reference, extractor, args.cache_dir, batch_size)
    features = {role: image_features(images, extractor, batch_size) for role, (images, _, _) in sets.items()} if extractor else {}
    fingerprint = extractor_fingerprint(extractor) if extractor else None
    report = {}
    for role, (images, prompts, sampling) in sets.items():
        teacher_features = features.get("teacher") if role == "student" else None
        compared = reference is not None or teacher_features is not None
        if not (rewards or compared):
            continue  # the teacher's samples served the student's FID-SD only: nothing of their own to report
        entry = t2i_metrics(
            reward_scores(images, prompts, rewards, batch_size),
            features=features[role] if compared else None,
            reference=reference,
            teacher_features=teacher_features,
            fingerprint=fingerprint if compared else None,
        )
        report[role] = entry if sampling is None else {**entry, "sampling": sampling}
    paths = write_report(report, output)
    print(json.dumps(report, indent=2))
    print(f"wrote {', '.join(str(path) for path in paths)}")
    return report


def read_image_set(path: str | Path, prompts_file: str | None, flag: str) -> tuple[Tensor, list[str], dict | None]:
    """The images ``(N, C, H, W)`` in ``[0, 1]`` and prompts of a samples.npz or an image folder, and the
    ``sampling.json`` beside a samples.npz (``None`` if there is none).

    A folder's images are its ``.png``/``.jpg``/``.jpeg`` files in name order; its prompts are those of
    ``prompts_file``, else of the ``prompts.txt`` in it, one per image in the same order.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: a folder without prompts, or with not as many prompts as images.
    """
    from rdm_lightning.evaluation.fid import load_image_folder

    folder = Path(path).expanduser()
    if not folder.is_dir():
        images, prompts = load_samples(folder)
        sampling = folder.parent / "sampling.json"
        return images.permute(0, 3, 1, 2), prompts, json.loads(sampling.read_text()) if sampling.is_file() else None
    if prompts_file is None and not (folder / "prompts.txt").is_file():
        raise ValueError(f"{flag} {str(folder)!r} is an image folder: its prompts come from --prompts-file or a "
                         f"prompts.txt in it (one line per image, in file-name order)")
    prompts = load_prompts(prompts_file if prompts_file is not None else folder / "prompts.txt")
    images = load_image_folder(folder)
    if len(prompts) != len(images):
        raise ValueError(f"{flag} {str(folder)!r} holds {len(images)} images but its prompts file has {len(prompts)} "
                         f"prompts; give one prompt per image, in file-name order")
    return images, prompts, None


def check_same_prompts(student: list[str], teacher: list[str]) -> None:
    """Raise unless the teacher's samples are of the student's prompts, in the same order (FID-SD's premise)."""
    if len(student) != len(teacher):
        raise ValueError(f"FID-SD compares samples of the same prompts: --samples holds {len(student)} images "
                         f"but --teacher-samples {len(teacher)}")
    for index, (ours, theirs) in enumerate(zip(student, teacher)):
        if ours != theirs:
            raise ValueError(f"FID-SD compares samples of the same prompts: image {index} is of {ours!r} in "
                             f"--samples but of {theirs!r} in --teacher-samples")


def reward_specs(text: str) -> list:
    """The reward specs of one ``--reward``: a ``.yaml``/``.yml``/``.json`` file of one spec or a list of them,
    an inline JSON/YAML mapping ``{"class_path": ..., "init_args": {...}}``, or an alias or class path."""
    import yaml

    path = Path(text).expanduser()
    if path.suffix.lower() in (".yaml", ".yml", ".json"):
        if not path.is_file():
            raise FileNotFoundError(f"--reward file {text!r} not found")
        source, content = f"--reward file {text!r}", path.read_text()
    elif text.lstrip().startswith("{"):
        source, content = f"--reward {text!r}", text
    else:
        return [text]
    try:
        loaded = yaml.safe_load(content)
    except yaml.YAMLError as error:
        raise ValueError(f"{source} is not valid JSON/YAML ({error})") from error
    specs = loaded if isinstance(loaded, list) else [loaded]
    for spec in specs:
        if not isinstance(spec, (str, dict)) or not spec:
            raise ValueError(f"{source}: each reward must be an alias, a class path or a mapping "
                             f"{{class_path: ..., init_args: {{...}}}}, got {spec!r}")
    return specs


def build_rewards(specs: list, device: torch.device) -> dict:
    """The rewards of the ``--reward`` specs (:func:`reward_specs`) by name, on ``device``.

    Raises:
        ValueError: two rewards of the same name (give one another ``init_args: {name: ...}``).
    """
    from rdm_lightning.rewards.base import build_reward

    rewards = {}
    for spec in specs:
        reward = build_reward(spec).to(device)
        if reward.name in rewards:
            raise ValueError(f"two --reward are named {reward.name!r}; give one another name with "
                             f"{{\"class_path\": ..., \"init_args\": {{\"name\": ...}}}}")
        rewards[reward.name] = reward
    return rewards


def export(args: argparse.Namespace) -> Path:
    """Write the (EMA) generator, its LoRA merged if it has one, as a model folder its family loads (diffusers for SD);
    with ``--lora-only``, its adapter alone as a diffusers-format LoRA file on the teacher's weights.

    ``--output`` must be a new or empty folder unless ``--overwrite`` is given.
    """
    check_output_folder(args.output, overwrite=args.overwrite)
    module = load_module(args.checkpoint)
    if args.lora_only:
        return export_lora(module, args.output)
    generator = merged_copy(module.sampling_generator)
    output = module.backbone.export(generator, args.output, len(module.student_levels()), module.student_levels())
    print(f"exported the student to {output}")
    return output


def export_lora(module, output: str | Path) -> Path:
    """The (EMA) generator's adapter as ``pytorch_lora_weights.safetensors`` (docs/roles.md): a LoRA on the
    teacher's pipeline, so only a generator whose base is the pretrained network can be written this way."""
    config = module.roles.generator
    if not config.adapted:
        raise ValueError("--lora-only exports the generator's LoRA, but roles.generator.layout is 'full' (no adapter): "
                         "export the whole student without --lora-only")
    if config.layout == "lora" and config.init is not None and not is_lora_file(read_weights(config.init, "roles.generator.init")):
        raise ValueError(f"--lora-only: the generator's base is roles.generator.init {config.init!r}, not the pipeline's "
                         "own weights, so its LoRA alone would not reproduce it: export the merged student")
    state = diffusers_lora_state(module.sampling_generator, "generator", module.backbone.lora_file_prefix)
    path = module.backbone.export_lora(state, output)
    print(f"exported the generator's LoRA ({len(state) // 2} layers) to {path}")
    return path


def merged_configs(paths: list[str]) -> dict:
    """The YAML configs at ``paths`` merged in order (later mappings override earlier ones key by key), as
    ``rdm fit --config A --config B`` reads them."""
    import yaml

    def merge(base: dict, update: dict) -> dict:
        merged = dict(base)
        for key, value in update.items():
            merged[key] = merge(merged[key], value) if isinstance(value, dict) and isinstance(merged.get(key), dict) else value
        return merged

    config: dict = {}
    for path in paths:
        file = Path(path).expanduser()
        if not file.is_file():
            raise FileNotFoundError(f"--config {path!r} not found")
        loaded = yaml.safe_load(file.read_text())
        if not isinstance(loaded, dict):
            raise ValueError(f"--config {path!r} is not a YAML mapping file")
        config = merge(config, loaded)
    return config


def cache_embeddings(args: argparse.Namespace) -> int:
    """Encode the prompts of ``--prompts-file`` (and ``""``) into the config backbone's embedding cache."""
    import importlib

    prompts = load_prompts(args.prompts_file)
    backbone = merged_configs(args.config).get("model", {}).get("init_args", {}).get("backbone")
    if not isinstance(backbone, dict) or "class_path" not in backbone:
        raise ValueError(f"--config {' '.join(args.config)} names no model.init_args.backbone.class_path")
    init_args = dict(backbone.get("init_args") or {})
    for name in ("path", "embedding_cache"):
        if getattr(args, name) is not None:
            init_args[name] = getattr(args, name)
    if init_args.get("embedding_cache") is None:
        raise ValueError("no embedding cache folder: set model.init_args.backbone.init_args.embedding_cache or --embedding-cache")
    init_args["embedding_cache_refresh"] = args.refresh or init_args.get("embedding_cache_refresh", False)
    module_name, _, class_name = backbone["class_path"].rpartition(".")
    cls = getattr(importlib.import_module(module_name), class_name)
    model = cls(**init_args)
    if args.device is not None:
        model.to(args.device)
    missing = model.embedding_cache.missing([model.negative_prompt, *prompts])
    with tqdm(total=len(missing), desc="encoding prompts", unit="prompt") as bar:
        encoded = model.fill_embedding_cache(prompts, args.batch_size, bar.update)
    print(json.dumps({"cache": str(model.embedding_cache.folder), "encoded": encoded, "cached": len(model.embedding_cache)}))
    return encoded


def _at_least_one(text: str) -> int:
    """argparse type of a count: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _finite_float(text: str) -> float:
    """argparse type of a finite number."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rdm", description="rdm_lightning tools")
    commands = parser.add_subparsers(dest="command", required=True)

    p = commands.add_parser("sample", help="few-step samples from a checkpoint")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--role", choices=("generator", "teacher"), default="generator")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompts-file", help=".txt, .jsonl or .csv of prompts")
    source.add_argument("--prompt")
    source.add_argument("--prompt-set", metavar="NAME:PATH",
                        help=f"a public benchmark's prompts from its published file; NAME: {', '.join(prompt_set_names())}")
    p.add_argument("--num-per-prompt", type=_at_least_one, default=1)
    p.add_argument("--steps", type=_at_least_one, default=None, help="sampler steps (default: the checkpoint's)")
    p.add_argument("--guidance", type=_finite_float, default=None, help="teacher CFG scale (default: the checkpoint's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=_at_least_one, default=256, help="images per generator call")
    p.add_argument("--height", type=_at_least_one, default=None, help="image height in pixels (default: the checkpoint's)")
    p.add_argument("--width", type=_at_least_one, default=None, help="image width in pixels (default: the checkpoint's)")
    p.add_argument("--device", default=None, help="e.g. cuda, cuda:1, cpu (default: cuda when available)")
    p.add_argument("--precision", choices=("float32", "bfloat16"), default=None,
                   help="compute dtype (bf16 autocast); default: bfloat16 on GPU, float32 on CPU")
    p.add_argument("--output", required=True)
    p.set_defaults(run=sample)

    p = commands.add_parser(
        "evaluate", help="digits metrics of a samples.npz, or text-to-image rewards, FID and FID-SD",
        description="With --samples alone: digits metrics of 8x8 digits samples (metrics.json). With any other option "
                    "but --output: text-to-image mode, writing evaluation.json, evaluation.md and one chart per metric.")
    p.add_argument("--samples", required=True, help="a samples.npz of `rdm sample`, or (text-to-image) an image folder")
    p.add_argument("--reward", action="append", default=[], metavar="SPEC",
                   help="repeatable: an alias (e.g. digits_gold, hpsv2) or class path, an inline mapping "
                        "'{\"class_path\": \"hpsv2\", \"init_args\": {...}}', or a .yaml/.json file of one or a list of them")
    p.add_argument("--reference", default=None, help="FID reference: an image folder, a samples.npz or a statistics .npz")
    p.add_argument("--teacher-samples", default=None,
                   help="the teacher's samples of the same prompts (samples.npz or image folder): FID-SD, and its own rewards")
    p.add_argument("--features", choices=("inception", "digits"), default=None,
                   help="network of FID/FID-SD: the FID InceptionV3 (default; needs --inception) or the digits classifier")
    p.add_argument("--inception", default=None, help="the FID InceptionV3 weights (pt_inception-2015-12-05-6726825d.pth)")
    p.add_argument("--cache-dir", default=None, help="cache of --reference statistics")
    p.add_argument("--prompts-file", default=None,
                   help="prompts of an image folder, one per image in file-name order (default: its prompts.txt)")
    p.add_argument("--output", default=None,
                   help="report folder (default: the samples.npz's folder, or FOLDER_evaluation beside an image folder)")
    p.add_argument("--batch-size", type=_at_least_one, default=None, help="images per reward call and feature pass (default 32)")
    p.add_argument("--device", default=None, help="where rewards and features run, e.g. cuda (default: cuda when available)")
    p.set_defaults(run=evaluate)

    p = commands.add_parser("export", help="export the student")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--output", required=True, help="a new or empty folder")
    p.add_argument("--overwrite", action="store_true", help="write into a non-empty --output, replacing files of the same name")
    p.add_argument("--lora-only", action="store_true",
                   help="write only the generator's LoRA (diffusers format, for the teacher pipeline's load_lora_weights)")
    p.set_defaults(run=export)

    p = commands.add_parser("cache-embeddings", help="encode prompts once into the backbone's embedding cache")
    p.add_argument("--config", action="append", required=True, help="the fit config(s) naming the backbone")
    p.add_argument("--prompts-file", required=True, help=".txt, .jsonl or .csv of prompts")
    p.add_argument("--path", default=None, help="the backbone's pipeline folder (default: the config's)")
    p.add_argument("--embedding-cache", dest="embedding_cache", default=None, help="cache folder (default: the config's)")
    p.add_argument("--refresh", action="store_true", help="re-encode a cache written by other encoders or settings")
    p.add_argument("--batch-size", type=_at_least_one, default=32)
    p.add_argument("--device", default=None, help="where the text encoders run, e.g. cuda (default: cpu)")
    p.set_defaults(run=cache_embeddings)

    add_slurm_parser(commands)
    return parser


def main(argv: list[str]) -> None:
    """Run the tool ``argv[0]`` (``sample``, ``evaluate``, ``export``, ``cache-embeddings`` or ``slurm``) with the
    arguments after it."""
    args = build_parser().parse_args(argv)
    args.run(args)
