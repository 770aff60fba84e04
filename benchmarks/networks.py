"""Benchmark: the engine on real networks against hand-written torch.func and dual numbers.

    python benchmarks/networks.py            # every table (about 15 minutes on 1 CPU thread)
    python benchmarks/networks.py --quick    # fewer repetitions, smaller batches, no memory table

Networks, written in plain torch (torchvision is not needed):

- convnet      a ResNet-style network: a conv-BN-ReLU stem and eight residual blocks of two 3x3 conv-BN layers
               (32 -> 256 channels, 1x1 conv-BN shortcuts), global average pooling, a linear head; 64 x 64 RGB
- transformer  two pre-norm encoder layers (LayerNorm, attention written with matmul and softmax, a GELU MLP),
               width 128, 4 heads, 64 tokens of 16 features, a linear head on the mean token
- mlp          the MLP of benchmarks/engine.py, 64 -> 512 -> 512 -> 8 (tanh)
- oscillator   the damped, driven oscillator of the test suite, 20 RK4 steps (its 4 scalars: k, c, m, F)

Methods, each computing d y / d target for every sample and output element:

- forward      a no-grad forward pass (the unit of every time)
- engine       lightning_sensitivity.per_sample_sensitivities
- jvp          hand-written torch.func.jvp (one target) or vmap over jvp with one-hot tangents (K targets)
- dual         hand-written torch.autograd.forward_ad dual numbers, one pass per target

Targets: one early in the network (K = 1), and K = 8 (4 for the oscillator). Every time is a median over
repetitions in which the methods run interleaved, their order rotating; the ratios are what counts on a shared
machine. Peak memory is measured in a fresh process per method (VmHWM on Linux, or the CUDA allocator's peak).
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.autograd.forward_ad as fwAD
from torch import Tensor, nn
from torch.func import functional_call, jvp, vmap
from torch.nn import functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import engine  # noqa: E402  (the MLP of the other benchmark)

from lightning_sensitivity import per_sample_sensitivities  # noqa: E402

# ---- networks --------------------------------------------------------------------------------------------


class Block(nn.Module):
    """A residual block: conv-BN-ReLU, conv-BN, plus the input (through a 1x1 conv-BN when the shape changes)."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: Tensor) -> Tensor:
        y = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(y)) + self.shortcut(x))


class ConvNet(nn.Module):
    def __init__(self, widths: tuple[int, ...] = (32, 64, 128, 256), classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, widths[0], 3, 1, 1, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU())
        blocks, cin = [], widths[0]
        for i, width in enumerate(widths):
            blocks += [Block(cin, width, 1 if i == 0 else 2), Block(width, width, 1)]
            cin = width
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Linear(cin, classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.blocks(self.stem(x)).mean((2, 3)))


class Attention(nn.Module):
    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x: Tensor) -> Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(x).reshape(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        weights = torch.softmax(q @ k.transpose(-2, -1) / (d // self.heads) ** 0.5, dim=-1)
        return self.proj((weights @ v).transpose(1, 2).reshape(b, t, d))


class EncoderLayer(nn.Module):
    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(width)
        self.attn = Attention(width, heads)
        self.norm2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class Transformer(nn.Module):
    def __init__(self, features: int = 16, width: int = 128, heads: int = 4, depth: int = 2, out: int = 4) -> None:
        super().__init__()
        self.embed = nn.Linear(features, width)
        self.layers = nn.Sequential(*(EncoderLayer(width, heads) for _ in range(depth)))
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, out)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.norm(self.layers(self.embed(x))).mean(1))


class Oscillator(nn.Module):
    """``m x'' + c x' + k x = F cos(2 t)`` by 20 RK4 steps, as in tests/conftest.py: ``x0 [B, 2] -> x [B, 20]``."""

    def __init__(self, steps: int = 20, dt: float = 0.05) -> None:
        super().__init__()
        self.k = nn.Parameter(torch.tensor(4.0))
        self.c = nn.Parameter(torch.tensor(0.3))
        self.register_buffer("m", torch.tensor(1.5))
        self.register_buffer("F", torch.tensor([0.7]))
        self.steps, self.dt = steps, dt

    def rhs(self, t: Tensor, s: Tensor) -> Tensor:
        x, v = s[:, 0], s[:, 1]
        return torch.stack([v, (self.F * torch.cos(2.0 * t) - self.c * v - self.k * x) / self.m], dim=1)

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


@dataclass
class Case:
    make: Callable[[], nn.Module]
    inputs: Callable[[bool], Tensor]  # quick -> a batch
    one: str  # one target early in the network
    several: list[str]  # K targets


CASES: dict[str, Case] = {
    "convnet": Case(
        ConvNet,
        lambda quick: torch.randn(4 if quick else 8, 3, 64, 64),
        "stem.0.weight[5, 1, 1, 2]",
        [
            "stem.0.weight[5, 1, 1, 2]",
            "stem.0.weight[17, 0, 2, 0]",
            "stem.0.weight[30, 2, 0, 1]",
            "stem.1.weight[3]",
            "blocks.0.conv1.weight[7, 12, 1, 1]",
            "blocks.0.conv1.weight[21, 3, 0, 2]",
            "blocks.0.conv2.weight[0, 31, 2, 2]",
            "blocks.1.bn1.bias[9]",
        ],
    ),
    "transformer": Case(
        Transformer,
        lambda quick: torch.randn(8 if quick else 16, 64, 16),
        "layers.0.attn.qkv.weight[5, 3]",
        [
            "layers.0.attn.qkv.weight[5, 3]",
            "layers.0.attn.qkv.weight[200, 77]",
            "layers.0.attn.qkv.weight[300, 1]",
            "layers.0.attn.proj.weight[12, 34]",
            "layers.0.norm2.weight[8]",
            "layers.0.mlp.0.weight[400, 5]",
            "layers.0.mlp.0.bias[17]",
            "layers.0.mlp.2.weight[60, 300]",
        ],
    ),
    "mlp": Case(engine.make_model, lambda quick: torch.randn(256, 64), engine.targets(1)[0], engine.targets(8)),
    "oscillator": Case(Oscillator, lambda quick: torch.randn(256, 2), "k", ["k", "c", "m", "F[0]"]),
}


# ---- methods: each returns sensitivities [K, B, *out] --------------------------------------------------------


def parse(label: str) -> tuple[str, tuple[int, ...]]:
    name, _, index = label.partition("[")
    return name, tuple(int(i) for i in index.rstrip("]").split(",")) if index else ()


def one_hot(model: nn.Module, labels: list[str]) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """The targets' tensors (detached) and their one-hot tangents ``{name: [K, *shape]}``."""
    named = dict(model.named_parameters()) | dict(model.named_buffers())
    parsed = [parse(label) for label in labels]
    primals = {name: named[name].detach() for name, _ in parsed}
    tangents = {name: p.new_zeros((len(labels), *p.shape)) for name, p in primals.items()}
    for k, (name, index) in enumerate(parsed):
        tangents[name][(k, *index)] = 1
    return primals, tangents


def method_engine(model: nn.Module, x: Tensor, labels: list[str]) -> Tensor:
    return torch.stack(list(per_sample_sensitivities(model, labels, (x,)).values()))


def method_jvp(model: nn.Module, x: Tensor, labels: list[str]) -> Tensor:
    primals, tangents = one_hot(model, labels)

    def tangent_of_output(tangent: dict[str, Tensor]) -> Tensor:
        return jvp(lambda p: functional_call(model, p, (x,)), (primals,), (tangent,))[1]

    if len(labels) == 1:
        return tangent_of_output({name: t[0] for name, t in tangents.items()})[None]
    return vmap(tangent_of_output)(tangents)


def method_dual(model: nn.Module, x: Tensor, labels: list[str]) -> Tensor:
    primals, tangents = one_hot(model, labels)
    out = []
    for k, label in enumerate(labels):
        name, _ = parse(label)
        with fwAD.dual_level():
            y = functional_call(model, {name: fwAD.make_dual(primals[name], tangents[name][k])}, (x,))
            out.append(fwAD.unpack_dual(y).tangent)
    return torch.stack(out)


METHODS: dict[str, Callable[[nn.Module, Tensor, list[str]], Tensor]] = {
    "engine": method_engine,
    "jvp": method_jvp,
    "dual": method_dual,
}


def setup(name: str, quick: bool, device: str) -> tuple[nn.Module, Tensor]:
    torch.manual_seed(0)
    case = CASES[name]
    model = case.make().to(device).eval()
    if isinstance(model, ConvNet):  # non-trivial running statistics
        with torch.no_grad():
            for module in model.modules():
                if isinstance(module, nn.BatchNorm2d):
                    module.running_mean.uniform_(-0.2, 0.2)
                    module.running_var.uniform_(0.5, 2.0)
    torch.manual_seed(1)
    return model, case.inputs(quick).to(device)


# ---- timing ----------------------------------------------------------------------------------------------


def synchronise(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def interleaved(calls: dict[str, Callable[[], object]], repeats: int, device: str) -> dict[str, float]:
    """Median seconds per call, the calls interleaved in each repetition with a rotating start."""
    names = list(calls)
    for name in names:  # warm-up
        calls[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    gc.disable()
    try:
        for r in range(repeats):
            for name in names[r % len(names) :] + names[: r % len(names)]:
                gc.collect()
                synchronise(device)
                start = time.perf_counter()
                calls[name]()
                synchronise(device)
                times[name].append(time.perf_counter() - start)
    finally:
        gc.enable()
    return {name: statistics.median(ts) for name, ts in times.items()}


def fmt(value: float | None, digits: int = 2) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def table_times(names: list[str], repeats: int, quick: bool, device: str) -> None:
    print("\n## Time / no-grad forward (medians of interleaved runs), and the engine's ratio to each method")
    head = ["network", "K", "forward ms", "engine", "jvp", "dual", "engine / jvp", "engine / dual", "max abs diff"]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for name in names:
        model, x = setup(name, quick, device)
        case = CASES[name]
        for labels in ([case.one], case.several):
            with torch.no_grad():
                calls: dict[str, Callable[[], object]] = {"forward": lambda: model(x)}
                for method, f in METHODS.items():
                    calls[method] = lambda f=f: f(model, x, labels)
                med = interleaved(calls, repeats, device)
                gap = (method_engine(model, x, labels) - method_jvp(model, x, labels)).abs().max().item()
            r = {method: t / med["forward"] for method, t in med.items()}
            row = [
                name,
                str(len(labels)),
                fmt(med["forward"] * 1e3, 1),
                fmt(r["engine"]),
                fmt(r["jvp"]),
                fmt(r["dual"]),
                fmt(r["engine"] / r["jvp"]),
                fmt(r["engine"] / r["dual"]),
                f"{gap:.1e}",
            ]
            print("| " + " | ".join(row) + " |", flush=True)


def peak_memory_mib(name: str, method: str, k: int, quick: bool, device: str) -> float:
    """Peak memory a method adds over what the process holds before it, in a fresh process."""
    command = [sys.executable, os.path.abspath(__file__), "--memory-of", name, method, str(k), "--device", device]
    out = subprocess.run(command + (["--quick"] if quick else []), capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def measure_memory(name: str, method: str, k: int, quick: bool, device: str) -> None:
    model, x = setup(name, quick, device)
    case = CASES[name]
    labels = [case.one] if k == 1 else case.several
    with torch.no_grad():
        model(x)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        with open("/proc/self/clear_refs", "w") as f:  # resets VmHWM to the present RSS
            f.write("5")
        before = _status("VmRSS:")
    with torch.no_grad():
        METHODS[method](model, x, labels)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        print((torch.cuda.max_memory_allocated() - before) / 2**20)
    else:
        print((_status("VmHWM:") - before) / 2**20)


def _status(key: str) -> int:
    """A line of /proc/self/status, in bytes."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key))


def table_memory(names: list[str], quick: bool, device: str) -> None:
    print("\n## Peak memory added (MiB, a fresh process each)")
    head = ["network", "K", "engine", "jvp", "dual"]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for name in names:
        for k in (1, len(CASES[name].several)):
            row = [name, str(k)] + [fmt(peak_memory_mib(name, m, k, quick, device), 0) for m in METHODS]
            print("| " + " | ".join(row) + " |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repetitions, smaller batches, no memory table")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1: steadier timings)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--networks", nargs="*", default=list(CASES), choices=list(CASES))
    parser.add_argument("--memory-of", nargs=3, metavar=("NETWORK", "METHOD", "K"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.memory_of:
        name, method, k = args.memory_of
        measure_memory(name, method, int(k), args.quick, args.device)
        return
    repeats = args.repeats or (5 if args.quick else 15)
    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"{os.cpu_count()} CPUs"
    print(f"torch {torch.__version__}, {args.device} ({device_name}), {torch.get_num_threads()} threads")
    table_times(args.networks, repeats, args.quick, args.device)
    if not args.quick:
        table_memory(args.networks, args.quick, args.device)


if __name__ == "__main__":
    main()
