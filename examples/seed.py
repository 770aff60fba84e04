"""The seed problem in plain PyTorch, no Lightning: per-sample derivatives with per_sample_sensitivities,
checked against the per-sample loop of torch.autograd.grad.

    python examples/seed.py
"""

from __future__ import annotations

import time

import torch
from torch import Tensor, nn

from lightning_sensitivity import per_sample_sensitivities


class Scale(nn.Module):
    """``y = C * x``; ``dy/dC = x``."""

    def __init__(self) -> None:
        super().__init__()
        self.C = nn.Parameter(torch.tensor(-5.0))

    def forward(self, x: Tensor) -> Tensor:
        return self.C * x


class Projectile(nn.Module):
    """Range of a projectile with quadratic drag, by explicit Euler steps, for launch speeds and angles.

    ``# launch [B, 2] (speed, angle) -> horizontal distance after `steps` steps [B]``. Gravity ``g`` is a
    buffer and the drag coefficient ``drag`` a parameter: both are scalars a user may want sensitivities for.
    """

    def __init__(self, steps: int = 100, dt: float = 0.02) -> None:
        super().__init__()
        self.drag = nn.Parameter(torch.tensor(0.05))
        self.register_buffer("g", torch.tensor(9.81))
        self.steps, self.dt = steps, dt

    def forward(self, launch: Tensor) -> Tensor:
        speed, angle = launch[:, 0], launch[:, 1]
        x = torch.zeros_like(speed)
        vx, vy = speed * torch.cos(angle), speed * torch.sin(angle)
        for _ in range(self.steps):
            v = torch.sqrt(vx * vx + vy * vy)
            vx, vy = vx - self.dt * self.drag * v * vx, vy - self.dt * (self.g + self.drag * v * vy)
            x = x + self.dt * vx
        return x


def loop_of_autograd_grad(module: nn.Module, name: str, x: Tensor) -> Tensor:
    """The seed's method: one backward pass per sample."""
    tensor = dict([*module.named_parameters(), *module.named_buffers()])[name]
    was = tensor.requires_grad
    tensor.requires_grad_(True)
    y = module(x)
    grads = torch.stack([torch.autograd.grad(y[i], tensor, retain_graph=True)[0] for i in range(len(y))])
    tensor.requires_grad_(was)
    return grads


def main() -> None:
    x = torch.arange(10.0)
    sens = per_sample_sensitivities(Scale(), "C", (x,))
    print("y = C * x with C = -5:  dy/dC =", sens["C"].tolist())
    assert torch.equal(sens["C"], x)

    torch.manual_seed(0)
    model = Projectile().double()
    launch = torch.stack([torch.rand(128) * 20 + 5, torch.rand(128) * 1.2 + 0.1], dim=1).double()
    start = time.perf_counter()
    sens = per_sample_sensitivities(model, ["drag", "g"], (launch,))
    forward_time = time.perf_counter() - start
    start = time.perf_counter()
    reference = {name: loop_of_autograd_grad(model, name, launch) for name in ("drag", "g")}
    loop_time = time.perf_counter() - start
    for name in ("drag", "g"):
        error = (sens[name] - reference[name]).abs().max().item()
        print(f"d distance / d {name:<4}: first samples {sens[name][:3].tolist()}, max |error| vs loop {error:.2e}")
        assert error < 1e-10
    print(f"128 samples, 2 targets: forward mode {forward_time:.3f} s, loop of autograd.grad {loop_time:.3f} s")


if __name__ == "__main__":
    main()
