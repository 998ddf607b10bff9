"""The ``rdm`` command: LightningCLI for ``fit``/``validate`` plus ``sample``, ``evaluate`` and ``export``.

``rdm fit --config configs/digits/dmd.yaml`` trains (and, for the digits default,
first pretrains the cached teacher). The other subcommands work on checkpoints
and sample files:

- ``rdm sample --checkpoint CKPT --prompt P --num-per-prompt N --output DIR``
- ``rdm evaluate --samples DIR/samples.npz``
- ``rdm export --checkpoint CKPT --output DIR``
"""
from __future__ import annotations

import sys
import warnings

import lightning as L
from lightning.pytorch.cli import LightningCLI

TOOL_COMMANDS = ("sample", "evaluate", "export")


class RDMLightningCLI(LightningCLI):
    """LightningCLI in subclass mode for models and data; pretrains the digits teacher when needed."""

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
    """Entry point of ``rdm`` and ``python -m rdm_lightning``; ``argv`` defaults to ``sys.argv[1:]``."""
    command_args = sys.argv[1:] if argv is None else argv
    if not command_args or command_args[0] in ("-h", "--help"):
        print(f"rdm also has: {', '.join(f'rdm {c}' for c in TOOL_COMMANDS)} (each with --help)\n")
    if command_args and command_args[0] in TOOL_COMMANDS:
        from rdm_lightning import tools

        tools.main(command_args)
    else:
        RDMLightningCLI(args=argv)


if __name__ == "__main__":
    main()
