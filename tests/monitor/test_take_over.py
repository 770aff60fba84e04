"""The step's own forward pass gives the sensitivities (``_fused.py``): the same numbers as a separate pass, the
same output for the step, and no take-over where it could change what the step sees."""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from torch import Tensor, nn
from torch.nn import functional as F
from torch.utils.data import DataLoader

import lightning_sensitivity._fused as fused_module
from lightning_sensitivity import SensitivityMonitor
from lightning_sensitivity._engine import Sensitivities
from lightning_sensitivity._fused import FusedForward
from tests.helpers import Counted, Physics, physics_data, read_events

TARGETS = ["C", "net.0.weight[1, 0]"]


class OtherCallFirst(Counted):
    """Calls the model on another tensor before the batch's input: only the second call may be taken over."""

    def validation_step(self, batch, batch_idx):
        x, y = batch
        shifted = self(x + 1.0)
        self.log("val_loss", F.mse_loss(self(x), y) + shifted.mean())


class SubmoduleOnly(Counted):
    """Never calls its own forward in the step: the monitor must make the call itself."""

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", F.mse_loss(self.C * x[:, :1] + self.net(x), y))


class GradientInStep(Counted):
    """A physics-informed step: needs the graph of the output to differentiate it with respect to the input."""

    def validation_step(self, batch, batch_idx):
        x, _ = batch
        with torch.enable_grad():
            x.requires_grad_(True)  # the batch's own input: the call the monitor would make
            (dy_dx,) = torch.autograd.grad(self(x).sum(), x)
        self.log("residual", dy_dx.square().mean())


class DropoutInValidation(Counted):
    """Monte Carlo dropout: a module stays in training mode during validation."""

    def __init__(self) -> None:
        super().__init__()
        self.drop = nn.Dropout(0.5)

    def forward(self, x: Tensor) -> Tensor:
        self.forwards += 1
        return self.C * x[:, :1] + self.net(self.drop(x))

    def on_validation_model_eval(self) -> None:
        super().on_validation_model_eval()
        self.drop.train()


def validate(tmp_path, model: L.LightningModule, fuse: bool, monkeypatch, **trainer_kwargs) -> SensitivityMonitor:
    with monkeypatch.context() as patch:
        if not fuse:
            patch.setattr(fused_module, "can_fuse", lambda module: False)
        monitor = SensitivityMonitor(TARGETS, normalize="relative", profiles=True, log_figures=False)
        trainer = L.Trainer(
            logger=TensorBoardLogger(tmp_path, name="fused" if fuse else "separate"),
            callbacks=[monitor],
            enable_progress_bar=False,
            enable_model_summary=False,
            **trainer_kwargs,
        )
        metrics = trainer.validate(model, DataLoader(physics_data(40), batch_size=8), verbose=False)
    monitor.metrics = metrics[0]  # type: ignore[attr-defined]
    monitor.log_dir = trainer.logger.log_dir  # type: ignore[attr-defined, union-attr]
    assert "forward" not in model.__dict__  # the model's own forward is back
    return monitor


def assert_same_run(fused: SensitivityMonitor, separate: SensitivityMonitor) -> None:
    assert fused.summary() == separate.summary()
    assert fused.metrics == separate.metrics  # type: ignore[attr-defined]
    for label in TARGETS:
        for stat, value in fused.profiles()[label].items():
            torch.testing.assert_close(value, separate.profiles()[label][stat], rtol=0, atol=0)
    (hists, scalars), (hists_separate, scalars_separate) = (read_events(m.log_dir) for m in (fused, separate))  # type: ignore[attr-defined]
    assert sorted(hists) == sorted(hists_separate) and len(hists) == len(TARGETS)
    for tag, events in hists.items():
        a, b = events[-1].histogram_value, hists_separate[tag][-1].histogram_value
        assert (a.num, a.sum, a.sum_squares, list(a.bucket)) == (b.num, b.sum, b.sum_squares, list(b.bucket))
    assert {t: [e.value for e in v] for t, v in scalars.items()} == {
        t: [e.value for e in v] for t, v in scalars_separate.items()
    }


class WithBatchNorm(Counted):
    """Buffers that eval mode only reads (BatchNorm's running statistics): the engine's copies of them change
    nothing, so the call is still taken over."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(2, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 3))
        self.net[1].running_mean.uniform_(-0.5, 0.5)


@pytest.mark.parametrize("model_type", [Counted, OtherCallFirst, WithBatchNorm])
def test_the_steps_forward_gives_the_same_numbers_with_one_pass_less(tmp_path, monkeypatch, model_type):
    models = {fuse: model_type() for fuse in (True, False)}
    runs = {fuse: validate(tmp_path, models[fuse], fuse, monkeypatch) for fuse in (True, False)}
    assert_same_run(runs[True], runs[False])
    # five batches, each differentiated in the step's own call; the first one is also checked against finite
    # differences there, so the step gets the model's own call after all (what the model leaves behind is its)
    assert models[False].forwards - models[True].forwards == 4


@pytest.mark.parametrize(
    ("model_type", "trainer_kwargs"),
    [
        (SubmoduleOnly, {}),  # the step never makes the monitor's call
        (GradientInStep, {"inference_mode": False}),  # grad on in the step: it needs the graph of the output
        (Counted, {"precision": "bf16-mixed"}),  # autocast: the monitor differentiates in the module's precision
    ],
)
def test_no_take_over_where_the_step_would_see_a_difference(tmp_path, monkeypatch, model_type, trainer_kwargs):
    models = {fuse: model_type() for fuse in (True, False)}
    runs = {fuse: validate(tmp_path, models[fuse], fuse, monkeypatch, **trainer_kwargs) for fuse in (True, False)}
    assert_same_run(runs[True], runs[False])
    assert models[False].forwards == models[True].forwards


class Scale(nn.Module):
    """chemprop's scaling transform: the identity in train mode, a standardisation in eval mode."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor([0.5, -0.25]))

    def forward(self, x: Tensor) -> Tensor:
        return x if self.training else x - self.mean


class TransformInTrainMode(Counted):
    """Validates with a transform left in train mode, as chemprop's ``on_validation_model_eval`` does."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = Scale()

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(self.scale(x))

    def on_validation_model_eval(self) -> None:
        super().on_validation_model_eval()
        self.scale.train()


class RecordsItsDraws(DropoutInValidation):
    """Dropout in validation; records the random state and input of every evaluation."""

    def __init__(self) -> None:
        super().__init__()
        self.draws: list[tuple[Tensor, Tensor]] = []

    def forward(self, x: Tensor) -> Tensor:
        self.draws.append((torch.get_rng_state(), x.detach().clone()))
        return super().forward(x)


def test_the_call_is_taken_over_with_a_module_in_train_mode(tmp_path, monkeypatch):
    """A module in train mode that draws nothing and updates nothing (chemprop's transforms) gives the same numbers
    as the separate pass, with one pass less per batch."""
    models = {fuse: TransformInTrainMode() for fuse in (True, False)}
    runs = {fuse: validate(tmp_path, models[fuse], fuse, monkeypatch) for fuse in (True, False)}
    assert_same_run(runs[True], runs[False])
    assert models[False].forwards - models[True].forwards == 4


@pytest.mark.parametrize("targets", [["net.0.weight[1, 0]"], TARGETS])
def test_dropout_in_validation_is_differentiated_at_the_steps_own_masks(targets):
    """Taken over with dropout on, the sensitivities are those of the call the step made, at its dropout masks:
    against the loop of torch.autograd.grad from the random state of the step's call, batch by batch."""
    model = RecordsItsDraws()
    monitor = SensitivityMonitor(targets, log_figures=False)
    trainer = L.Trainer(logger=False, callbacks=[monitor], enable_progress_bar=False, enable_model_summary=False)
    torch.manual_seed(3)
    trainer.validate(model, DataLoader(physics_data(40), batch_size=8), verbose=False)
    # every evaluation of a batch starts from the random state of the step's call: the first one's
    states: dict[tuple[float, ...], tuple[Tensor, Tensor]] = {}
    counts: dict[tuple[float, ...], int] = {}
    for state, x in model.draws:
        key = tuple(x.flatten().tolist())
        assert key not in states or torch.equal(states[key][0], state), "a batch evaluated from two random states"
        states.setdefault(key, (state, x))
        counts[key] = counts.get(key, 0) + 1
    assert len(states) == 5
    assert list(counts.values())[1:] == [1] * 4  # taken over: one evaluation per batch after the first (checked)
    reference: dict[str, list[Tensor]] = {label: [] for label in targets}
    for state, x in states.values():
        for label in targets:
            with torch.random.fork_rng(), torch.enable_grad():
                torch.set_rng_state(state)
                name, index = (label, ()) if "[" not in label else (label[: label.index("[")], (1, 0))
                tensor = dict(model.named_parameters())[name]
                y = model(x)
                for element in y.reshape(-1):
                    (g,) = torch.autograd.grad(element, tensor, retain_graph=True)
                    reference[label].append(g[index].detach())
    for label, values in reference.items():
        expected = torch.stack(values).double()
        got = monitor.summary()[label]
        assert got["count"] == expected.numel()
        assert got["mean"] == pytest.approx(float(expected.mean()), rel=1e-5, abs=1e-7)
        assert got["abs_mean"] == pytest.approx(float(expected.abs().mean()), rel=1e-5, abs=1e-7)
        assert got["max"] == pytest.approx(float(expected.max()), rel=1e-5, abs=1e-7)


class BatchNormInTrainMode(WithBatchNorm):
    """Batch norm left in train mode in validation: its call updates the running statistics."""

    def on_validation_model_eval(self) -> None:
        super().on_validation_model_eval()
        self.net[1].train()


def test_running_statistics_updated_in_validation_are_the_models_own(tmp_path, monkeypatch):
    """Batch norm in train mode updates its running statistics: the step gets the model's own call, so they end
    as without the monitor, and the numbers are those of the separate pass."""
    plain = BatchNormInTrainMode()
    L.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False).validate(
        plain, DataLoader(physics_data(40), batch_size=8), verbose=False
    )
    models = {fuse: BatchNormInTrainMode() for fuse in (True, False)}
    runs = {fuse: validate(tmp_path, models[fuse], fuse, monkeypatch) for fuse in (True, False)}
    assert_same_run(runs[True], runs[False])
    for model in models.values():
        for name, buffer in plain.net[1].named_buffers():
            assert torch.equal(buffer, model.net[1].get_buffer(name)), name


class FailsOnThirdBatch(Counted):
    def validation_step(self, batch, batch_idx):
        if batch_idx == 2:
            raise ValueError("the step's own error")
        return super().validation_step(batch, batch_idx)


def test_an_error_in_the_step_leaves_the_models_forward_in_place(tmp_path):
    model = FailsOnThirdBatch()
    trainer = L.Trainer(logger=False, callbacks=[SensitivityMonitor("C", log_figures=False)], enable_progress_bar=False)
    with pytest.raises(ValueError, match="the step's own error"):
        trainer.validate(model, DataLoader(physics_data(40), batch_size=8), verbose=False)
    assert "forward" not in model.__dict__


def test_an_engine_failure_in_the_step_gives_the_step_the_models_own_output():
    model = Counted().eval()
    x = torch.randn(5, 2)

    def fails(args: tuple, kwargs: dict) -> Sensitivities:
        raise RuntimeError("no formula")

    fused = FusedForward(model, x, fails)
    assert fused.armed
    other = torch.randn(5, 2)
    torch.testing.assert_close(model(other), Physics.forward(model, other))  # another input: the model's own call
    assert fused.armed and fused.result is None
    with torch.no_grad():
        out = model(x)
    torch.testing.assert_close(out, Physics.forward(model, x))
    assert isinstance(fused.failed, RuntimeError) and fused.result is None
    assert not fused.armed and "forward" not in model.__dict__


def test_the_step_gets_the_primal_output_and_the_monitor_its_tangent():
    model = Counted().eval()
    x = torch.randn(6, 2)

    def compute(args: tuple, kwargs: dict) -> Sensitivities:
        from lightning_sensitivity import Plans
        from lightning_sensitivity._engine import sensitivities_and_output
        from lightning_sensitivity._targets import resolve_targets

        return sensitivities_and_output(model, resolve_targets(model, TARGETS, "test"), args, kwargs, plans=Plans())

    fused = FusedForward(model, x, compute)
    with torch.inference_mode():
        out = model(x)
    expected = Physics.forward(model, x)
    assert torch.equal(out, expected.detach())
    assert fused.result is not None
    torch.testing.assert_close(fused.result.values["C"], x[:, :1].expand(6, 3))


def test_two_monitors_one_takes_the_step_over_the_other_runs_after_it(tmp_path, monkeypatch):
    results = {}
    for fuse in (True, False):
        with monkeypatch.context() as patch:
            if not fuse:
                patch.setattr(fused_module, "can_fuse", lambda module: False)
            monitors = [
                SensitivityMonitor(["C"], log_figures=False),
                SensitivityMonitor(TARGETS, normalize="relative", prefix="other", log_figures=False),
            ]
            model = Counted()
            trainer = L.Trainer(logger=False, callbacks=list(monitors), enable_progress_bar=False)
            trainer.validate(model, DataLoader(physics_data(40), batch_size=8), verbose=False)
        results[fuse] = [m.summary() for m in monitors], model.forwards
    assert results[True][0] == results[False][0]
    assert results[False][1] - results[True][1] == 4  # the first batch's check: the model's own call after all


class ForwardHooked(Counted):
    """A forward hook scales the module's output: it must run once around the step's call, as without the
    monitor (the engine's call of the module would run it again inside a taken-over call)."""

    def __init__(self) -> None:
        super().__init__()
        self.register_forward_hook(lambda module, args, output: 10.0 * output)


class Calibrating(Counted):
    """Updates buffers in eval mode, as an observer calibrating quantisation does (one in place, one replaced),
    and keeps an intermediate that the step reads right after its call."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))
        self.register_buffer("seen_max", torch.tensor(-math.inf))
        self.hidden_seen: list[Tensor] = []

    def forward(self, x: Tensor) -> Tensor:
        self.calls += 1
        self.seen_max = torch.maximum(self.seen_max, x.abs().max())
        self.hidden = self.net[0](x)  # depends on a target: moved by the finite differences of the first batch
        return super().forward(x)

    def validation_step(self, batch, batch_idx):
        super().validation_step(batch, batch_idx)
        self.hidden_seen.append(self.hidden.clone())


def validate_without_monitor(model: L.LightningModule) -> dict[str, float]:
    trainer = L.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False)
    return trainer.validate(model, DataLoader(physics_data(40), batch_size=8), verbose=False)[0]


@pytest.mark.parametrize("model_type", [ForwardHooked, Calibrating])
def test_the_step_sees_what_it_sees_without_the_monitor(tmp_path, monkeypatch, model_type):
    plain = model_type()
    metrics = validate_without_monitor(plain)
    models = {fuse: model_type() for fuse in (True, False)}
    runs = {fuse: validate(tmp_path, models[fuse], fuse, monkeypatch) for fuse in (True, False)}
    assert_same_run(runs[True], runs[False])
    assert runs[True].metrics["val_loss"] == metrics["val_loss"]  # type: ignore[attr-defined]
    if model_type is Calibrating:
        for model in models.values():
            assert int(model.calls) == 5 and torch.equal(model.seen_max, plain.seen_max)
            assert all(torch.equal(a, b) for a, b in zip(model.hidden_seen, plain.hidden_seen, strict=True))


def test_no_take_over_under_a_hook_for_every_module(tmp_path, monkeypatch):
    calls: list[str] = []
    handle = torch.nn.modules.module.register_module_forward_pre_hook(
        lambda module, args: calls.append(type(module).__name__)
    )
    try:
        models = {fuse: Counted() for fuse in (True, False)}
        for fuse, model in models.items():
            calls.clear()
            validate(tmp_path, model, fuse, monkeypatch)
            models[fuse].calls = list(calls)  # type: ignore[assignment]
    finally:
        handle.remove()
    assert models[True].forwards == models[False].forwards
    assert models[True].calls == models[False].calls  # type: ignore[attr-defined]


class Noisy(Counted):
    """Draws random numbers in eval mode (a noise layer), and the step draws more after its call."""

    def forward(self, x: Tensor) -> Tensor:
        self.forwards += 1
        return Physics.forward(self, x) + 0.1 * torch.randn(x.shape[0], 3)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", F.mse_loss(self(x), y) + torch.rand(()))


class ScalesItsInput(Counted):
    """Updates the batch's own input in place, and the step reads it after its call."""

    def __init__(self) -> None:
        super().__init__()
        self.inputs_seen: list[Tensor] = []

    def forward(self, x: Tensor) -> Tensor:
        x.mul_(2.0)
        return super().forward(x)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", F.mse_loss(self(x), y))
        self.inputs_seen.append(x.clone())


def run_with(model: L.LightningModule, monitor: SensitivityMonitor | None, **trainer_kwargs) -> tuple[dict, Tensor]:
    """The validation metrics and the next random number after ``trainer.validate``, from a fixed seed."""
    trainer = L.Trainer(
        logger=False,
        callbacks=[] if monitor is None else [monitor],
        enable_progress_bar=False,
        enable_model_summary=False,
        **trainer_kwargs,
    )
    torch.manual_seed(7)
    metrics = trainer.validate(model, DataLoader(physics_data(40), batch_size=8), verbose=False)[0]
    return {k: v for k, v in metrics.items() if not k.startswith("sensitivity")}, torch.rand(())


@pytest.mark.parametrize("model_type", [Noisy, DropoutInValidation, ScalesItsInput])
@pytest.mark.parametrize("targets", [["C"], TARGETS])
@pytest.mark.parametrize("inference_mode", [True, False])
def test_the_step_and_the_random_stream_are_as_without_the_monitor(model_type, targets, inference_mode):
    """Whether the monitor takes the call over (evaluated once, or more often on the first batch's check and
    then the model's own call) or differentiates after the step (dropout on), the step's numbers, its input and
    every later random draw are bit for bit those of a run without it."""
    plain = model_type()
    expected = run_with(plain, None, inference_mode=inference_mode)
    model = model_type()
    got = run_with(model, SensitivityMonitor(targets, log_figures=False), inference_mode=inference_mode)
    assert got[0] == expected[0] and torch.equal(got[1], expected[1])
    if model_type is ScalesItsInput:
        assert all(torch.equal(a, b) for a, b in zip(model.inputs_seen, plain.inputs_seen, strict=True))
        assert plain.forwards == 5 and model.forwards > plain.forwards


@pytest.mark.parametrize("inference_mode", [True, False])
def test_a_model_that_updates_its_input_is_differentiated_at_the_input_it_was_given(inference_mode):
    monitor = SensitivityMonitor(["C"], log_figures=False)
    run_with(ScalesItsInput(), monitor, inference_mode=inference_mode)
    x = physics_data(40).tensors[0]
    expected = 2 * x[:, :1]  # dy/dC = x[:, :1] of the input as forward scaled it once, for each output element
    assert monitor.summary()["C"]["mean"] == pytest.approx(float(expected.mean()), rel=1e-6)


class Scaled(Physics):
    """Stores a statistic of its input as a plain attribute, as neuralforecast's scaler does."""

    def forward(self, x: Tensor) -> Tensor:
        self.shift = x.mean(0)
        return self.C * x[:, :1] + self.net(x - self.shift)


def _shift_after_validate(tmp_path, callbacks) -> Tensor:
    torch.manual_seed(0)
    model = Scaled()
    trainer = L.Trainer(
        logger=False, callbacks=callbacks, enable_progress_bar=False, enable_checkpointing=False, max_epochs=1
    )
    trainer.validate(model, DataLoader(physics_data(12, seed=1), batch_size=4), verbose=False)
    torch.save(model, tmp_path / "model.pt")  # no functorch wrapper left in an attribute: it saves
    return model.shift


@pytest.mark.parametrize("step", [None, lambda m, batch, i: m(batch[0])])
def test_an_attribute_the_model_stores_holds_the_steps_value(tmp_path, step):
    """Two targets (vmap): the attribute holds the plain value of the step's own call on the last batch, as without
    the monitor, whether the step's call was taken over or the monitor differentiated after it."""
    expected = _shift_after_validate(tmp_path, [])
    shift = _shift_after_validate(tmp_path, [SensitivityMonitor(TARGETS, step=step, log_figures=False)])
    assert not torch._C._functorch.is_functorch_wrapped_tensor(shift)
    assert torch.equal(shift, expected)
