"""Short messages for the configuration and input errors of the ``rdm`` command.

``rdm`` prints such an error as ``rdm <command>: error: <message>`` and exits with status 2;
``--debug`` or ``RDM_DEBUG=1`` keeps Python's full traceback instead. jsonargparse reports a
bad config value wrapped in layers of its own errors that repeat the whole config;
:func:`short_message` keeps the failing key and the innermost message. Anything else (a bug,
or any failure once training has begun) keeps its traceback: shortening it would hide where
it came from, and a crashed training run is costly to repeat with ``--debug``.
"""
from __future__ import annotations

import argparse
import importlib
import inspect
import os
import re
from collections.abc import Callable
from pathlib import Path
from types import FrameType

import yaml
from lightning.fabric.utilities.exceptions import MisconfigurationException

DEBUG_FLAG = "--debug"
DEBUG_ENV = "RDM_DEBUG"
USAGE_EXIT_CODE = 2
"""Exit status of a configuration or input error (argparse's, for a bad argument)."""

INPUT_ERRORS: tuple[type[BaseException], ...] = (
    ValueError,
    TypeError,
    KeyError,
    FileNotFoundError,
    FileExistsError,
    IsADirectoryError,
    NotADirectoryError,
    PermissionError,
    argparse.ArgumentError,
    MisconfigurationException,
)
"""Error types of config and argument checks: the project's, jsonargparse's parse errors and Lightning's."""

CONFIG_FLAGS = ("-c", "--config")
# Options that act on the whole command line wherever they stand.
ORDER_FREE_FLAGS = ("-h", "--help", "--print_config")

_UNION_FAILURE = "Does not validate against any of the Union subtypes"
_PARSER_KEY = re.compile(r'^Parser key "([^"]+)":')
_CLASS_PATH_PROBLEM = re.compile(r"^Problem with given class_path '([^']+)':\s*")
_NOT_ACCEPTED = re.compile(r"^Option '([^']+)' is not accepted")
_EXPECTED_IMPORT_PATH = re.compile(r"Expected a dot import path string: (\S+)")
_EXPECTED_LITERAL = re.compile(r"Expected a typing\.Literal\[(.*?)\](?:\. Got value: (.*))?")
_EXPECTED_CLASS = re.compile(r"Expected a <class '([\w.]+)'>(?:\. Got value: (.*))?")
_NONE_ALTERNATIVES = ("Expected a <class 'NoneType'>", "Expected a None")
# The class_path jsonargparse reports when an argument of a model or data module came before any class.
_BASE_CLASS_PATHS = ("lightning.LightningModule", "lightning.LightningDataModule")
_REWARD_BASE_CLASS = "rdm_lightning.rewards.base.RewardModel"
_MAX_QUOTED_VALUE = 80


def split_debug_flag(args: list[str]) -> tuple[list[str], bool]:
    """``args`` without ``--debug``, and whether the full traceback is wanted (``--debug`` or ``$RDM_DEBUG``).

    ``RDM_DEBUG`` counts as set unless it is empty, ``0``, ``false`` or ``no``.
    """
    env = os.environ.get(DEBUG_ENV, "").strip().lower()
    debug = DEBUG_FLAG in args or env not in ("", "0", "false", "no")
    return [arg for arg in args if arg != DEBUG_FLAG], debug


def check_config_args(args: list[str]) -> None:
    """Check the ``--config`` arguments of a ``rdm fit``-style command line before jsonargparse parses it.

    Every option must follow the first ``--config``: jsonargparse applies arguments in order,
    so an earlier one is silently overwritten by the config or, for a ``model``/``data``
    argument, rejected as one of the bare ``LightningModule`` base class. A config file that
    exists must be a YAML mapping (jsonargparse's own message names neither file nor line).

    Raises:
        ValueError: an option before ``--config``, or a config file that is not a YAML mapping.
    """
    positions = [i for i, arg in enumerate(args) if arg.split("=", 1)[0] in CONFIG_FLAGS]
    if not positions:
        return
    early = [
        arg for arg in args[: positions[0]]
        if arg.startswith("-") and not arg.split("=", 1)[0].startswith(ORDER_FREE_FLAGS)
    ]
    if early:
        raise ValueError(
            f"{' '.join(early)} comes before --config, so the config would overwrite or reject it; "
            f"put --config first: rdm {args[0]} --config FILE {' '.join(early)} ..."
        )
    for i in positions:
        value = args[i].split("=", 1)[1] if "=" in args[i] else (args[i + 1] if i + 1 < len(args) else None)
        if value is not None and Path(value).is_file():
            _check_config_file(Path(value))


def _check_config_file(path: Path) -> None:
    try:
        config = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as error:
        raise ValueError(f"--config {str(path)!r} is not valid YAML: {_yaml_problem(error)}") from error
    if not isinstance(config, dict):
        raise ValueError(
            f"--config {str(path)!r} holds a {type(config).__name__}, not a mapping of sections "
            f"(trainer, model, data, ...)"
        )


def _yaml_problem(error: yaml.YAMLError) -> str:
    """A YAML syntax error as ``<problem> at line L, column C``."""
    mark = getattr(error, "problem_mark", None)
    problem = getattr(error, "problem", None) or str(error)
    return problem if mark is None else f"{problem} at line {mark.line + 1}, column {mark.column + 1}"


def is_input_error(error: BaseException) -> bool:
    """Whether ``error`` is a configuration or input error, raised before training began.

    Errors from inside Lightning's training stage keep their traceback even when their type
    is an input error's: they may be bugs, and the run is costly to repeat.
    """
    return isinstance(error, INPUT_ERRORS) and not _raised_in_training(error)


def short_message(error: BaseException) -> str:
    """One short message for a configuration or input error: where it is and what is wrong.

    For jsonargparse's errors, the failing key (``model.init_args.rewards``) and the innermost
    message, without the config dumps; for an error raised while a class was being built from
    the config, that class and the error's own message; for a bad reward, the reward aliases.
    """
    keys: list[str] = []
    classes: list[str] = []
    current = error
    while True:
        first_line = _first_line(current)
        if key := _PARSER_KEY.match(first_line):
            if not keys or keys[-1] != key.group(1):
                keys.append(key.group(1))
        elif problem := _CLASS_PATH_PROBLEM.match(first_line):
            classes.append(problem.group(1))
            keys.append("init_args")
        if not (_raised_by_jsonargparse(current) and current.__cause__ is not None):
            break
        if first_line == _UNION_FAILURE and len(_union_alternatives(current)) > 1:
            break  # several types were possible: their errors together say what is accepted
        current = current.__cause__
    message = _innermost_message(current, classes[-1] if classes else None)
    if keys and keys[-1] == "init_args":
        keys.pop()
        if classes[-1] not in message:  # the class itself failed (e.g. it cannot be imported)
            message = f"{classes[-1]}: {message}"
    if not _raised_by_jsonargparse(current) and (built := _class_being_built(current)) is not None:
        message = f"{built}: {message}"
    if keys:
        message = f"{'.'.join(keys)}: {message}"
    if _REWARD_BASE_CLASS in str(error) and _names_a_wrong_class(current):
        from rdm_lightning.rewards.base import REWARD_ALIASES

        message += f"; a reward is a class path or one of the aliases {', '.join(REWARD_ALIASES)}"
    return message


def _names_a_wrong_class(error: BaseException) -> bool:
    """Whether jsonargparse's innermost ``error`` says a class path is unknown or of the wrong type."""
    text = str(error)
    return (
        isinstance(error, (ImportError, AttributeError))
        or _EXPECTED_IMPORT_PATH.search(text) is not None
        or "does not correspond to a subclass of" in text
    )


def _innermost_message(error: BaseException, class_path: str | None) -> str:
    if isinstance(error, yaml.YAMLError):
        return f"not valid YAML: {_yaml_problem(error)}"
    if _first_line(error) == _UNION_FAILURE:
        alternatives = " or ".join(_union_alternatives(error))
        given = _given_value(error)
        return alternatives if given is None or given.strip("'") in alternatives else f"{alternatives}, got {given}"
    # str() of a KeyError is the repr of its message.
    text = error.args[0] if isinstance(error, KeyError) and error.args else str(error)
    return _readable(str(text), class_path)


def _readable(text: str, class_path: str | None) -> str:
    """A jsonargparse message in words: ``Expected a <class 'int'>. Got value: abc`` as
    ``expected int, got 'abc'``, an unknown option with the options the class accepts."""
    if not_accepted := _NOT_ACCEPTED.match(text):
        return _unknown_option_message(not_accepted.group(1), class_path)

    def expected(what: str) -> Callable[[re.Match], str]:
        def replace(match: re.Match) -> str:
            return f"expected {what}{match.group(1)}" + (f", got {match.group(2)!r}" if match.group(2) else "")

        return replace

    text = _EXPECTED_IMPORT_PATH.sub(r"'\1' is neither a class path (package.module.Class) nor a known class name", text)
    text = _EXPECTED_LITERAL.sub(expected("one of "), text)
    return _EXPECTED_CLASS.sub(expected(""), text).strip()


def _unknown_option_message(option: str, class_path: str | None) -> str:
    if class_path is None:
        return f"no option {option!r}"
    if class_path in _BASE_CLASS_PATHS:
        return (
            f"option {option!r} was given before any class_path (so to the bare {class_path}); "
            f"give the class first (its class_path in --config, or e.g. --model rdm_lightning.methods.DMD)"
        )
    accepted = _init_parameters(class_path)
    listing = f"; accepted: {', '.join(accepted)}" if accepted else ""
    return f"{class_path} has no option {option!r}{listing}"


def _init_parameters(class_path: str) -> list[str]:
    """The constructor's parameter names of the class at ``class_path``, following ``**kwargs`` up the
    classes it is passed to (the methods' shared arguments); none if it cannot be imported."""
    module_name, _, name = class_path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), name)
        names: list[str] = []
        for klass in cls.__mro__:
            # __init__'s, not the class's: a metaclass __call__ (e.g. the rewards') hides the parameters.
            if "__init__" not in vars(klass):
                continue
            parameters = list(inspect.signature(klass.__init__).parameters.values())[1:]
            names += [p.name for p in parameters if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD) and p.name not in names]
            if not any(p.kind == p.VAR_KEYWORD for p in parameters):
                break
    except (ImportError, AttributeError, ValueError, TypeError):
        return []
    return names


def _union_alternatives(error: BaseException) -> list[str]:
    """The distinct errors of the non-None alternatives of a jsonargparse union failure, in words.

    A value that named a class was meant as that class, so only its first class's problem is kept.
    """
    lines = str(error).splitlines()
    if "Errors:" not in lines:
        return []
    alternatives: list[str] = []
    for line in lines[lines.index("Errors:") + 1 :]:
        if line.startswith("Given value"):
            break
        if line.startswith("  - "):
            alternatives.append(line[4:])
        elif alternatives and line.strip():
            alternatives[-1] += " " + line.strip()
    alternatives = [a for a in alternatives if not a.startswith(_NONE_ALTERNATIVES)]
    class_problems = [m for a in alternatives if (m := _CLASS_PATH_PROBLEM.match(a))]
    if class_problems:
        problem = class_problems[0]
        class_path, text = problem.group(1), problem.string[problem.end() :]
        described = _readable(text, class_path)
        return [described if class_path in described else f"{class_path}: {described}"]
    return list(dict.fromkeys(_readable(a, None) for a in alternatives))


def _given_value(error: BaseException) -> str | None:
    """The value a jsonargparse union failure reports, quoted, if it is short and plain."""
    for line in str(error).splitlines():
        if line.startswith("Given value: "):
            value = line[len("Given value: ") :]
            return repr(value) if len(value) <= _MAX_QUOTED_VALUE and not value.startswith("NestedArg(") else None
    return None


def _first_line(error: BaseException) -> str:
    text = str(error)
    return text.splitlines()[0] if text else ""


def _in_config_machinery(frame: FrameType) -> bool:
    """Whether ``frame`` runs jsonargparse or LightningCLI's wrapper of its instantiation."""
    return frame.f_globals.get("__name__", "").startswith(("jsonargparse", "lightning.pytorch.cli"))


def _raised_by_jsonargparse(error: BaseException) -> bool:
    tb = error.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return tb is not None and _in_config_machinery(tb.tb_frame)


def _raised_in_training(error: BaseException) -> bool:
    """Whether Lightning's training stage (``Trainer._run_stage``) is on ``error``'s traceback."""
    tb = error.__traceback__
    while tb is not None:
        frame = tb.tb_frame
        if frame.f_code.co_name == "_run_stage" and frame.f_globals.get("__name__", "").startswith("lightning"):
            return True
        tb = tb.tb_next
    return False


def _class_being_built(error: BaseException) -> str | None:
    """The class that jsonargparse (or LightningCLI's instantiator) was building when ``error`` was
    raised, from the ``class_type`` their instantiation frames hold; None outside instantiation."""
    built = None
    tb = error.__traceback__
    while tb is not None:
        frame = tb.tb_frame
        class_type = frame.f_locals.get("class_type") if _in_config_machinery(frame) else None
        if isinstance(class_type, type):
            built = f"{class_type.__module__}.{class_type.__qualname__}"
        tb = tb.tb_next
    return built
