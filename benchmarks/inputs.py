"""Inputs as targets: the exact DGSM of the Ishigami function against SALib's finite-difference DGSM on the same
base points, and what an input target costs against a parameter target and against finite differences.

    python benchmarks/inputs.py            # N = 4096 base points, medians of 7 interleaved runs
    python benchmarks/inputs.py --quick    # N = 1024, 3 runs

DGSM ν_i = E[(∂f/∂x_i)²] over x uniform on [-π, π]³. SALib (``SALib.sample.finite_diff`` +
``SALib.analyze.dgsm``) estimates it by forward differences with a step of ``delta`` times each input's range;
``per_sample_sensitivities`` with the targets ``args[0][:, ...]`` gives every sample's exact partials in one pass.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import numpy as np
import torch
from torch import Tensor, nn

from lightning_sensitivity import per_sample_sensitivities


class Ishigami(nn.Module):
    def __init__(self, a: float = 7.0, b: float = 0.1) -> None:
        super().__init__()
        self.a = nn.Parameter(torch.tensor(a, dtype=torch.float64))
        self.b = nn.Parameter(torch.tensor(b, dtype=torch.float64))

    def forward(self, x: Tensor) -> Tensor:
        x1, x2, x3 = x.unbind(-1)
        return torch.sin(x1) + self.a * torch.sin(x2) ** 2 + self.b * x3**4 * torch.sin(x1)


def dgsm_table(n: int) -> None:
    from SALib.analyze import dgsm
    from SALib.sample import finite_diff

    problem = {"num_vars": 3, "names": ["x1", "x2", "x3"], "bounds": [[-math.pi, math.pi]] * 3}
    model = Ishigami()
    print(f"DGSM ν_i of the Ishigami function (a = 7, b = 0.1), {n} base points")
    print("| i | exact | SALib, delta = 0.01 | SALib, delta = 0.001 | relative gap, 0.01 | 0.001 |")
    print("|---|---|---|---|---|---|")
    rows = {}
    for delta in (0.01, 0.001):
        x = finite_diff.sample(problem, n, delta=delta, seed=0)
        with torch.no_grad():
            y = model(torch.tensor(x)).numpy()
        rows[delta] = (x[:: problem["num_vars"] + 1], dgsm.analyze(problem, x, y, seed=0)["vi"])
    base = torch.tensor(rows[0.01][0])
    assert np.array_equal(rows[0.01][0], rows[0.001][0])  # the same base points
    sens = per_sample_sensitivities(model, "args[0][:, ...]", (base,))
    for i in range(3):
        exact = float((sens[f"args[0][:, {i}]"] ** 2).mean())
        coarse, fine = float(rows[0.01][1][i]), float(rows[0.001][1][i])
        print(
            f"| {i + 1} | {exact:.5g} | {coarse:.5g} | {fine:.5g} | {abs(coarse - exact) / exact:.2%} | "
            f"{abs(fine - exact) / exact:.3%} |"
        )


def median_time(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def cost_table(repeats: int) -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(16, 256), nn.Tanh(), nn.Linear(256, 256), nn.Tanh(), nn.Linear(256, 4))
    x = torch.randn(2048, 16)

    def forward() -> None:
        with torch.no_grad():
            net(x)

    def finite_differences(k: int) -> None:
        with torch.no_grad():
            for j in range(k):
                for sign in (-1.0, 1.0):
                    moved = x.clone()
                    moved[:, j] += sign * 1e-3
                    net(moved)

    cases = {
        "one parameter target": lambda: per_sample_sensitivities(net, "2.weight[3, 5]", (x,)),
        "one input target": lambda: per_sample_sensitivities(net, "args[0][:, 3]", (x,)),
        "16 input targets": lambda: per_sample_sensitivities(net, "args[0][:, ...]", (x,)),
        "16 inputs, central differences": lambda: finite_differences(16),
    }
    base = median_time(forward, repeats)
    print(
        f"\nCost, MLP 16 -> 256 -> 256 -> 4 (tanh), B = 2048, float32, {torch.get_num_threads()} threads, "
        "time / no-grad forward (medians):"
    )
    print("| case | time / forward |")
    print("|---|---|")
    for name, fn in cases.items():
        print(f"| {name} | {median_time(fn, repeats) / base:.2f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    print(
        f"{time.strftime('%Y-%m-%d')}, torch {torch.__version__}, python benchmarks/inputs.py{' --quick' * args.quick}"
    )
    dgsm_table(1024 if args.quick else 4096)
    cost_table(3 if args.quick else 7)


if __name__ == "__main__":
    main()
