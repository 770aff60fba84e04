"""A damped oscillator with learnable physical constants, integrated with RK4 in torch.

    m x'' + c x' + k x = g(x, x')        g: a small neural correction, starting near zero

``# initial state [B, 2] (position, velocity) -> positions [B, steps]``. The data module simulates the true
system (k = 4, c = 0.5, no correction) from random initial states and adds noise; the model starts from wrong
constants and fits them. The mass ``m`` is a buffer: a fixed constant whose sensitivity is still of interest.
"""

from __future__ import annotations

import lightning as L
import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset


def rk4(acceleration, state: Tensor, dt: float, steps: int) -> Tensor:
    """Integrate ``x'' = acceleration(x, v)`` from ``state [B, 2]``; returns positions ``[B, steps]``."""

    def rhs(s: Tensor) -> Tensor:
        return torch.stack([s[:, 1], acceleration(s[:, 0], s[:, 1])], dim=1)

    positions = []
    for _ in range(steps):
        k1 = rhs(state)
        k2 = rhs(state + dt / 2 * k1)
        k3 = rhs(state + dt / 2 * k2)
        k4 = rhs(state + dt * k3)
        state = state + dt / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
        positions.append(state[:, 0])
    return torch.stack(positions, dim=1)


class DampedOscillator(L.LightningModule):
    """Fits stiffness ``k``, damping ``c`` and a neural correction to observed trajectories.

    Args:
        k_init: initial stiffness.
        c_init: initial damping.
        mass: the mass ``m`` (a buffer, not trained).
        dt: integration time step.
        steps: number of integration steps (length of a trajectory).
        hidden: width of the correction network.
        lr_physics: AdamW learning rate of ``k`` and ``c``.
        lr_network: AdamW learning rate of the correction network.
        weight_decay: weight decay of the correction network, which keeps it from absorbing ``k x`` and ``c v``.
    """

    def __init__(
        self,
        k_init: float = 2.0,
        c_init: float = 0.1,
        mass: float = 1.0,
        dt: float = 0.1,
        steps: int = 40,
        hidden: int = 16,
        lr_physics: float = 0.3,
        lr_network: float = 0.003,
        weight_decay: float = 1.0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.k = nn.Parameter(torch.tensor(k_init))
        self.c = nn.Parameter(torch.tensor(c_init))
        self.register_buffer("m", torch.tensor(mass))
        self.correction = nn.Sequential(nn.Linear(2, hidden), nn.Tanh(), nn.Linear(hidden, 1))
        with torch.no_grad():
            self.correction[2].weight.mul_(0.01)
            self.correction[2].bias.zero_()

    def acceleration(self, x: Tensor, v: Tensor) -> Tensor:
        g = self.correction(torch.stack([x, v], dim=-1)).squeeze(-1)
        return (g - self.c * v - self.k * x) / self.m

    def forward(self, state: Tensor) -> Tensor:
        return rk4(self.acceleration, state, self.hparams.dt, self.hparams.steps)

    def training_step(self, batch, batch_idx):
        state, target = batch
        loss = F.mse_loss(self(state), target)
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch, batch_idx):
        state, target = batch
        self.log("val_loss", F.mse_loss(self(state), target), prog_bar=True)
        self.log_dict({"k": self.k, "c": self.c})

    def configure_optimizers(self):
        h = self.hparams
        return torch.optim.AdamW(
            [
                {"params": [self.k, self.c], "lr": h.lr_physics, "weight_decay": 0.0},
                {"params": self.correction.parameters(), "lr": h.lr_network, "weight_decay": h.weight_decay},
            ]
        )


class OscillatorData(L.LightningDataModule):
    """Noisy trajectories of the true oscillator from random initial states (made here, nothing downloaded).

    Args:
        k: true stiffness.
        c: true damping.
        n_train: number of training trajectories.
        n_val: number of validation trajectories.
        noise: standard deviation of the observation noise.
        dt: integration time step (as the model's).
        steps: trajectory length (as the model's).
        batch_size: samples per batch.
        seed: seed of the data.
    """

    def __init__(
        self,
        k: float = 4.0,
        c: float = 0.5,
        n_train: int = 1024,
        n_val: int = 256,
        noise: float = 0.02,
        dt: float = 0.1,
        steps: int = 40,
        batch_size: int = 64,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()

    def setup(self, stage: str) -> None:
        h = self.hparams
        g = torch.Generator().manual_seed(h.seed)
        states = torch.randn(h.n_train + h.n_val, 2, generator=g)
        with torch.no_grad():
            clean = rk4(lambda x, v: -h.c * v - h.k * x, states, h.dt, h.steps)
        observed = clean + h.noise * torch.randn(clean.shape, generator=g)
        self.train_set = TensorDataset(states[: h.n_train], observed[: h.n_train])
        self.val_set = TensorDataset(states[h.n_train :], observed[h.n_train :])

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_set, batch_size=self.hparams.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=self.hparams.batch_size)
