"""The cost of SensitivityMonitor in two science libraries: chemprop's MPNN and pytorch-forecasting's TFT.

    python benchmarks/science.py            # medians of 7 interleaved runs
    python benchmarks/science.py --quick    # 3 runs, smaller data
    python benchmarks/science.py --model tft --k 1 4

Needs chemprop 2.3.1 and pytorch-forecasting 1.8.0 (not dependencies of the package). Both models are built on
tiny synthetic data made here: a few hundred small molecules (SMILES put together from fragments) with random
targets for chemprop; sine series with a known covariate in a ``TimeSeriesDataSet`` for the TFT.

What is measured: steady-state ``trainer.validate`` (a fresh Trainer each run, the same model and, per
configuration, the same monitor, as in a fit that validates every epoch; the first run of each configuration is
a warm-up, where the monitor checks its first batch and chooses its mode, and is left out) without the monitor
and with it for K = 1, 2, 4 targets, ``verify`` on and off, figures off. Runs are interleaved, their order the
same each round; the table gives the median ratio monitor / none and, in brackets, the range over rounds (each
round's ratio against that round's run without the monitor).

- chemprop: the monitor differentiates the step's own call ``self(bmg, V_d, X_d)`` (the take-over): no
  second forward pass. Its floor is the run without the monitor, plus per batch the tangent pass's extra cost
  over a plain forward.
- TFT: its forward takes a dict and returns an output object, so the monitor is given
  ``step=tft_step`` (``pl_module(batch[0])["prediction"]``), a call of its own. Its floor is the run without
  the monitor plus one tangent pass per batch.

"jvp / fwd" is one raw ``torch.func.jvp`` (K = 1) or ``vmap(jvp)`` over K one-hot tangents (K > 1) of the same
model on one validation batch, against a plain no-grad forward: what one tangent pass costs. "floor" turns it
into the validate ratio the monitor cannot go below (per-batch times times the number of batches, against the
median run without the monitor); "monitor / floor" says how far from it the monitor is.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import logging
import os
import platform
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from torch.autograd import forward_ad
from torch.func import functional_call, jvp, vmap

from lightning_sensitivity import SensitivityMonitor

# ------------------------------------------------------------------------------------------------- the models

CHEMPROP_TARGETS = [
    "message_passing.W_i.weight[1, 2]",
    "message_passing.W_h.weight[2, 5]",
    "predictor.ffn.0.0.weight[0, 3]",
    "message_passing.W_o.weight[3, 1]",
]
TFT_TARGETS = [
    "output_layer.weight[3, 2]",
    "pos_wise_ff.fc1.weight[0, 1]",
    "multihead_attn.v_layer.weight[1, 2]",
    "lstm_decoder.weight_ih_l0[0, 3]",
]


def smiles(n: int) -> list[str]:
    """``n`` small valid molecules: a carbon chain with one functional group at one end and maybe a ring."""
    groups = ["", "O", "N", "Cl", "F", "C(=O)O", "C#N", "S", "OC", "C(=O)N"]
    rings = ["", "c1ccccc1", "C1CC1", "C1CCCCC1"]
    out = []
    for length in range(1, 12):
        for group in groups:
            for ring in rings:
                out.append(ring + "C" * length + group)
    return [out[i % len(out)] for i in range(n)]


def chemprop_model(samples: int, batch: int) -> tuple[pl.LightningModule, Any, Callable | None, list[str]]:
    from chemprop import data, featurizers, models
    from chemprop import nn as cnn

    rng = np.random.default_rng(0)
    mols = smiles(samples)
    y = rng.normal(size=(len(mols), 1))
    points = [data.MoleculeDatapoint.from_smi(s, yi) for s, yi in zip(mols, y, strict=True)]
    dataset = data.MoleculeDataset(points, featurizers.SimpleMoleculeMolGraphFeaturizer())
    val = data.build_dataloader(dataset, batch_size=batch, num_workers=0, shuffle=False)
    torch.manual_seed(0)
    mp = cnn.BondMessagePassing(d_h=64, depth=3)
    ffn = cnn.RegressionFFN(input_dim=mp.output_dim, hidden_dim=64, n_layers=1)
    model = models.MPNN(mp, cnn.MeanAggregation(), ffn, batch_norm=False)
    return model, val, None, CHEMPROP_TARGETS


def tft_step(pl_module: Any, batch: Any, batch_idx: int) -> torch.Tensor:
    """What the monitor differentiates for the TFT: its point forecast and quantiles, [B, horizon, quantiles]."""
    return pl_module(batch[0])["prediction"]


def tft_model(series: int, batch: int) -> tuple[pl.LightningModule, Any, Callable | None, list[str]]:
    import pandas as pd
    from pytorch_forecasting import TemporalFusionTransformer, TimeSeriesDataSet

    rng = np.random.default_rng(0)
    length = 120
    frames = []
    for s in range(series):
        t = np.arange(length)
        value = np.sin(t / 5 + s) + 0.1 * rng.standard_normal(length) + 2.0
        frames.append(pd.DataFrame({"series": str(s), "time_idx": t, "value": value, "x": np.cos(t / 7)}))
    df = pd.concat(frames, ignore_index=True)
    train = TimeSeriesDataSet(
        df[df.time_idx <= 60],
        time_idx="time_idx",
        target="value",
        group_ids=["series"],
        static_categoricals=["series"],
        time_varying_known_reals=["x"],
        time_varying_unknown_reals=["value"],
        max_encoder_length=24,
        max_prediction_length=6,
    )
    val = TimeSeriesDataSet.from_dataset(train, df, min_prediction_idx=61)
    torch.manual_seed(0)
    model = TemporalFusionTransformer.from_dataset(
        train, hidden_size=16, attention_head_size=2, hidden_continuous_size=8, dropout=0.1, log_interval=-1
    )
    return model, val.to_dataloader(train=False, batch_size=batch, num_workers=0), tft_step, TFT_TARGETS


# ----------------------------------------------------------------------------------------------- measurements


def trainer(callbacks: list) -> pl.Trainer:
    return pl.Trainer(
        accelerator="cpu",
        devices=1,
        logger=False,
        callbacks=callbacks,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        num_sanity_val_steps=0,
    )


def interleaved(runs: dict[str, Callable[[], None]], repeats: int) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {name: [] for name in runs}
    for run in runs.values():  # warm-up: the first validate of each configuration is left out
        run()
    for _ in range(repeats):
        for name, run in runs.items():
            gc.collect()
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    return times


def one_batch(model: pl.LightningModule, loader: Any, step: Callable | None) -> Callable[[], torch.Tensor]:
    """A function of no arguments that runs what the monitor differentiates on the first validation batch."""
    batch = next(iter(loader))
    if step is not None:
        return lambda: step(model, batch, 0)
    return lambda: model(batch[0], batch[1], batch[2])  # chemprop: self(bmg, V_d, X_d)


def tangent_cost(model: pl.LightningModule, loader: Any, step: Callable | None, labels: list[str], repeats: int):
    """(plain forward s, raw jvp s) of one batch, medians: the floor of one tangent pass for these targets."""
    model.eval()
    call = one_batch(model, loader, step)
    names, indices = [], []
    for label in labels:
        name, index = label.split("[")
        names.append(name)
        indices.append(tuple(int(i) for i in index.rstrip("]").split(",")))
    params = dict(model.named_parameters())
    unique = sorted(set(names))
    primals = tuple(params[n].detach() for n in unique)

    class Call(torch.nn.Module):  # functional_call swaps the targets' tensors in and back
        def __init__(self) -> None:
            super().__init__()
            self.m = model

        def forward(self) -> torch.Tensor:
            return call()

    wrapper = Call()

    def f(*values: torch.Tensor) -> torch.Tensor:
        return functional_call(wrapper, {f"m.{n}": v for n, v in zip(unique, values, strict=True)}, ())

    def onehots() -> tuple[torch.Tensor, ...]:
        tangents = []
        for n in unique:
            t = torch.zeros((len(labels), *params[n].shape))
            for k, (name, index) in enumerate(zip(names, indices, strict=True)):
                if name == n:
                    t[(k, *index)] = 1.0
            tangents.append(t)
        return tuple(tangents)

    tangents = onehots()

    def dual(k: int) -> None:  # torch.autograd.forward_ad, one pass for target k; mkldnn's LSTM has no formula
        with forward_ad.dual_level(), torch.backends.mkldnn.flags(enabled=False):
            f(*(forward_ad.make_dual(p, t[k]) for p, t in zip(primals, tangents, strict=True)))

    def raw() -> None:
        if kind[0] == "dual":
            for k in range(len(labels)):
                dual(k)
        elif len(labels) == 1:
            jvp(f, primals, tuple(t[0] for t in tangents))
        else:
            vmap(lambda *ts: jvp(f, primals, ts)[1])(*tangents)

    kind = ["jvp" if len(labels) == 1 else "vmap(jvp)"]
    try:
        raw()
    except Exception:  # noqa: BLE001  functorch refused an op (the TFT's LSTM): dual numbers, one pass a target
        kind[0] = "dual"

    def forward() -> None:
        with torch.no_grad():
            call()

    forward(), raw()
    fw, jv = [], []
    for _ in range(repeats):
        for bucket, fn in ((fw, forward), (jv, raw)):
            start = time.perf_counter()
            fn()
            bucket.append(time.perf_counter() - start)
    return statistics.median(fw), statistics.median(jv), kind[0]


def bench(label: str, build: Callable, ks: list[int], repeats: int) -> list[str]:
    model, loader, step, labels = build()
    batches = len(loader)
    runs: dict[str, Callable[[], None]] = {"none": lambda: trainer([]).validate(model, loader, verbose=False)}
    for k in ks:
        for verify in (True, False):
            # one monitor per configuration, as in a fit that validates every epoch: what it decides on its
            # first batch (the check, the choice of mode) is paid in the warm-up run, and kept
            monitor = SensitivityMonitor(labels[:k], log_figures=False, verify=verify, step=step)
            runs[f"{k}/{verify}"] = lambda monitor=monitor: trainer([monitor]).validate(model, loader, verbose=False)
    times = interleaved(runs, repeats)
    none = statistics.median(times["none"])
    rows = []
    for k in ks:
        forward_s, jvp_s, kind = tangent_cost(model, loader, step, labels[:k], max(repeats, 5))
        extra = jvp_s - forward_s if step is None else jvp_s  # take-over: the forward is the step's anyway
        floor = 1 + batches * extra / none
        cells = []
        for verify in (True, False):
            ratios = [m / n for m, n in zip(times[f"{k}/{verify}"], times["none"], strict=True)]
            median = statistics.median(times[f"{k}/{verify}"]) / none
            cells.append(f"{median:.2f} ({min(ratios):.2f}–{max(ratios):.2f})")
            cells.append(f"{median / floor:.2f}")
        rows.append(
            f"| {label} | {k} | {batches} | {cells[0]} | {cells[2]} | {jvp_s / forward_s:.2f} ({kind}) | {floor:.2f} "
            f"| {cells[1]} | {cells[3]} |"
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--model", choices=["chemprop", "tft"], nargs="+", default=["chemprop", "tft"])
    parser.add_argument("--k", type=int, nargs="+", default=[1, 2, 4], help="numbers of targets (at most 4)")
    args = parser.parse_args()
    repeats = 3 if args.quick else 7
    warnings.filterwarnings("ignore")
    for name in ("lightning.pytorch", "lightning.fabric", "pytorch_lightning"):
        logging.getLogger(name).setLevel(logging.ERROR)
    import chemprop
    import pytorch_forecasting

    builders = {
        "chemprop": lambda: chemprop_model(256 if args.quick else 512, 64),
        "tft": lambda: tft_model(16 if args.quick else 32, 64),
    }
    print(
        f"{datetime.date.today()}, {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"torch {torch.__version__} ({torch.get_num_threads()} threads), Python {platform.python_version()}, "
        f"chemprop {chemprop.__version__}, pytorch-forecasting {pytorch_forecasting.__version__}, "
        f"lightning {pl.__version__}"
    )
    print(f"command: python {' '.join(sys.argv)}; medians of {repeats} interleaved rounds, warm-up left out")
    print("\n## trainer.validate with the monitor / without it (range over rounds in brackets)\n")
    print(
        "| model | K | batches | verify=True | verify=False | jvp / fwd | floor "
        "| verify=True / floor | verify=False / floor |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for name in args.model:
        for row in bench(name, builders[name], args.k, repeats):
            print(row, flush=True)


if __name__ == "__main__":
    main()
