"""Checks that need a GPU, run by hand where one is available (CI has none):

    PYTHONPATH=. python scripts/gpu_check.py [--out DIR]

1. cuDNN's RNN kernels have no forward-mode formula: ``nn.LSTM`` / ``nn.GRU`` on CUDA must be steered off cuDNN
   (and the flags restored), with values equal to the loop of ``torch.autograd.grad``.
2. No host synchronisation per batch: after the first call, the engine plus the aggregator's update run under
   ``torch.cuda.set_sync_debug_mode("error")``.
3. A real Trainer on the GPU (``bf16-mixed``, DDP-free) with the monitor's check on: histograms written, the same
   statistics as on the CPU.
4. Third-party vision models (torchvision's resnet18, a timm model, when installed): the finite-difference check
   passes and forward mode agrees with reverse mode.
5. The speed of the engine against hand-written ``torch.func.jvp`` on the GPU, for the README's honesty.
Prints one line per check, ``OK`` or ``FAIL``, and exits non-zero if any failed.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable

import torch
from torch import Tensor, nn

from lightning_sensitivity import per_sample_sensitivities
from lightning_sensitivity._aggregate import SensitivityAggregator

RESULTS: list[tuple[str, bool, str]] = []


def check(name: str) -> Callable[[Callable[[], str]], Callable[[], str]]:
    def wrap(fn: Callable[[], str]) -> Callable[[], str]:
        def run() -> str:
            start = time.perf_counter()
            try:
                detail = fn()
                RESULTS.append((name, True, detail))
            except Exception as error:  # noqa: BLE001 - every failure is reported, then the next check runs
                detail = f"{type(error).__name__}: {error}"
                RESULTS.append((name, False, detail))
                traceback.print_exc()
            print(f"{'OK  ' if RESULTS[-1][1] else 'FAIL'} {name} ({time.perf_counter() - start:.1f} s): {detail}")
            sys.stdout.flush()
            return detail

        return run

    return wrap


def loop_reference(module: nn.Module, name: str, index: tuple[int, ...], args: tuple) -> Tensor:
    clone = copy.deepcopy(module)
    tensor = dict(clone.named_parameters())[name]
    with torch.enable_grad():
        out = clone(*args)
        flat = out.reshape(-1)
        rows = []
        for e in range(flat.numel()):
            (g,) = torch.autograd.grad(flat[e], tensor, retain_graph=True, allow_unused=True)
            rows.append(torch.zeros((), device=out.device) if g is None else g[index])
    return torch.stack(rows).reshape(out.shape)


class Recurrent(nn.Module):
    def __init__(self, kind: str):
        super().__init__()
        self.rnn = getattr(nn, kind)(8, 16, batch_first=True, num_layers=2)
        self.head = nn.Linear(16, 3)
        self.flags: list[bool] = []

    def forward(self, x: Tensor) -> Tensor:
        self.flags.append(torch.backends.cudnn.enabled)
        return self.head(self.rnn(x)[0][:, -1])


@check("cuDNN RNNs steered around, flags restored, values exact")
def rnn_on_cuda() -> str:
    out = []
    for kind in ("LSTM", "GRU"):
        torch.manual_seed(0)
        model = Recurrent(kind).cuda().eval()
        x = torch.randn(4, 5, 8, device="cuda")
        with torch.inference_mode():
            sens = per_sample_sensitivities(model, ["rnn.weight_hh_l0[3, 2]", "head.bias[1]"], (x,), verify=True)
            one = per_sample_sensitivities(model, "rnn.weight_hh_l1[5, 1]", (x,), verify=True)
        assert torch.backends.cudnn.enabled, "cuDNN left disabled"
        assert False in model.flags, "the differentiation never ran with cuDNN off"
        ref = loop_reference(model, "rnn.weight_hh_l0", (3, 2), (x,))
        torch.testing.assert_close(sens["rnn.weight_hh_l0[3, 2]"], ref, rtol=1e-4, atol=1e-6)
        ref = loop_reference(model, "rnn.weight_hh_l1", (5, 1), (x,))
        torch.testing.assert_close(one["rnn.weight_hh_l1[5, 1]"], ref, rtol=1e-4, atol=1e-6)
        out.append(f"{kind} max|ref| {ref.abs().max().item():.3g}")
    return ", ".join(out)


@check("no host synchronisation per batch (engine + aggregator)")
def sync_free() -> str:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(32, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 4)).cuda().eval()
    aggregator = SensitivityAggregator(3).cuda()
    targets = ["0.weight[1, 2]", "2.bias[5]", "4.weight[3, 63]"]
    with torch.no_grad():
        for step in range(4):
            x = torch.randn(256, 32, device="cuda")
            if step > 0:
                torch.cuda.set_sync_debug_mode("error")
            try:
                sens = per_sample_sensitivities(net, targets, (x,))
                one = per_sample_sensitivities(net, targets[0], (x,))
                aggregator.update(torch.stack([sens[t].reshape(-1) for t in sens]))
                del one
            finally:
                torch.cuda.set_sync_debug_mode("default")
    return f"{aggregator.count.sum().item()} values aggregated"


@check("Trainer on the GPU with the monitor (bf16-mixed, verify on) equals the CPU")
def trainer_on_gpu() -> str:
    import lightning as L
    from lightning.pytorch.loggers import TensorBoardLogger
    from torch.utils.data import DataLoader, TensorDataset

    from lightning_sensitivity import SensitivityMonitor

    class Physics(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.C = nn.Parameter(torch.tensor(-5.0))
            self.net = nn.Sequential(nn.Linear(2, 32), nn.Tanh(), nn.Linear(32, 3))

        def forward(self, x):
            return self.C * x[:, :1] + self.net(x)

        def training_step(self, batch, batch_idx):
            return (self(batch[0]) - batch[1]).square().mean()

        def validation_step(self, batch, batch_idx):
            self.log("val", (self(batch[0]) - batch[1]).square().mean())

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.0)

    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(256, 2, generator=g), torch.randn(256, 3, generator=g))
    summaries = {}
    for accelerator, precision in (("gpu", "bf16-mixed"), ("gpu", "32-true"), ("cpu", "32-true")):
        torch.manual_seed(0)
        monitor = SensitivityMonitor(["C", "net.0.weight[3, 1]"], normalize="relative", profiles=True)
        trainer = L.Trainer(
            accelerator=accelerator,
            devices=1,
            precision=precision,
            max_epochs=1,
            logger=TensorBoardLogger(tempfile.mkdtemp()),
            callbacks=[monitor],
            enable_progress_bar=False,
            enable_model_summary=False,
            enable_checkpointing=False,
        )
        trainer.fit(Physics(), DataLoader(data, batch_size=64), DataLoader(data, batch_size=64))
        summaries[(accelerator, precision)] = monitor.summary()
    gpu, cpu = summaries[("gpu", "32-true")], summaries[("cpu", "32-true")]
    for label in cpu:
        assert gpu[label]["count"] == cpu[label]["count"]
        for key in ("mean", "std", "abs_mean", "mean_square"):
            assert abs(gpu[label][key] - cpu[label][key]) <= 1e-4 * max(1.0, abs(cpu[label][key])), (label, key)
    bf16 = summaries[("gpu", "bf16-mixed")]
    return f"C mean: cpu {cpu['C']['mean']:.6g}, gpu {gpu['C']['mean']:.6g}, gpu bf16-mixed {bf16['C']['mean']:.6g}"


def _vision_models() -> dict[str, Callable[[], nn.Module]]:
    models: dict[str, Callable[[], nn.Module]] = {}
    try:
        import torchvision

        models["torchvision resnet18"] = lambda: torchvision.models.resnet18(num_classes=10)
        models["torchvision mobilenet_v3_small"] = lambda: torchvision.models.mobilenet_v3_small(num_classes=10)
    except Exception as error:  # noqa: BLE001
        print(f"(torchvision unavailable: {error})")
    try:
        import timm

        models["timm vit_tiny_patch16_224"] = lambda: timm.create_model("vit_tiny_patch16_224", num_classes=10)
        models["timm convnext_atto"] = lambda: timm.create_model("convnext_atto", num_classes=10)
    except Exception as error:  # noqa: BLE001
        print(f"(timm unavailable: {error})")
    return models


@check("third-party vision models: the check passes, forward equals reverse")
def vision() -> str:
    done = []
    for name, make in _vision_models().items():
        torch.manual_seed(0)
        model = make().cuda().eval()
        first = next(n for n, p in model.named_parameters() if p.dim() == 4 or p.dim() == 2)
        second = [n for n, p in model.named_parameters() if p.dim() == 1][3]
        targets = [f"{first}[0, 0" + ", 0" * (dict(model.named_parameters())[first].dim() - 2) + "]", f"{second}[1]"]
        x = torch.randn(4, 3, 224, 224, device="cuda")
        with torch.inference_mode():
            fwd = per_sample_sensitivities(model, targets, (x,), verify=True)
            one = per_sample_sensitivities(model, targets[0], (x,), verify=True)
            rev = per_sample_sensitivities(model, targets, (x,), method="reverse")
        for label in fwd:
            scale = rev[label].abs().max().item() + 1e-12
            assert (fwd[label] - rev[label]).abs().max().item() <= 1e-3 * scale, (name, label)
        scale = fwd[targets[0]].abs().max().item() + 1e-12
        assert (one[targets[0]] - fwd[targets[0]]).abs().max().item() <= 1e-3 * scale
        done.append(name)
    return ", ".join(done) or "no model available"


def _median_time(fn: Callable[[], object], repeats: int = 20) -> float:
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


@check("speed on the GPU: engine vs no-grad forward and hand-written torch.func.jvp")
def speed() -> str:
    from torch.func import functional_call, jvp

    lines = []
    models = _vision_models()
    make = models.get("torchvision resnet18")
    if make is None:
        return "torchvision unavailable"
    torch.manual_seed(0)
    model = make().cuda().eval()
    x = torch.randn(32, 3, 224, 224, device="cuda")
    name, index = "conv1.weight", (3, 1, 2, 2)
    weight = dict(model.named_parameters())[name].detach()
    tangent = torch.zeros_like(weight)
    tangent[index] = 1

    def handwritten() -> Tensor:
        return jvp(lambda w: functional_call(model, {name: w}, (x,)), (weight,), (tangent,))[1]

    with torch.no_grad():
        forward = _median_time(lambda: model(x))
        engine = _median_time(lambda: per_sample_sensitivities(model, f"{name}[3, 1, 2, 2]", (x,)))
        hand = _median_time(handwritten)
    lines.append(
        f"resnet18 B=32 conv1 element: engine {engine / forward:.2f} forwards, jvp {hand / forward:.2f} "
        f"forwards, engine/jvp {engine / hand:.2f}"
    )
    return "; ".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to check")
        sys.exit(1)
    warnings.filterwarnings("ignore")
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name()}, cuDNN {torch.backends.cudnn.version()}")
    for run in (rnn_on_cuda, sync_free, trainer_on_gpu, vision, speed):
        run()
    failed = [name for name, ok, _ in RESULTS if not ok]
    print(f"{len(RESULTS) - len(failed)} of {len(RESULTS)} checks passed" + (f"; failed: {failed}" if failed else ""))
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
