"""Shared pieces of the test suite, imported as ``from tests.helpers import ...``: the references that results
are compared with (the per-sample loop of ``torch.autograd.grad``, float64 central differences), small models,
readers of what was logged to TensorBoard, and the LightningModules, data and Trainers of the monitor's tests.
``tests/conftest.py`` holds the fixtures only."""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Callable

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from torch import Tensor, nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, Dataset, TensorDataset

from lightning_sensitivity import SensitivityMonitor, per_sample_sensitivities

# ---- references ----------------------------------------------------------------------------------------------------


def split_label(label: str) -> tuple[str, tuple[int, ...] | None]:
    """``name[i, j]`` -> ``(name, (i, j))``; ``name`` -> ``(name, None)`` (a name may hold brackets itself)."""
    if not label.endswith("]"):
        return label, None
    start = label.rindex("[")
    return label[:start], tuple(int(i) for i in label[start + 1 : -1].split(","))


def loop_reference(module: nn.Module, labels: list[str], args: tuple, kwargs: dict | None = None) -> dict[str, Tensor]:
    """The seed's method: one ``torch.autograd.grad`` call per output element, on a copy of the module.

    ``labels`` are canonical (``name`` or ``name[i, j]``); returns ``{label: tensor shaped like the output}``.
    """
    kwargs = kwargs or {}
    result = {}
    for label in labels:
        name, index = split_label(label)
        clone = copy.deepcopy(module)
        named = [*clone.named_parameters(remove_duplicate=False), *clone.named_buffers(remove_duplicate=False)]
        tensor = dict(named)[name]
        with torch.enable_grad():
            tensor.requires_grad_(True)
            out = clone(*args, **kwargs)
            flat = out.reshape(-1)
            grads = []
            for e in range(flat.numel()):
                (g,) = torch.autograd.grad(flat[e], tensor, retain_graph=True, allow_unused=True)
                g = torch.zeros_like(tensor) if g is None else g
                grads.append(g.reshape(-1)[0] if index is None else g[index])
        result[label] = torch.stack(grads).reshape(out.shape).detach()
    return result


def central_differences(model: nn.Module, label: str, x: Tensor, h: float = 1e-6) -> Tensor:
    """d model(x) / d label by float64 central differences, on a copy of the model (``label``: ``name[i, j]``)."""
    name, index = split_label(label)
    element = () if index is None else index
    outputs = []
    for step in (-h, h):
        moved = copy.deepcopy(model)
        named = [*moved.named_parameters(remove_duplicate=False), *moved.named_buffers(remove_duplicate=False)]
        tensor = dict(named)[name]
        with torch.no_grad():
            tensor[element] += step
        with torch.enable_grad():  # a model may take a derivative of its own (forces from an energy)
            outputs.append(moved(x.clone()).detach())
    return (outputs[1] - outputs[0]) / (2 * h)


#: the grad modes a caller may run the engine under
GRAD_MODES = {"grad": torch.enable_grad, "no_grad": torch.no_grad, "inference_mode": torch.inference_mode}


def quiet(model, targets, args, **kwargs):
    """per_sample_sensitivities with every UserWarning an error: no fallback, no surprise."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        return per_sample_sensitivities(model, targets, args, **kwargs)


def snapshot(module: nn.Module) -> dict:
    """What the engine must leave as it was: state, requires_grad, gradients and training flags."""
    return {
        "state": {k: v.detach().clone() for k, v in module.state_dict(keep_vars=True).items()},
        "requires_grad": {k: p.requires_grad for k, p in module.named_parameters()},
        "grad": {k: None if p.grad is None else p.grad.clone() for k, p in module.named_parameters()},
        "training": [m.training for m in module.modules()],
    }


def assert_untouched(module: nn.Module, before: dict) -> None:
    """``module`` is as ``snapshot`` saw it, bit for bit."""
    after = snapshot(module)
    assert after["state"].keys() == before["state"].keys()
    for key, value in before["state"].items():
        assert torch.equal(after["state"][key], value), key
    assert after["requires_grad"] == before["requires_grad"]
    assert after["training"] == before["training"]
    for key, grad in before["grad"].items():
        assert (grad is None) == (after["grad"][key] is None), key
        if grad is not None:
            assert torch.equal(grad, after["grad"][key]), key


# ---- models --------------------------------------------------------------------------------------------------------


class Scale(nn.Module):
    """The seed problem: ``y = C * x``."""

    def __init__(self, c: float = -5.0):
        super().__init__()
        self.C = nn.Parameter(torch.tensor(c))

    def forward(self, x: Tensor) -> Tensor:
        return self.C * x


class Oscillator(nn.Module):
    """A damped, driven oscillator ``m x'' + c x' + k x = F cos(w t)`` integrated with RK4.

    ``# x0 [B, 2] (position, velocity) -> trajectory [B, T]``. Stiffness ``k`` and damping ``c`` are
    parameters; gravity-like forcing ``F`` and the mass ``m`` are buffers (fixed physical constants).
    """

    def __init__(self, steps: int = 20, dt: float = 0.05):
        super().__init__()
        self.k = nn.Parameter(torch.tensor(4.0))
        self.c = nn.Parameter(torch.tensor(0.3))
        self.register_buffer("m", torch.tensor(1.5))
        self.register_buffer("F", torch.tensor([0.7]))
        self.steps, self.dt = steps, dt

    def rhs(self, t: Tensor, s: Tensor) -> Tensor:
        x, v = s[:, 0], s[:, 1]
        a = (self.F * torch.cos(2.0 * t) - self.c * v - self.k * x) / self.m
        return torch.stack([v, a], dim=1)

    def forward(self, s: Tensor) -> Tensor:
        t = torch.zeros((), dtype=s.dtype, device=s.device)
        out = []
        for _ in range(self.steps):
            k1 = self.rhs(t, s)
            k2 = self.rhs(t + self.dt / 2, s + self.dt / 2 * k1)
            k3 = self.rhs(t + self.dt / 2, s + self.dt / 2 * k2)
            k4 = self.rhs(t + self.dt, s + self.dt * k3)
            s = s + self.dt / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
            t = t + self.dt
            out.append(s[:, 0])
        return torch.stack(out, dim=1)


class Gated(nn.Module):
    def __init__(self, width: int, alpha: float):
        super().__init__()
        self.lin = nn.Linear(width, width)
        self.alpha = nn.Parameter(torch.tensor(alpha))

    def forward(self, x: Tensor) -> Tensor:
        return x + self.alpha * torch.tanh(self.lin(x))


class Blocks(nn.Module):
    """Residual blocks, each with a learnable scalar gate ``alpha`` (for globs)."""

    def __init__(self, width: int = 4, depth: int = 3):
        super().__init__()
        self.blocks = nn.Sequential(*(Gated(width, 0.5 + i) for i in range(depth)))

    def forward(self, x: Tensor) -> Tensor:
        return self.blocks(x)


class ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU(), nn.MaxPool2d(2))
        self.head = nn.Linear(3 * 2 * 2, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x).flatten(1))


class Recurrent(nn.Module):
    def __init__(self, kind: str):
        super().__init__()
        self.rnn = getattr(nn, kind)(3, 4, batch_first=True, num_layers=2)
        self.head = nn.Linear(4, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.rnn(x)[0][:, -1])


class Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.attn(x, x, x, need_weights=False)[0]


class Encoder(nn.Module):
    def __init__(self):
        super().__init__()
        layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        return self.encoder(x, src_key_padding_mask=mask).mean(1)


class Adaptive(nn.Module):
    """Explicit Euler for ``x' = -k x - c x^3`` with data-dependent control flow (``vmap`` cannot batch it)."""

    def __init__(self):
        super().__init__()
        self.k = nn.Parameter(torch.tensor(2.0))
        self.c = nn.Parameter(torch.tensor(0.2))

    def forward(self, x: Tensor) -> Tensor:
        steps = int(10 * self.k.item())  # a Python number from a parameter
        for _ in range(steps):
            x = x + 0.05 * (-self.k * x - self.c * x**3)
            if x.abs().max() > 100:  # data-dependent control flow
                break
        return x


def _mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(5, 16), nn.GELU(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 3))


def _convnet() -> nn.Module:
    net = ConvNet()
    with torch.no_grad():  # non-trivial running statistics
        net.features[1].running_mean.uniform_(-0.5, 0.5)
        net.features[1].running_var.uniform_(0.5, 2.0)
    return net


#: name -> (model factory, input factory, targets given, canonical labels expected)
ZOO: dict[str, tuple[Callable[[], nn.Module], Callable[[], tuple], list[str], list[str]]] = {
    "seed": (Scale, lambda: (torch.arange(10.0),), ["C"], ["C"]),
    "mlp": (
        _mlp,
        lambda: (torch.randn(7, 5),),
        ["0.weight[3, 1]", "2.bias[-1]", "4.weight[2, 15]"],
        ["0.weight[3, 1]", "2.bias[15]", "4.weight[2, 15]"],
    ),
    "conv-bn-eval": (
        _convnet,
        lambda: (torch.randn(4, 2, 4, 4),),
        ["features.0.weight[1, 0, 2, 2]", "features.1.weight[2]", "head.bias[0]"],
        ["features.0.weight[1, 0, 2, 2]", "features.1.weight[2]", "head.bias[0]"],
    ),
    "gru": (
        lambda: Recurrent("GRU"),
        lambda: (torch.randn(3, 5, 3),),
        ["rnn.weight_ih_l0[1, 2]", "rnn.bias_hh_l1[7]"],
        ["rnn.weight_ih_l0[1, 2]", "rnn.bias_hh_l1[7]"],
    ),
    "lstm": (
        lambda: Recurrent("LSTM"),
        lambda: (torch.randn(3, 5, 3),),
        ["rnn.weight_hh_l0[5, 1]", "head.weight[1, 3]"],
        ["rnn.weight_hh_l0[5, 1]", "head.weight[1, 3]"],
    ),
    "attention": (
        Attention,
        lambda: (torch.randn(3, 4, 8),),
        ["attn.in_proj_weight[9, 2]", "attn.out_proj.bias[1]"],
        ["attn.in_proj_weight[9, 2]", "attn.out_proj.bias[1]"],
    ),
    "transformer": (
        Encoder,
        lambda: (torch.randn(3, 4, 8),),
        ["encoder.layers.0.linear1.weight[0, 0]", "encoder.layers.1.norm2.weight[3]"],
        ["encoder.layers.0.linear1.weight[0, 0]", "encoder.layers.1.norm2.weight[3]"],
    ),
    "oscillator": (
        Oscillator,
        lambda: (torch.randn(6, 2),),
        ["k", "c", "m", "F"],
        ["k", "c", "m", "F"],
    ),
    "adaptive-ode": (Adaptive, lambda: (torch.randn(5, 2),), ["k", "c"], ["k", "c"]),
    "glob": (
        Blocks,
        lambda: (torch.randn(5, 4),),
        ["blocks.*.alpha", "blocks.1.lin.weight[0, 3]"],
        ["blocks.0.alpha", "blocks.1.alpha", "blocks.2.alpha", "blocks.1.lin.weight[0, 3]"],
    ),
}


class Wide(nn.Module):
    """An MLP of 16 inputs, two hidden layers of 256 and ``outputs`` outputs."""

    def __init__(self, outputs: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(16, 256), nn.Tanh(), nn.Linear(256, 256), nn.Tanh(), nn.Linear(256, outputs))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class WrongSign(torch.autograd.Function):
    """``sin`` with a jvp of the wrong sign (and a right backward)."""

    @staticmethod
    def forward(x):
        return x.sin()

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_forward(inputs[0])
        ctx.save_for_backward(inputs[0])

    @staticmethod
    def jvp(ctx, tangent):
        (x,) = ctx.saved_tensors
        return -tangent * x.cos()

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return grad * x.cos()


class Dynamics(nn.Module):
    def __init__(self):
        super().__init__()
        self.k = nn.Parameter(torch.tensor(2.0))
        self.lin = nn.Linear(2, 2)

    def forward(self, t: Tensor, y: Tensor) -> Tensor:
        return -self.k * y + 0.1 * torch.tanh(self.lin(y))


class AdjointODE(nn.Module):
    def __init__(self):
        super().__init__()
        self.f = Dynamics()

    def forward(self, y0: Tensor) -> Tensor:
        from torchdiffeq import odeint_adjoint

        t = torch.linspace(0, 1, 5, dtype=y0.dtype)
        options = {"step_size": 0.1}
        return odeint_adjoint(self.f, y0, t, method="rk4", options=options).permute(1, 0, 2)  # [B, T, 2]


class Potential(nn.Module):
    """Per-atom energies from positions ``R [B, atoms, 3]``; returns the forces ``-dE/dR`` flattened, ``[B, 3 atoms]``.
    ``unused`` reaches nothing, and ``net.2.bias`` shifts the energy only, so the forces do not depend on it."""

    def __init__(self, activation: type[nn.Module] = nn.SiLU) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(3, 8), activation(), nn.Linear(8, 1))
        self.unused = nn.Parameter(torch.tensor([0.5]))

    def forward(self, positions: Tensor) -> Tensor:
        if not positions.requires_grad:
            positions = positions.requires_grad_()
        energy = self.net(positions).sum((1, 2))
        (gradient,) = torch.autograd.grad(energy.sum(), positions, create_graph=self.training)
        return -gradient.flatten(1)


# ---- what was logged -----------------------------------------------------------------------------------------------


def read_events(log_dir) -> tuple[dict, dict]:
    """Every histogram and scalar event under ``log_dir``: ``({tag: [HistogramEvent]}, {tag: [ScalarEvent]})``."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir), size_guidance={"histograms": 0, "scalars": 0})
    acc.Reload()
    tags = acc.Tags()
    return (
        {tag: acc.Histograms(tag) for tag in tags["histograms"]},
        {tag: acc.Scalars(tag) for tag in tags["scalars"]},
    )


def read_text_and_images(log_dir) -> tuple[dict[str, list[tuple[int, str]]], dict[str, list]]:
    """Text summaries ``{tag: [(step, markdown)]}`` and images ``{tag: [ImageEvent]}`` under ``log_dir``."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir), size_guidance={"tensors": 0, "images": 0})
    acc.Reload()
    tags = acc.Tags()
    texts = {
        tag: [(e.step, e.tensor_proto.string_val[0].decode()) for e in acc.Tensors(tag)]
        for tag in tags["tensors"]
        if acc.SummaryMetadata(tag).plugin_data.plugin_name == "text"
    }
    return texts, {tag: acc.Images(tag) for tag in tags["images"]}


def decoded(image_event):
    """The RGB pixels of an image read back from TensorBoard."""
    import io

    import numpy as np
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(image_event.encoded_image_string)).convert("RGB"))


def expected_stats(values: Tensor) -> dict[str, float]:
    """What the histogram of ``values`` must hold: non-finite values left out and counted."""
    values = values.detach().double().reshape(-1)
    finite = values[torch.isfinite(values)]
    return {
        "num": float(finite.numel()),
        "sum": float(finite.sum()),
        "sum_squares": float((finite * finite).sum()),
        "min": float(finite.min()),
        "max": float(finite.max()),
        "nonfinite": float((~torch.isfinite(values)).sum()),
        "mean": float(finite.mean()),
        "std": float(finite.std()),
        "abs_mean": float(finite.abs().mean()),
        "mean_square": float((finite * finite).mean()),
    }


def assert_histogram(event, stats: dict[str, float], rel: float = 1e-5) -> None:
    h = event.histogram_value
    assert h.num == stats["num"]
    assert sum(h.bucket) == h.num
    assert list(h.bucket_limit) == sorted(h.bucket_limit)
    for key in ("sum", "sum_squares", "min", "max"):
        assert getattr(h, key) == pytest.approx(stats[key], rel=rel, abs=1e-6), key


# ---- LightningModules, data and Trainers ---------------------------------------------------------------------------


class Physics(L.LightningModule):
    """``y = C * x[:, :1] + net(x)``, so ``dy/dC = x[:, :1]`` for every output element."""

    def __init__(self, outputs: int = 3):
        super().__init__()
        self.C = nn.Parameter(torch.tensor(-5.0))
        self.net = nn.Sequential(nn.Linear(2, 8), nn.Tanh(), nn.Linear(8, outputs))
        self.training_steps = 0

    def forward(self, x: Tensor) -> Tensor:
        return self.C * x[:, :1] + self.net(x)

    def training_step(self, batch, batch_idx):
        self.training_steps += 1
        x, y = batch
        return F.mse_loss(self(x), y)

    def validation_step(self, batch, batch_idx, dataloader_idx=0):
        x, y = batch
        self.log("val_loss", F.mse_loss(self(x), y))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def physics_data(n: int, outputs: int = 3, seed: int = 0) -> TensorDataset:
    """``(x [n, 2], y [n, outputs])``, standard normal from ``seed``."""
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(n, 2, generator=g), torch.randn(n, outputs, generator=g))


class DictData(Dataset):
    """Samples as dicts: ``{"x": [4], "y": a class in 0..2}``."""

    def __init__(self, n: int, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, 4, generator=g)
        self.y = torch.randint(0, 3, (n,), generator=g)

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return {"x": self.x[i], "y": self.y[i]}


def trainer(tmp_path, monitor: SensitivityMonitor | list, **kwargs) -> L.Trainer:
    """A quiet Trainer of one epoch of 2 training batches, with `monitor` (or a list of callbacks) and a
    TensorBoard logger under ``tmp_path/tb``; ``kwargs`` override."""
    defaults = dict(
        max_epochs=1,
        limit_train_batches=2,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        logger=TensorBoardLogger(tmp_path, name="tb"),
        callbacks=monitor if isinstance(monitor, list) else [monitor],
    )
    defaults.update(kwargs)
    return L.Trainer(**defaults)


def loaders(n_val: int = 16) -> tuple[DataLoader, DataLoader]:
    """Training and validation loaders of `physics_data`, batches of 8."""
    return DataLoader(physics_data(16), batch_size=8), DataLoader(physics_data(n_val, seed=1), batch_size=8)


class Counted(Physics):
    """Counts every evaluation of ``forward`` (the step's and the monitor's)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(2, 8), nn.Tanh(), nn.Linear(8, 3))
        self.forwards = 0

    def forward(self, x: Tensor) -> Tensor:
        self.forwards += 1
        return super().forward(x)


#: the time points of `Decay`'s output
T = 6


class Decay(L.LightningModule):
    """``y[i, j] = A exp(-k t_j) x_i + b x_i`` over ``t = linspace(0, 1, T)``:
    ``dy/dA = exp(-k t) x``, ``dy/dk = -A t exp(-k t) x``, ``dy/db = x``."""

    def __init__(self, a: float = 2.0, k: float = 0.7, b: float = 0.3):
        super().__init__()
        self.A = nn.Parameter(torch.tensor(a))
        self.k = nn.Parameter(torch.tensor(k))
        self.b = nn.Parameter(torch.tensor(b))
        self.register_buffer("t", torch.linspace(0, 1, T))

    def forward(self, x: Tensor) -> Tensor:
        return self.A * torch.exp(-self.k * self.t) * x + self.b * x  # x [B, 1] -> y [B, T]

    def validation_step(self, batch, batch_idx, dataloader_idx=0):
        self.log("val", self(batch[0]).mean())

    test_step = validation_step

    def predict_step(self, batch, batch_idx, dataloader_idx=0):
        return self(batch[0])

    def analytic(self, x: Tensor) -> dict[str, Tensor]:
        a, k, t, x = self.A.item(), self.k.item(), self.t.double(), x.double()
        decay = torch.exp(-k * t)
        return {"A": decay * x, "k": -a * t * decay * x, "b": x.expand(-1, T)}


def inputs(n: int = 20, seed: int = 0) -> Tensor:
    """``x [n, 1]`` for `Decay`, standard normal from ``seed``."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, generator=g, dtype=torch.float64).float()


def make_trainer(tmp_path, monitor, **kwargs) -> L.Trainer:
    """A quiet Trainer with ``monitor`` and a TensorBoard logger under ``tmp_path/tb``; ``kwargs`` override."""
    defaults = dict(
        logger=TensorBoardLogger(tmp_path, name="tb"),
        callbacks=[monitor],
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    return L.Trainer(**{**defaults, **kwargs})


def run_decay(tmp_path, monitor, x=None, how="validate", **kwargs) -> L.Trainer:
    """``Decay`` run on ``x`` (default: ``inputs()``) in batches of 8 by ``make_trainer(...).<how>``."""
    x = inputs() if x is None else x
    trainer = make_trainer(tmp_path, monitor, **kwargs)
    getattr(trainer, how)(Decay(), DataLoader(TensorDataset(x), batch_size=8))
    return trainer


def report_of(abs_mean: list[float], std: list[float], corr: Tensor, collinearity: float, step: int, profiles=None):
    """A report of targets ``A``, ``k``, ``b`` with these μ*, σ and correlation (the ranking follows μ*), and
    ``profiles`` (``{dataloader_idx: {label: {"mean", "abs_mean"}}}``)."""
    from lightning_sensitivity._report import Report

    labels = ["A", "k", "b"]
    order = sorted(range(3), key=lambda i: -abs_mean[i] if not math.isnan(abs_mean[i]) else math.inf)
    stats = {
        label: {"count": 10, "nonfinite": 0, "mean": 0.5, "std": std[i], "abs_mean": abs_mean[i],
                "mean_square": 1.0, "min": -1.0, "max": 1.0, "rank": order.index(i) + 1}
        for i, label in enumerate(labels)
    }  # fmt: skip
    return Report(step, labels, stats, corr, collinearity, [], profiles or {})


#: a scalar constant held as a 1-element tensor (FSDP2 refuses 0-dim parameters); elements of net.0.weight in
#: rank 0's shard (rows 0-3) and in rank 1's (rows 4-7); net.2 lives in the root group
FSDP_TARGETS = [
    "k[0]",
    "net.0.weight[3, 1]",
    "net.0.weight[6, 0]",
    "net.2.bias[1]",
    "net.2.bias[2]",
    "net.2.weight[2, 7]",
]


# ---- inputs as targets ----------------------------------------------------------------------------------


class Ishigami(nn.Module):
    """``f = sin x1 + a sin² x2 + b x3⁴ sin x1``, the standard test function of sensitivity analysis."""

    def __init__(self, a: float = 7.0, b: float = 0.1) -> None:
        super().__init__()
        self.a = nn.Parameter(torch.tensor(a, dtype=torch.float64))
        self.b = nn.Parameter(torch.tensor(b, dtype=torch.float64))

    def forward(self, x: Tensor) -> Tensor:
        x1, x2, x3 = x.unbind(-1)
        return torch.sin(x1) + self.a * torch.sin(x2) ** 2 + self.b * x3**4 * torch.sin(x1)


def ishigami_partials(x: Tensor, a: float = 7.0, b: float = 0.1) -> list[Tensor]:
    x1, x2, x3 = x.unbind(-1)
    return [torch.cos(x1) * (1 + b * x3**4), 2 * a * torch.sin(x2) * torch.cos(x2), 4 * b * x3**3 * torch.sin(x1)]


def points(n: int = 64, seed: int = 0) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(n, 3, generator=g, dtype=torch.float64) * 2 - 1) * math.pi
