"""The ``rdm`` command: LightningCLI for ``fit``/``validate`` plus ``sample``, ``evaluate`` and ``export``.

``rdm fit --config configs/digits/dmd.yaml`` trains (and, for the digits default,
first pretrains the cached teacher). The other subcommands work on checkpoints
and sample files:

- ``rdm sample --checkpoint CKPT --prompt P --num-per-prompt N --output DIR``
- ``rdm evaluate --samples DIR/samples.npz``
- ``rdm export --checkpoint CKPT --output DIR``
- ``rdm cache-embeddings --config CONFIG --prompts-file F`` (``docs/embedding_cache.md``)
- ``rdm slurm --config CONFIG --nodes N --gpus-per-node G --time T`` (``docs/runs.md``)
"""
from __future__ import annotations

import sys
import warnings
from pathlib import Path

import lightning as L
from jsonargparse import set_parsing_settings
from lightning.pytorch.cli import LightningCLI

from rdm_lightning import runs
from rdm_lightning.distributed_checkpoints import is_checkpoint_folder

# The configs' fields carry their documentation as attribute docstrings (a string under each
# field); with this, `--help` shows it beside every option.
set_parsing_settings(docstring_parse_attribute_docstrings=True)

TOOL_COMMANDS = ("sample", "evaluate", "export", "cache-embeddings", "slurm")


class RDMLightningCLI(LightningCLI):
    """LightningCLI in subclass mode for models and data; pretrains the digits teacher when needed.

    ``fit`` also settles the run folder and what to resume before anything is built
    (``docs/runs.md``): under SLURM the logger's version is ``job_<id>`` and a requeued job
    resumes from that folder's ``checkpoints/last.ckpt``; ``--ckpt_path last`` is the newest
    ``last.ckpt`` of the config's runs; a resumed run keeps writing into the checkpoint's
    version folder; and the config must match the checkpoint's model settings except the
    budget, which takes effect (Lightning would silently restore the checkpoint's instead).
    """

    def __init__(self, args=None, **kwargs):
        super().__init__(
            L.LightningModule,
            L.LightningDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            save_config_kwargs={"overwrite": True},
            args=args,
            **kwargs,
        )

    def _parse_ckpt_path(self) -> None:
        if self.config.get("subcommand") != "fit":
            super()._parse_ckpt_path()
            return
        config = self.config.fit
        logger = config.trainer.get("logger")
        logger_args = getattr(logger, "init_args", None)
        experiment_dir = None
        if logger_args is not None and logger_args.get("save_dir") is not None:
            experiment_dir = Path(logger_args.save_dir) / str(logger_args.get("name") or "lightning_logs")
        version = runs.run_version()
        if version is not None and experiment_dir is not None:
            logger_args.version = version
            # Lightning resumes a SLURM job from any hpc_ckpt_*.ckpt in default_root_dir: the job's own folder has none.
            config.trainer.default_root_dir = str(experiment_dir / version)
            own_last = experiment_dir / version / "checkpoints" / runs.LAST_CHECKPOINT
            if config.ckpt_path is None and (own_last.is_file() or is_checkpoint_folder(own_last)):
                print(f"rdm: resuming SLURM job {version} from {own_last}")
                config.ckpt_path = str(own_last)
        if config.ckpt_path == "last":
            if experiment_dir is not None:
                # A SLURM job resumes only its own folder (found above), never another job's.
                config.ckpt_path = str(runs.latest_checkpoint(experiment_dir, only_version=version))
            else:  # no logger folder: the run folder is default_root_dir
                config.ckpt_path = str(runs.checkpoint_in(Path(config.trainer.get("default_root_dir") or ".")))
        if config.ckpt_path is None:
            return
        checkpoint = Path(config.ckpt_path)
        saved = runs.read_checkpoint(checkpoint)
        runs.check_resumable(saved.get("hyper_parameters", {}), config.model.as_dict(), checkpoint)
        if experiment_dir is not None:
            own_version = runs.version_of_checkpoint(checkpoint, experiment_dir)
            if own_version is not None:
                logger_args.version = own_version
                if logger.class_path.endswith("loggers.CSVLogger"):
                    warnings.warn(
                        f"Lightning's CSVLogger deletes {experiment_dir / own_version}/metrics.csv when the resumed run "
                        "reopens the folder; rdm_lightning.loggers.RunCSVLogger keeps it and continues it"
                    )
            if "resume_step" in logger_args:
                logger_args.resume_step = saved["loops"]["fit_loop"]["epoch_loop.state_dict"]["_batches_that_stepped"]

    def before_fit(self) -> None:
        # The frozen teacher and backbone are in eval mode on purpose.
        warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode at the start of training.*")

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        backbone = getattr(config.model.init_args, "backbone", None)
        if backbone is not None and backbone.class_path.endswith("DigitsBackbone") and backbone.init_args.path is None:
            from rdm_lightning.methods.teacher import ensure_digits_teacher

            ensure_digits_teacher(backbone.init_args.prediction)


def main(argv: list[str] | None = None) -> None:
    """Entry point of ``rdm`` and ``python -m rdm_lightning``; ``argv`` defaults to ``sys.argv[1:]``.

    A configuration or input error ends as ``rdm <command>: error: <message>`` with exit
    status 2; with ``--debug`` or ``RDM_DEBUG=1`` it is raised with its full traceback
    (``rdm_lightning/errors.py`` says which errors are shortened and how).
    """
    from rdm_lightning import errors
    from rdm_lightning.rewards.base import register_reward_alias_parser_mode, resolve_reward_alias_args

    command_args, debug = errors.split_debug_flag(sys.argv[1:] if argv is None else argv)
    if not command_args or command_args[0] in ("-h", "--help"):
        print(f"rdm also has: {', '.join(f'rdm {c}' for c in TOOL_COMMANDS)} (each with --help)\n")
    command = command_args[0] if command_args and not command_args[0].startswith("-") else None
    commands = (*LightningCLI.subcommands(), *TOOL_COMMANDS)
    try:
        if command is not None and command not in commands:
            raise ValueError(f"unknown command {command!r}; accepted: {', '.join(commands)}")
        if command in TOOL_COMMANDS:
            from rdm_lightning import tools

            tools.main(command_args)
        else:
            errors.check_config_args(command_args)
            cli_args = resolve_reward_alias_args(command_args)
            if argv is None:
                # LightningCLI reads sys.argv itself, and warns when also given args.
                sys.argv[1:] = cli_args
            # Parse errors are raised (not printed with the whole usage) so that they are shortened below.
            parser_kwargs = {"exit_on_error": False, "parser_mode": register_reward_alias_parser_mode()}
            RDMLightningCLI(args=None if argv is None else cli_args, parser_kwargs=parser_kwargs)
    except errors.INPUT_ERRORS as error:
        if debug or not errors.is_input_error(error):
            raise
        program = f"rdm {command}" if command in commands else "rdm"
        print(f"{program}: error: {errors.short_message(error)}", file=sys.stderr)
        print(f"(for the full traceback, add {errors.DEBUG_FLAG} or set {errors.DEBUG_ENV}=1)", file=sys.stderr)
        raise SystemExit(errors.USAGE_EXIT_CODE) from None


if __name__ == "__main__":
    main()
