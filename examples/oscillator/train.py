"""Fit a damped oscillator's physical constants with LightningCLI while SensitivityMonitor watches them.

    python examples/oscillator/train.py fit --config examples/oscillator/config.yaml

At the end it prints, on rank zero, the last validation epoch's sensitivities ranked by importance, the
correlation of the sensitivities to ``k`` and ``c`` (can the data tell them apart?), where along the trajectory
each constant matters most, and the ``tensorboard`` command that shows the histograms and pictures.
"""

from __future__ import annotations

import sys
from pathlib import Path

from lightning.pytorch.cli import LightningCLI

sys.path.insert(0, str(Path(__file__).resolve().parent))  # run as a script from anywhere

from model import DampedOscillator, OscillatorData  # noqa: E402

from lightning_sensitivity import SensitivityMonitor  # noqa: E402


def sensitivity_table(monitor: SensitivityMonitor) -> str:
    """The last validation epoch's statistics from ``monitor.summary()``, ranked by mean |dy/dθ| (Morris' μ*)."""
    summary = monitor.summary()
    stats = ("rank", "mean", "std", "abs_mean", "mean_square")
    width = max([len("target"), *map(len, summary)])
    header = ("rank", "mean", "std", "mean |dy/dθ|", "mean square")
    lines = [f"{'target':<{width}}  " + "  ".join(f"{h:>12}" for h in header)]
    for target, row in sorted(summary.items(), key=lambda item: item[1]["rank"]):
        lines.append(f"{target:<{width}}  " + "  ".join(f"{row[s]:>12.5g}" for s in stats))
    return "\n".join(lines)


def identifiability(monitor: SensitivityMonitor, model, a: str, b: str) -> list[str]:
    """The correlation of the sensitivities to ``a`` and ``b``, and the most correlated pair of all targets. Two
    constants whose sensitivities correlate near ±1 move the trajectory the same way: the data determine only a
    combination of them (for k and m, the ratio k/m), not each one."""
    labels, matrix = monitor.correlation()
    fitted = {name for name, p in model.named_parameters() if p.requires_grad}

    def role(label: str) -> str:
        return "fitted" if label.split("[")[0] in fitted else "fixed"

    def verdict(x: str, y: str, r: float) -> str:
        if abs(r) <= 0.9:
            return "the trajectory tells them apart"
        return f"they move the trajectory alike: only a combination of {x} and {y} is determined by this data"

    lines = []
    if a in labels and b in labels:
        r = float(matrix[labels.index(a), labels.index(b)])
        lines.append(f"Correlation of the sensitivities to {a} and {b} (both fitted): {r:+.3f} ({verdict(a, b, r)})")
    pairs = [(abs(float(matrix[i, j])), i, j) for i in range(len(labels)) for j in range(i)]
    finite = [p for p in pairs if p[0] == p[0]]  # NaN where a target had no effect
    if finite:
        _, i, j = max(finite)
        x, y, r = labels[j], labels[i], float(matrix[i, j])
        lines.append(
            f"Most correlated pair: {x} ({role(x)}) and {y} ({role(y)}): {r:+.3f} ({verdict(x, y, r)}"
            + (
                f"; {x if role(x) == 'fixed' else y} is held fixed here, so the fit is not affected)"
                if "fixed" in (role(x), role(y))
                else ")"
            )
        )
    return lines


def memory_of_the_start(monitor: SensitivityMonitor) -> list[str]:
    """How fast the system forgets where it started: the profile of d x(t) / d x(0), each sample's position with
    respect to its own initial displacement (the input target ``batch[0][:, 0]``)."""
    if not monitor.profiles_enabled or "batch[0][:, 0]" not in monitor.labels:
        return []
    curve = monitor.profiles()["batch[0][:, 0]"]["abs_mean"].reshape(-1)
    return [
        f"Memory of the start: mean |dx(t)/dx(0)| is {float(curve[0]):.3f} at the first step and "
        f"{float(curve[-1]):.3f} at the last of {curve.numel()}: the damping c makes the trajectory forget x(0)"
    ]


def uncertainty(monitor: SensitivityMonitor, model) -> list[str]:
    """The fitted constants with their standard errors (linearised, from the information of the validation data,
    the other targets held fixed), the correlation of their estimates, and the identifiability verdicts."""
    fitted = [label for label in ("k", "c") if label in monitor.labels]
    if monitor.noise_std is None or len(fitted) < 2:
        return []
    labels, cov = monitor.covariance(targets=fitted)
    errors = cov.diagonal().sqrt()
    values = [float(getattr(model, label).detach()) for label in labels]
    shown = ", ".join(f"{label} = {v:.3f} ± {float(e):.2g}" for label, v, e in zip(labels, values, errors, strict=True))
    r = float(cov[0, 1] / (errors[0] * errors[1]))
    lines = [
        f"Fitted: {shown} (1σ, from the validation data with noise_std={monitor.noise_std:g})",
        f"Correlation of the estimates of {labels[0]} and {labels[1]}: {r:+.3f} (of the estimates, not of the "
        "sensitivities)",
        "Identifiability of the physical constants k, c and m (m is fixed here, so a verdict about it does not "
        "affect the fit):",
    ]
    physical = [label for label in ("k", "c", "m") if label in monitor.labels]
    return lines + [f"  - {verdict}" for verdict in monitor.identifiability(targets=physical)["verdicts"]]


def profile_peaks(monitor: SensitivityMonitor) -> list[str]:
    """Where along the trajectory each constant matters most (from ``monitor.profiles()``)."""
    lines = []
    for target, profile in monitor.profiles().items():
        curve = profile["abs_mean"].reshape(-1)
        if curve.numel() > 1 and "[" not in target:
            peak = int(curve.argmax())
            lines.append(f"  {target}: mean |d(position)/d{target}| peaks at time step {peak} of {curve.numel()}")
    return lines


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
        print("Per-sample sensitivities d(position)/d(target), last validation epoch, ranked:")
        if not monitors:
            print("(no SensitivityMonitor configured)")
            return
        monitor = monitors[0]
        print(sensitivity_table(monitor))
        for line in identifiability(monitor, model, "k", "c"):
            print(line)
        for line in uncertainty(monitor, model):
            print(line)
        for line in memory_of_the_start(monitor):
            print(line)
        if monitor.profiles_enabled:
            print("Profiles along the trajectory:")
            print("\n".join(profile_peaks(monitor)))
        if trainer.logger is not None and trainer.logger.log_dir is not None:
            log_dir = Path(trainer.logger.log_dir).resolve()
            print()
            print(f"Histograms and pictures: tensorboard --logdir {log_dir}")
            print(
                "then open http://localhost:6006: HISTOGRAMS (tags sensitivity/<target>), IMAGES (ranking, "
                "correlation, profiles; with the plots extra) and TEXT (the ranked table, sensitivity/summary)."
            )

    def after_fit(self) -> None:
        self.report()

    def after_validate(self) -> None:
        self.report()


def main(args=None) -> None:
    SensitivityCLI(DampedOscillator, OscillatorData, args=args)


if __name__ == "__main__":
    main()
