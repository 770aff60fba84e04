"""torchphysics: the sensitivities of a PINN's solution, and of its ODE residual, in a parameter identification
problem solved by torchphysics' ``Solver`` in a ``pytorch_lightning.Trainer``.

The problem: u' = -k u on [0, 1], u(0) = 1, with the rate k unknown and learned from 8 measurements of
exp(-1.3 t). One network (a torchphysics ``FCN``) is registered under every condition of the Solver (the ODE,
the initial condition, the data, the validation data), so each of its weights has four names. The Solver's
validation batch is a placeholder (``torch.empty(1)``), so ``step=`` functions say what to differentiate at
the validation points: the network's output u(t) (a weight of the network; k, which u does not read, gets
exact zeros), and the ODE residual du/dt + k u (d/dk = u). The residual computes du/dt by
``torch.autograd.grad`` inside the step, so the Trainer runs with ``inference_mode=False`` and the step turns
grad on.

Checks: the monitors' numbers against the loop of ``torch.autograd.grad`` at the final weights, the model left
exactly as it was by a ``trainer.validate`` with the monitors (every name of the shared network included),
and a fit bit for bit as without the monitors.

    python examples/recipes/torchphysics.py
"""

from __future__ import annotations

import sys
import tempfile
import warnings
from pathlib import Path

HERE = Path(__file__).resolve().parent
# This script has the library's name: with its folder on sys.path, `import torchphysics` would import the script.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]

import pytorch_lightning as ptl  # noqa: E402  (torchphysics' Solver is a pytorch_lightning.LightningModule)
import torch  # noqa: E402
import torchphysics as tp  # noqa: E402

sys.path.insert(0, str(HERE))
from reference import assert_untouched, check, loop_reference, snapshot  # noqa: E402

LOGS = tempfile.mkdtemp(prefix="recipe-torchphysics-")  # TensorBoard logs, outside the working tree
warnings.filterwarnings("ignore", message=".*does not have many workers.*")  # the Solver's placeholder loaders
T, U = tp.spaces.R1("t"), tp.spaces.R1("u")


def solver() -> tp.solver.Solver:
    """The inverse problem: k (start 0.5) and the network u(t) fitted to u(0) = 1, u' = -k u and the data."""
    domain = tp.domains.Interval(T, 0, 1)
    net = tp.models.FCN(input_space=T, output_space=U, hidden=(16, 16))
    k = tp.models.Parameter(init=0.5, space=tp.spaces.R1("k"))
    ode = tp.conditions.PINNCondition(
        module=net,
        sampler=tp.samplers.RandomUniformSampler(domain, n_points=32),
        residual_fn=lambda u, t, k: tp.utils.grad(u, t) + k * u,
        parameter=k,
        name="ode",
    )
    initial = tp.conditions.PINNCondition(
        module=net,
        sampler=tp.samplers.GridSampler(domain.boundary_left, n_points=1),
        residual_fn=lambda u: u - 1.0,
        name="initial",
    )
    t_data = torch.linspace(0, 1, 8)[:, None]
    data = tp.utils.PointsDataLoader(
        (tp.spaces.Points(t_data, T), tp.spaces.Points(torch.exp(-1.3 * t_data), U)), batch_size=8
    )
    return tp.solver.Solver(
        train_conditions=[ode, initial, tp.conditions.DataCondition(net, data, name="data")],
        val_conditions=[tp.conditions.DataCondition(net, data, name="val")],
        optimizer_setting=tp.OptimizerSetting(torch.optim.Adam, lr=1e-2),
    )


# the rest of the Trainer's arguments: 300 steps (the Solver's training "epoch"), then one validation
TRAINER = dict(
    max_steps=300,
    logger=ptl.loggers.TensorBoardLogger(LOGS),
    accelerator="cpu",
    enable_checkpointing=False,
    enable_progress_bar=False,
    enable_model_summary=False,
)

# --8<-- [start:recipe]
from lightning_sensitivity import SensitivityMonitor  # noqa: E402

T_VAL = tp.spaces.Points(torch.linspace(0, 1, 11)[:, None], T)  # where to evaluate: 11 points in [0, 1]


def u(pl_module, batch, batch_idx):  # the Solver's validation batch is a placeholder: evaluate at T_VAL
    return pl_module.val_conditions[0].module(T_VAL).as_tensor  # [11, 1]


def residual(pl_module, batch, batch_idx):  # du/dt + k u at T_VAL: du/dt is an autograd.grad, so grad on
    with torch.enable_grad():
        t = tp.spaces.Points(T_VAL.as_tensor.clone().requires_grad_(True), T)
        u = pl_module.train_conditions[0].module(t).as_tensor
        return tp.utils.grad(u, t.as_tensor) + pl_module.train_conditions[0].ode_params * u  # [11, 1]


WEIGHT = "train_conditions.0.module.sequential.2.weight[0, 3]"  # the shared network: any of its 4 names
BIAS = "val_conditions.0.module.sequential.4.bias"  # the same network by another name: du/db = 1
K = "train_conditions.0.ode_params[0, 0]"  # the rate k, a torchphysics Parameter of the ODE condition
monitors = [
    SensitivityMonitor([WEIGHT, BIAS], step=u, prefix="u"),
    SensitivityMonitor([WEIGHT, K], step=residual, prefix="residual"),  # d residual / dk = u
]
ptl.seed_everything(0)
model = solver()
trainer = ptl.Trainer(**TRAINER, inference_mode=False, callbacks=monitors)  # no inference mode: residual's grad
trainer.fit(model)
print(monitors[1].summary()[K])  # TensorBoard: residual/train_conditions.0.ode_params[0, 0]
# --8<-- [end:recipe]

# ------------------------------------------------------------------------------------------------------ checks
print(f"k = {model.train_conditions[0].ode_params.item():.4f} after the fit (data: 1.3)")
net = model.train_conditions[0].module
assert all(c.module is net for c in [*model.train_conditions, *model.val_conditions]), "the network is not shared"

# (b) a trainer.validate with the monitors leaves the model exactly as it was (every name of the shared network)
before = snapshot(model)
trainer.validate(model, verbose=False)
assert_untouched(model, before)


def rebuild(m: tp.solver.Solver) -> tp.solver.Solver:
    """A copy: copy.deepcopy refuses torchphysics' samplers, so a new Solver with the same state."""
    fresh = solver()
    fresh.load_state_dict(m.state_dict())
    return fresh.train(m.training)


# (a) the numbers of that validate against the loop of torch.autograd.grad at the final weights
batches = list(model.val_dataloader())  # the placeholder batch, [torch.empty(1)]
summary, reference = {}, {}
for name, monitor, step, labels in (
    ("u", monitors[0], u, [WEIGHT, BIAS]),
    ("residual", monitors[1], residual, [WEIGHT, K]),
):
    values = loop_reference(model, labels, batches, lambda m, b, step=step: step(m, b, 0), clone=rebuild)
    summary |= {f"{name}/{label}": stats for label, stats in monitor.summary().items()}
    reference |= {f"{name}/{label}": v for label, v in values.items()}

# (c) trained bit for bit as without the monitors
ptl.seed_everything(0)
plain = solver()
ptl.Trainer(**TRAINER, inference_mode=False).fit(plain)
with_monitors, without = model.state_dict(), plain.state_dict()
assert with_monitors.keys() == without.keys()
changed = [k for k in with_monitors if not torch.equal(with_monitors[k], without[k])]
assert not changed, f"the fit with the monitors differs from the fit without them in {changed}"
assert abs(without["train_conditions.0.ode_params"].item() - 0.5) > 0.1, "the fit did not move k"

check("torchphysics", summary, reference)
