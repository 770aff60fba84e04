"""Fit a damped oscillator's physical constants with LightningCLI while SensitivityMonitor watches them.

    python examples/oscillator/train.py fit --config examples/oscillator/config.yaml

At the end it prints, on rank zero, a table of the last validation epoch's sensitivities and the
``tensorboard`` command that shows their histograms.
"""

from __future__ import annotations

import sys
from pathlib import Path

from lightning.pytorch.cli import LightningCLI

sys.path.insert(0, str(Path(__file__).resolve().parent))  # run as a script from anywhere

from model import DampedOscillator, OscillatorData  # noqa: E402

from lightning_sensitivity import SensitivityMonitor  # noqa: E402


def sensitivity_table(trainer) -> str:
    """The last validation epoch's ``sensitivity/<target>/{mean,std,abs_mean}`` as a text table."""
    stats = ("mean", "std", "abs_mean")
    targets = {}
    for key, value in trainer.callback_metrics.items():
        parts = key.split("/")
        if parts[0] == "sensitivity" and parts[-1] in stats:
            targets.setdefault("/".join(parts[1:-1]), {})[parts[-1]] = float(value)
    width = max([len("target"), *map(len, targets)])
    lines = [f"{'target':<{width}}  {'mean':>12}  {'std':>12}  {'mean |dy/dθ|':>12}"]
    for target, row in targets.items():
        lines.append(f"{target:<{width}}  " + "  ".join(f"{row.get(s, float('nan')):>12.5g}" for s in stats))
    return "\n".join(lines)


class SensitivityCLI(LightningCLI):
    """LightningCLI that reports the sensitivities after ``fit`` and ``validate``."""

    def report(self) -> None:
        trainer = self.trainer
        if not trainer.is_global_zero:
            return
        monitors = [cb for cb in trainer.callbacks if isinstance(cb, SensitivityMonitor)]
        model, data = self.model, self.datamodule
        print()
        print(
            f"Fitted constants: k = {model.k.item():.4f} (true {data.hparams.k}), "
            f"c = {model.c.item():.4f} (true {data.hparams.c})"
        )
        print("Per-sample sensitivities d(position)/d(target), last validation epoch:")
        print(sensitivity_table(trainer) if monitors else "(no SensitivityMonitor configured)")
        if trainer.logger is not None and trainer.logger.log_dir is not None:
            log_dir = Path(trainer.logger.log_dir).resolve()
            print()
            print(f"Histograms: tensorboard --logdir {log_dir}")
            print("then open http://localhost:6006 and the HISTOGRAMS tab (tags sensitivity/<target>).")

    def after_fit(self) -> None:
        self.report()

    def after_validate(self) -> None:
        self.report()


def main(args=None) -> None:
    SensitivityCLI(DampedOscillator, OscillatorData, args=args)


if __name__ == "__main__":
    main()
