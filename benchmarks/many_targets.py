"""Many targets: forward mode against per-sample reverse mode, and what ``method="auto"`` picks.

    python benchmarks/many_targets.py            # K in {1, 16, 64, 256, 1024} x O in {1, 16, 256}
    python benchmarks/many_targets.py --quick    # K in {1, 64, 1024} x O in {1, 16}

Model: an MLP 64 -> 512 -> 512 -> O (tanh), batch B = 256; targets: K distinct elements of the middle weight
matrix. Every method computes d y[b, o] / d target for every sample, output element and target. Columns:
``auto`` (after its one-time measurement, which is reported separately), ``forward`` and ``reverse`` (the
engine forced into each mode), hand-written ``vmap(jvp)`` (one-hot tangents, all targets at once) and
``vmap(jacrev)`` (per-sample Jacobians of the whole weight matrix, then the K elements picked). Times are
medians of interleaved runs as multiples of one no-grad forward pass; a cell whose first run takes more than
``--limit`` seconds is left out (—). The last columns: what auto chose, and auto / the faster engine mode.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time
from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.func import functional_call, jacrev, jvp, vmap

from lightning_sensitivity import per_sample_sensitivities
from lightning_sensitivity.functional import _PLANS


def make_model(outputs: int) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 512), nn.Tanh(), nn.Linear(512, 512), nn.Tanh(), nn.Linear(512, outputs)).eval()


def elements(k: int) -> list[tuple[int, int]]:
    return [(i % 512, (7 * i + i // 512) % 512) for i in range(k)]


def handwritten_jvp(model: nn.Module, x: Tensor, k: int) -> Tensor:
    weight = model[2].weight.detach()
    rows, cols = map(list, zip(*elements(k), strict=True))
    tangents = torch.zeros(k, *weight.shape)
    tangents[torch.arange(k), rows, cols] = 1

    def column(tangent: Tensor) -> Tensor:
        return jvp(lambda w: functional_call(model, {"2.weight": w}, (x,)), (weight,), (tangent,))[1]

    return vmap(column)(tangents)


def handwritten_jacrev(model: nn.Module, x: Tensor, k: int) -> Tensor:
    weight = model[2].weight.detach()
    rows, cols = map(torch.tensor, zip(*elements(k), strict=True))

    def one(sample: Tensor) -> Tensor:
        jac = jacrev(lambda w: functional_call(model, {"2.weight": w}, (sample[None],))[0])(weight)  # [O, 512, 512]
        return jac[:, rows, cols]

    return vmap(one, chunk_size=16)(x)


def seconds(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def interleaved(methods: dict[str, Callable[[], object]], repeats: int, limit: float) -> dict[str, float | None]:
    """Median seconds per method over ``repeats`` interleaved rounds, after one warm-up run each; ``None`` for a
    method whose warm-up took more than ``limit`` seconds."""
    kept = {name: fn for name, fn in methods.items() if seconds(fn) <= limit}
    times: dict[str, list[float]] = {name: [] for name in kept}
    for _ in range(repeats):
        for name, fn in kept.items():
            times[name].append(seconds(fn))
    return {name: statistics.median(times[name]) if name in kept else None for name in methods}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--limit", type=float, default=60.0, help="seconds a method's first run may take")
    args = parser.parse_args()
    ks = [1, 64, 1024] if args.quick else [1, 16, 64, 256, 1024]
    outputs = [1, 16] if args.quick else [1, 16, 256]
    choices: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: choices.append(record.getMessage())  # type: ignore[method-assign]
    logging.getLogger("lightning_sensitivity").addHandler(handler)
    logging.getLogger("lightning_sensitivity").setLevel(logging.DEBUG)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, B = {args.batch}")
    print(
        "| O | K | auto | forward | reverse | vmap(jvp) | vmap(jacrev) | auto's one-time choice | chose | auto / best |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    torch.manual_seed(1)
    x = torch.randn(args.batch, 64)
    with torch.no_grad():
        for o in outputs:
            model = make_model(o)
            base = statistics.median(seconds(lambda model=model: model(x)) for _ in range(20))
            for k in ks:
                targets = [f"2.weight[{i}, {j}]" for i, j in elements(k)]
                _PLANS.pop(model, None)
                choices.clear()
                start = time.perf_counter()
                per_sample_sensitivities(model, targets, (x,))  # measures once (for K > 1), then computes
                first = time.perf_counter() - start
                chose = "reverse" if "per-sample reverse for" in " ".join(choices) else "forward"
                methods: dict[str, Callable[[], object]] = {
                    "auto": lambda: per_sample_sensitivities(model, targets, (x,)),
                    "forward": lambda: per_sample_sensitivities(model, targets, (x,), method="forward"),
                    "reverse": lambda: per_sample_sensitivities(model, targets, (x,), method="reverse"),
                    "vmap(jvp)": lambda: handwritten_jvp(model, x, k),
                    "vmap(jacrev)": lambda: handwritten_jacrev(model, x, k),
                }
                medians = {
                    n: None if t is None else t / base
                    for n, t in interleaved(methods, args.repeats, args.limit).items()
                }
                best = min(v for name, v in medians.items() if name in ("forward", "reverse") and v is not None)
                cells = ["—" if medians[n] is None else f"{medians[n]:.1f}" for n in methods]
                ratio = "—" if medians["auto"] is None else f"{medians['auto'] / best:.2f}"
                print(
                    f"| {o} | {k} | " + " | ".join(cells) + f" | {first / base:.1f} | {chose} | {ratio} |", flush=True
                )


if __name__ == "__main__":
    main()
