"""Public text-to-image benchmark prompt sets, read from their published files.

``load_prompt_set(name, path)`` reads the file (or folder) ``path`` in the format of the set
``name`` (:data:`PROMPT_SETS`) and returns its prompts in file order, stripped:

- ``coco``: a COCO captions annotation file (``captions_val2014.json``, ``captions_val2017.json``),
  one prompt per entry of ``annotations``;
- ``drawbench``: the DrawBench sheet exported as csv (columns ``Prompts``, ``Category``);
- ``hpsv2``: the HPSv2 benchmark, a folder of one json list of prompts per style
  (:data:`HPSV2_STYLES`), read style by style in sorted order; ``hpsv2/<style>`` reads one style
  of the folder; a single style file is accepted as well;
- ``partiprompts``: ``PartiPrompts.tsv`` (columns ``Prompt``, ``Category``, ``Challenge``, ``Note``);
- ``geneval``: GenEval's ``evaluation_metadata.jsonl``, the ``prompt`` of each line.

A malformed file is refused, never partly read: the error names the file, the line or entry,
the expected format and where the public file is published.
"""
from __future__ import annotations

import csv
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from rdm_lightning.data.prompts import _check_prompt, _read_csv, _read_jsonl

HPSV2_STYLES = ("anime", "concept-art", "paintings", "photo")
"""The styles of the HPSv2 benchmark, one ``<style>.json`` each, in the order they are read."""


@dataclass(frozen=True)
class PromptSetFormat:
    """How one prompt set is stored and where it is published.

    Args:
        expected: The file format, in words (for error messages).
        published: Where the public file is published.
        read: Reads the prompts of a path in this format (the style is ``None`` but for ``hpsv2/<style>``).
        folder: Whether ``path`` may be a folder.
    """

    expected: str
    published: str
    read: Callable[[Path, str | None], list[str]]
    folder: bool = False


def _read_json(path: Path) -> object:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"{str(path)!r} is not valid JSON ({error})") from error


def _read_coco(path: Path, style: str | None) -> list[str]:
    data = _read_json(path)
    annotations = data.get("annotations") if isinstance(data, dict) else None
    if not isinstance(annotations, list):
        raise ValueError(f"{str(path)!r} is not a JSON object with an 'annotations' list")
    prompts = []
    for index, annotation in enumerate(annotations):
        where = f"{str(path)!r} annotations[{index}]"
        if not isinstance(annotation, dict) or "caption" not in annotation:
            raise ValueError(f"{where} has no 'caption'; got {annotation!r}")
        prompts.append(_check_prompt(annotation["caption"], where, "caption"))
    return prompts


def _read_hpsv2(path: Path, style: str | None) -> list[str]:
    if path.is_file():
        if style is not None and path.stem != style:
            raise ValueError(f"hpsv2/{style} asks for the style {style!r}, but {str(path)!r} is the file of {path.stem!r}; "
                             f"give the benchmark folder or {style}.json")
        return _read_style_file(path)
    styles = HPSV2_STYLES if style is None else (style,)
    missing = [f"{name}.json" for name in styles if not (path / f"{name}.json").is_file()]
    if missing:
        raise ValueError(f"the HPSv2 benchmark folder {str(path)!r} lacks {missing}")
    return [prompt for name in styles for prompt in _read_style_file(path / f"{name}.json")]


def _read_style_file(path: Path) -> list[str]:
    data = _read_json(path)
    if not isinstance(data, list):
        raise ValueError(f"{str(path)!r} holds a JSON {type(data).__name__}, not a list of prompts")
    return [_check_prompt(prompt, f"{str(path)!r} entry [{index}]", "prompt") for index, prompt in enumerate(data)]


PROMPT_SETS: dict[str, PromptSetFormat] = {
    "coco": PromptSetFormat(
        "a COCO captions annotation json ({\"annotations\": [{\"image_id\", \"id\", \"caption\"}, ...], \"images\": [...]}, "
        "e.g. captions_val2014.json)",
        "annotations_trainval2014.zip / annotations_trainval2017.zip at http://images.cocodataset.org/annotations/",
        _read_coco,
    ),
    "drawbench": PromptSetFormat(
        "the DrawBench csv (a header row, columns 'Prompts' and 'Category')",
        "https://docs.google.com/spreadsheets/d/1y7nAbmR4FREi6npB1u-Bo3GFdwdOPYJc617rBOxIRHY (File > Download > csv)",
        lambda path, style: _read_csv(path, "Prompts"),
    ),
    "hpsv2": PromptSetFormat(
        f"the HPSv2 benchmark folder with {', '.join(f'{s}.json' for s in HPSV2_STYLES)} (each a JSON list of "
        "prompt strings), or one such file",
        "https://huggingface.co/datasets/zhwang/HPDv2/tree/main/benchmark",
        _read_hpsv2,
        folder=True,
    ),
    "partiprompts": PromptSetFormat(
        "PartiPrompts.tsv (tab-separated, a header row, columns 'Prompt', 'Category', 'Challenge', 'Note')",
        "https://github.com/google-research/parti/blob/main/PartiPrompts.tsv",
        lambda path, style: _read_csv(path, "Prompt", delimiter="\t", quoting=csv.QUOTE_NONE),
    ),
    "geneval": PromptSetFormat(
        "GenEval's evaluation_metadata.jsonl (one JSON object per line with 'tag', 'include' and 'prompt')",
        "https://github.com/djghosh13/geneval/blob/main/prompts/evaluation_metadata.jsonl",
        lambda path, style: _read_jsonl(path, "prompt"),
    ),
}


def prompt_set_names() -> list[str]:
    """Every name :func:`load_prompt_set` accepts: the sets, and ``hpsv2/<style>`` for each style."""
    return [*PROMPT_SETS, *(f"hpsv2/{style}" for style in HPSV2_STYLES)]


def load_prompt_set(name: str, path: str | Path) -> list[str]:
    """The prompts of the prompt set ``name`` stored at ``path``, in file order, stripped.

    Args:
        name: A key of :data:`PROMPT_SETS`, or ``hpsv2/<style>`` (a style of :data:`HPSV2_STYLES`)
            for one style of the HPSv2 benchmark folder.
        path: The set's published file (a folder for ``hpsv2``).

    Raises:
        ValueError: an unknown name (the message lists the accepted ones), a file not in the set's
            format (wrong columns, not JSON, an empty prompt, a missing field), or no prompts at all.
        FileNotFoundError: ``path`` does not exist.
        IsADirectoryError: ``path`` is a folder where the set is one file.
    """
    base, slash, style = name.partition("/")
    if base not in PROMPT_SETS or (slash and (base != "hpsv2" or style not in HPSV2_STYLES)):
        raise ValueError(f"unknown prompt set {name!r}; accepted: {', '.join(prompt_set_names())}")
    spec = PROMPT_SETS[base]
    about = f"a {base!r} prompt set is {spec.expected}, published at {spec.published}"
    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"prompt set file not found: {str(path)!r}; {about}")
    if path.is_dir() and not spec.folder:
        raise IsADirectoryError(f"prompt set {str(path)!r} is a folder; {about}")
    try:
        prompts = spec.read(path, style or None)
    except UnicodeDecodeError as error:
        raise ValueError(f"{str(path)!r} is not UTF-8 text ({error}); {about}") from error
    except ValueError as error:
        raise ValueError(f"{error}; {about}") from error
    if not prompts:
        raise ValueError(f"prompt set {str(path)!r} holds no prompts; {about}")
    return prompts
