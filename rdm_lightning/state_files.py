"""Reading the state dict of a published weights file, checking it against a network, building a network's
architecture from a preset name or a dict, and naming a few of many keys in an error message."""
from __future__ import annotations

import dataclasses
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import Tensor

Config = TypeVar("Config")


def first_sentence(error: BaseException) -> str:
    """What failed, without the advice torch and numpy append (e.g. on unpickling a file they cannot vouch for)."""
    return str(error).strip().splitlines()[0].split(". ")[0].rstrip(".")


def some_names(names: Sequence[str], count: int = 5) -> str:
    """The first ``count`` of ``names`` as a bracketed list, with ``...`` when there are more."""
    shown = ", ".join(repr(name) for name in names[:count])
    return f"[{shown}{', ...' if len(names) > count else ''}]"


def read_state_dict_file(path: str | Path, nested: bool, source: str) -> dict[str, Tensor]:
    """The state dict of a torch checkpoint file (open_clip, HPSv2, ImageReward), loaded on the CPU with
    ``weights_only=True``.

    Args:
        path: The file.
        nested: The file is a dict whose ``"state_dict"`` holds the weights (HPSv2's format);
            otherwise the file is the state dict itself (open_clip's ``open_clip_pytorch_model.bin``).
        source: The expected file and where it is published, for the error messages.

    Raises:
        FileNotFoundError: no file at ``path``.
        ValueError: the file is not a torch checkpoint of the expected layout.
    """
    file = Path(path).expanduser()
    layout = "a dict with the weights under 'state_dict'" if nested else "a bare state dict"
    if not file.is_file():
        raise FileNotFoundError(f"checkpoint not found at {str(file)!r}; expected {source} ({layout})")
    try:
        loaded = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as error:  # torch.load reports unreadable files with several exception types.
        raise ValueError(
            f"{str(file)!r} is not a readable torch checkpoint ({type(error).__name__}: {first_sentence(error)}); expected {source}"
        ) from error
    if nested:
        if not (isinstance(loaded, Mapping) and "state_dict" in loaded):
            keys = list(loaded)[:5] if isinstance(loaded, Mapping) else type(loaded).__name__
            raise ValueError(
                f"{str(file)!r} has no 'state_dict' entry (got {keys}); expected {source} ({layout})"
            )
        loaded = loaded["state_dict"]
    if not (isinstance(loaded, Mapping) and all(isinstance(value, Tensor) for value in loaded.values())):
        found = list(loaded)[:5] if isinstance(loaded, Mapping) else type(loaded).__name__
        raise ValueError(
            f"{str(file)!r} does not hold a state dict of tensors (got {found}); expected {source} ({layout})"
        )
    return dict(loaded)


def check_weights(
    state_dict: Mapping[str, object],
    expected: Mapping[str, tuple[int, ...]],
    source: str,
    network: str,
    ignored: Collection[str] = (),
) -> None:
    """Raise unless ``state_dict`` holds exactly the keys of ``expected`` (plus any of ``ignored``), each a
    floating point tensor of the expected shape.

    Args:
        state_dict: The weights read from a file.
        expected: The network's keys and shapes.
        source: The file and what it should be, for the messages.
        network: What the weights are for (e.g. "the OpenCLIP architecture ViT-H-14"), for the messages.
        ignored: Keys the file may hold that the network does not use.

    Raises:
        ValueError: missing or unexpected keys, a value that is not a floating tensor, or a shape mismatch.
    """
    missing = [name for name in expected if name not in state_dict]
    unexpected = [name for name in state_dict if name not in expected and name not in ignored]
    if missing or unexpected:
        raise ValueError(
            f"{source}: the weights do not fit {network}: {len(missing)} keys missing {some_names(missing)}, "
            f"{len(unexpected)} unexpected {some_names(unexpected)}"
        )
    for name, shape in expected.items():
        tensor = state_dict[name]
        if not (isinstance(tensor, Tensor) and tensor.is_floating_point()):
            raise ValueError(f"{source}: {name!r} must be a floating point tensor, got {type(tensor).__name__}")
        if tuple(tensor.shape) != shape:
            raise ValueError(f"{source}: {name!r} has shape {tuple(tensor.shape)} but {network} needs {shape}")


def config_from_spec(
    cls: type[Config], spec: str | Mapping[str, Any], presets: Mapping[str, Config], what: str, argument: str
) -> Config:
    """The dataclass config ``cls`` named by ``spec``: a preset of ``presets`` by name, or built from a dict of
    its fields.

    Args:
        cls: The config dataclass.
        spec: A preset name or a dict of ``cls``'s fields.
        presets: The presets by name.
        what: The architecture's kind, for the messages (e.g. "OpenCLIP architecture").
        argument: The argument ``spec`` came from, for the messages.

    Raises:
        ValueError: an unknown preset name, unknown fields or missing required ones, or invalid values.
    """
    if isinstance(spec, str):
        if spec not in presets:
            raise ValueError(
                f"unknown {what} {spec!r}; presets: {', '.join(presets)}, or pass a dict of {cls.__name__} fields"
            )
        return presets[spec]
    if isinstance(spec, Mapping):
        fields = dataclasses.fields(cls)
        names = [field.name for field in fields]
        unknown = sorted(set(spec) - set(names))
        missing = [f.name for f in fields if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
                   and f.name not in spec]
        if unknown or missing:
            raise ValueError(f"{what} dict has unknown fields {unknown} and lacks {missing}; fields: {', '.join(names)}")
        return cls(**spec)
    raise ValueError(
        f"{argument} must be a preset name ({', '.join(presets)}) or a dict of {cls.__name__} fields, got {spec!r}"
    )
