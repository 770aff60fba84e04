"""Shared pieces of the test suite: the reference computation and a zoo of small models."""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch
from torch import Tensor, nn


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


@pytest.fixture
def reference() -> Callable[..., dict[str, Tensor]]:
    return loop_reference


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


@pytest.fixture(params=sorted(ZOO))
def zoo_case(request):
    make_model, make_args, targets, labels = ZOO[request.param]
    torch.manual_seed(0)
    model = make_model().eval()
    return request.param, model, make_args(), targets, labels


# ---- Lightning helpers ----------------------------------------------------------------------------------


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
