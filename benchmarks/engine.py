"""Benchmark: per-sample sensitivities by our engine against the seed's methods and hand-written torch.func.

    python benchmarks/engine.py            # the full tables (a few minutes on 2 CPU cores)
    python benchmarks/engine.py --quick    # smaller sweep

Every time is a ratio to a no-grad forward pass of the same batch, measured side by side in one process
(the seed's loop, is_grads_batched and jacrev only up to B = 256: their time and memory grow with B):
methods are interleaved in each repetition (their order rotating) and the median of the repetitions is
kept. Absolute times are noisy on a shared machine; the ratios are what counts.

Model: an MLP 64 -> 512 -> 512 -> 8 (tanh), output [B, 8]. Targets: elements of the middle weight matrix.
Every method computes the same thing, d y[b, o] / d target for every sample b and output o:

- engine        lightning_sensitivity.per_sample_sensitivities (forward mode)
- jvp           hand-written torch.func.jvp (K = 1) or vmap(jvp) over one-hot tangents (K > 1)
- dual          hand-written torch.autograd.forward_ad dual numbers (K = 1)
- seed loop     the seed's method: one backward pass per sample (vectorised over that sample's 8 outputs)
- grads_batched torch.autograd.grad(is_grads_batched=True) over every output element at once
- jacrev        torch.func.jacrev with respect to the K target scalars
- finite diff   central differences, 2K forwards; its max error against float64 is reported

The monitor's cost inside a Trainer is measured by ``benchmarks/callback.py``.
"""

from __future__ import annotations

import argparse
import gc
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import torch
import torch.autograd.forward_ad as fwAD
from torch import Tensor, nn
from torch.func import functional_call, jacrev, jvp, vmap

from lightning_sensitivity import per_sample_sensitivities

NAME = "2.weight"


def make_model(dtype: torch.dtype = torch.float32) -> nn.Module:
    torch.manual_seed(0)
    return (
        nn.Sequential(nn.Linear(64, 512), nn.Tanh(), nn.Linear(512, 512), nn.Tanh(), nn.Linear(512, 8)).to(dtype).eval()
    )


def element_indices(k: int) -> list[tuple[int, int]]:
    return [(i % 512, (7 * i) % 512) for i in range(k)]


def targets(k: int) -> list[str]:
    return [f"{NAME}[{i}, {j}]" for i, j in element_indices(k)]


def one_hot(weight: Tensor, k: int) -> Tensor:
    basis = torch.zeros((k, *weight.shape), dtype=weight.dtype)
    for n, (i, j) in enumerate(element_indices(k)):
        basis[n, i, j] = 1
    return basis


# ---- the methods: each returns sensitivities [K, B, 8] -----------------------------------------------------


def method_engine(model, x, k, chunk=None):
    sens = per_sample_sensitivities(model, targets(k), (x,), chunk_size=chunk)
    return torch.stack(list(sens.values()))


def method_jvp(model, x, k):
    weight = model[2].weight.detach()
    basis = one_hot(weight, k)

    def tangent(t):
        return jvp(lambda w: functional_call(model, {NAME: w}, (x,)), (weight,), (t,))[1]

    return tangent(basis[0])[None] if k == 1 else vmap(tangent)(basis)


def method_dual(model, x, k):
    weight = model[2].weight.detach()
    basis = one_hot(weight, k)
    out = []
    for t in basis:
        with fwAD.dual_level():
            y = functional_call(model, {NAME: fwAD.make_dual(weight, t)}, (x,))
            out.append(fwAD.unpack_dual(y).tangent)
    return torch.stack(out)


def _scalars_model(model, x, k):
    """y(theta) with weight = W + sum_k theta_k E_k, for the reverse-mode methods."""
    weight = model[2].weight.detach()
    basis = one_hot(weight, k)

    def f(theta):
        return functional_call(model, {NAME: weight + torch.einsum("k,kij->ij", theta, basis)}, (x,))

    return f, torch.zeros(k, dtype=weight.dtype)


def method_seed_loop(model, x, k):
    f, theta = _scalars_model(model, x, k)
    with torch.enable_grad():
        theta.requires_grad_(True)
        y = f(theta)
        eye = torch.eye(y.shape[1], dtype=y.dtype)
        rows = [
            torch.autograd.grad(y[b], theta, eye, retain_graph=True, is_grads_batched=True)[0] for b in range(len(y))
        ]
    return torch.stack(rows).permute(2, 0, 1)  # [B, 8, K] -> [K, B, 8]


def method_grads_batched(model, x, k):
    f, theta = _scalars_model(model, x, k)
    with torch.enable_grad():
        theta.requires_grad_(True)
        y = f(theta).reshape(-1)
        (g,) = torch.autograd.grad(y, theta, torch.eye(len(y), dtype=y.dtype), is_grads_batched=True)
    return g.T.reshape(k, x.shape[0], 8)


def method_jacrev(model, x, k):
    f, theta = _scalars_model(model, x, k)
    return jacrev(f)(theta).permute(2, 0, 1)


def method_finite_diff(model, x, k, h=1e-3):
    weight = model[2].weight.detach()
    out = []
    for i, j in element_indices(k):
        up, down = weight.clone(), weight.clone()
        up[i, j] += h
        down[i, j] -= h
        with torch.no_grad():
            out.append(
                (functional_call(model, {NAME: up}, (x,)) - functional_call(model, {NAME: down}, (x,))) / (2 * h)
            )
    return torch.stack(out)


METHODS: dict[str, Callable] = {
    "engine": method_engine,
    "jvp": method_jvp,
    "dual": method_dual,
    "seed_loop": method_seed_loop,
    "grads_batched": method_grads_batched,
    "jacrev": method_jacrev,
    "finite_diff": method_finite_diff,
}


# ---- timing ------------------------------------------------------------------------------------------------


def interleaved(calls: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Median seconds per call, the calls interleaved in each repetition with a rotating start."""
    names = list(calls)
    for name in names:  # warm-up
        calls[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    gc.disable()  # as timeit does: a collection caused by one method must not land in another's time
    try:
        for r in range(repeats):
            for name in names[r % len(names) :] + names[: r % len(names)]:
                gc.collect()
                start = time.perf_counter()
                calls[name]()
                times[name].append(time.perf_counter() - start)
    finally:
        gc.enable()
    return {name: statistics.median(ts) for name, ts in times.items()}


def fmt(value: float | None, digits: int = 2) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def table_methods(batches: list[int], repeats: int, slow_limit: int) -> None:
    print("\n## One target (K = 1): time / no-grad forward, medians of interleaved runs")
    head = [
        "B",
        "engine",
        "jvp",
        "dual",
        "seed loop",
        "grads_batched",
        "jacrev",
        "finite diff",
        "loop / engine",
        "engine / jvp",
        "FD max err",
    ]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    model, model64 = make_model(), make_model(torch.float64)
    for b in batches:
        torch.manual_seed(1)
        x = torch.randn(b, 64)
        with torch.no_grad():
            fast = {"forward": lambda: model(x)}
            for name in ("engine", "jvp", "dual", "finite_diff"):
                fast[name] = lambda f=METHODS[name]: f(model, x, 1)
            r = interleaved(fast, repeats)
            r = {name: t / r["forward"] for name, t in r.items()}
            if b <= slow_limit:
                # The slow methods allocate gigabytes; they are timed in a group of their own, against a
                # forward of their own, so that they cannot disturb the fast methods' timings.
                slow = {"forward": lambda: model(x)}
                for name in ("seed_loop", "grads_batched", "jacrev"):
                    slow[name] = lambda f=METHODS[name]: f(model, x, 1)
                s = interleaved(slow, max(3, repeats // 3))
                r.update({name: t / s["forward"] for name, t in s.items() if name != "forward"})
            exact = method_engine(model64, x.double(), 1)
            fd_error = (method_finite_diff(model, x, 1).double() - exact).abs().max().item()
        loop = r.get("seed_loop")
        row = [
            str(b),
            fmt(r["engine"]),
            fmt(r["jvp"]),
            fmt(r["dual"]),
            fmt(r.get("seed_loop"), 0),
            fmt(r.get("grads_batched"), 0),
            fmt(r.get("jacrev"), 0),
            fmt(r["finite_diff"]),
            fmt(None if loop is None else loop / r["engine"], 0),
            fmt(r["engine"] / r["jvp"]),
            f"{fd_error:.1e}",
        ]
        print("| " + " | ".join(row) + " |")


def table_targets(batch: int, ks: list[int], repeats: int) -> None:
    print(f"\n## K targets at B = {batch}: time / no-grad forward, and per (1 + K) forwards")
    head = ["K", "engine", "engine chunk=16", "vmap(jvp)", "engine / (1+K)", "engine / vmap(jvp)"]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    model = make_model()
    torch.manual_seed(1)
    x = torch.randn(batch, 64)
    for k in ks:
        with torch.no_grad():
            med = interleaved(
                {
                    "forward": lambda: model(x),
                    "engine": lambda: method_engine(model, x, k),
                    "chunk": lambda: method_engine(model, x, k, chunk=16),
                    "jvp": lambda: method_jvp(model, x, k),
                },
                max(3, repeats // 2) if k >= 64 else repeats,
            )
        r = {name: med[name] / med["forward"] for name in med}
        row = [
            str(k),
            fmt(r["engine"]),
            fmt(r["chunk"]),
            fmt(r["jvp"]),
            fmt(r["engine"] / (1 + k)),
            fmt(med["engine"] / med["jvp"]),
        ]
        print("| " + " | ".join(row) + " |")


def peak_memory_mib(method: str, batch: int, k: int, chunk: int | None) -> float:
    """Peak resident memory a method adds over what the process holds before it, in a fresh process (Linux:
    the peak, VmHWM, is reset through /proc/self/clear_refs before the method runs)."""
    code = (
        "import sys, torch; sys.path.insert(0, %r); import engine as e\n"
        "def status(key):\n"
        "    return next(int(l.split()[1]) for l in open('/proc/self/status') if l.startswith(key))\n"
        "m = e.make_model(); x = torch.randn(%d, 64)\n"
        "with torch.no_grad(): m(x)\n"
        "open('/proc/self/clear_refs', 'w').write('5')\n"
        "before = status('VmRSS:')\n"
        "with torch.no_grad():\n"
        "    e.METHODS[%r](m, x, %d%s)\n"
        "print((status('VmHWM:') - before) / 1024)\n"
    ) % (os.path.dirname(os.path.abspath(__file__)), batch, method, k, "" if chunk is None else f", chunk={chunk}")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def table_memory(batch: int, ks: list[int]) -> None:
    print(f"\n## Peak memory added (MiB, fresh process each), B = {batch}")
    head = ["K", "engine", "engine chunk=16", "vmap(jvp)", "seed loop", "grads_batched", "jacrev"]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for k in ks:
        row = [
            str(k),
            fmt(peak_memory_mib("engine", batch, k, None), 0),
            fmt(peak_memory_mib("engine", batch, k, 16), 0),
            fmt(peak_memory_mib("jvp", batch, k, None), 0),
        ]
        for name in ("seed_loop", "grads_batched", "jacrev"):
            row.append(fmt(peak_memory_mib(name, batch, k, None), 0) if k <= 16 else "—")
        print("| " + " | ".join(row) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smaller sweep")
    parser.add_argument("--repeats", type=int, default=None)
    args = parser.parse_args()
    torch.set_num_threads(torch.get_num_threads())
    repeats = args.repeats or (5 if args.quick else 9)
    batches = [64, 256, 2048] if args.quick else [64, 256, 1024, 2048, 8192]
    ks = [1, 4, 16] if args.quick else [1, 4, 16, 64, 256]
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs; "
        f"peak RSS so far {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024} MiB"
    )
    table_methods(batches, repeats, slow_limit=256)
    table_targets(256, ks, repeats)
    table_targets(2048, [1, 16] if args.quick else [1, 16, 64], repeats)
    table_memory(256, [1, 16] if args.quick else [1, 16, 64, 256])


if __name__ == "__main__":
    main()
