"""Beyond validation: the test stage under its own tags and the predict stage through ``summary()``."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import lightning_sensitivity._engine as engine
from lightning_sensitivity import SensitivityCheckError, SensitivityMonitor
from tests.helpers import (
    Counted,
    Decay,
    WrongSign,
    assert_histogram,
    expected_stats,
    inputs,
    make_trainer,
    physics_data,
    read_events,
    read_text_and_images,
)


class Stepped(Decay):
    """``sensitivity_step`` differentiates the first two time points only, in every stage."""

    def sensitivity_step(self, batch, batch_idx):
        return self(batch[0])[:, :2]


def test_test_stage_writes_its_own_tags(tmp_path):
    x = inputs(20)
    monitor = SensitivityMonitor(targets=["A", "k"], stages=["validate", "test"], profiles=True)
    trainer = make_trainer(tmp_path, monitor)
    model = Stepped()
    data = DataLoader(TensorDataset(x), batch_size=8)
    trainer.validate(model, data)
    test_x = inputs(12, seed=1)
    trainer.test(model, DataLoader(TensorDataset(test_x), batch_size=8))
    histograms, scalars = read_events(trainer.logger.log_dir)
    exact_val, exact_test = model.analytic(x), model.analytic(test_x)
    for label in ("A", "k"):
        assert_histogram(histograms[f"sensitivity/{label}"][0], expected_stats(exact_val[label][:, :2]))
        assert_histogram(histograms[f"sensitivity_test/{label}"][0], expected_stats(exact_test[label][:, :2]))
        for stat in ("mean", "std", "abs_mean", "mean_square", "nonfinite"):
            assert len(scalars[f"sensitivity_test/{label}/{stat}"]) == 1
            assert len(scalars[f"sensitivity/{label}/{stat}"]) == 1
    assert "sensitivity_test/collinearity" in scalars
    texts, _ = read_text_and_images(trainer.logger.log_dir)
    assert "sensitivity_test/summary" in texts and "sensitivity/summary" in texts
    assert monitor.summary()["A"]["count"] == 12 * 2  # the stage that ran last: test
    assert monitor.summary("validate")["A"]["count"] == 20 * 2
    torch.testing.assert_close(
        monitor.profiles(stage="test")["A"]["mean"], exact_test["A"][:, :2].mean(0), rtol=1e-6, atol=1e-9
    )


def test_validate_only_by_default_ignores_test(tmp_path):
    monitor = SensitivityMonitor(targets=["A"])
    trainer = make_trainer(tmp_path, monitor)
    trainer.test(Decay(), DataLoader(TensorDataset(inputs()), batch_size=8))
    histograms, scalars = read_events(trainer.logger.log_dir)
    assert not [tag for tag in [*histograms, *scalars] if tag.startswith("sensitivity")]


def test_predict_stage_summary(tmp_path):
    x = inputs(17)
    monitor = SensitivityMonitor(targets=["A", "k", "b"], stages=["predict"], profiles=True)
    trainer = make_trainer(tmp_path, monitor, logger=False)
    model = Decay()
    predictions = trainer.predict(model, DataLoader(TensorDataset(x), batch_size=8))
    assert len(predictions) == 3
    exact = model.analytic(x)
    summary = monitor.summary("predict")
    assert summary == monitor.summary()
    for label, values in exact.items():
        stats = expected_stats(values)
        assert summary[label]["count"] == 17 * 6
        assert summary[label]["mean"] == pytest.approx(stats["mean"], rel=1e-6)
        assert summary[label]["mean_square"] == pytest.approx(stats["mean_square"], rel=1e-6)
    labels, corr = monitor.correlation()
    torch.testing.assert_close(corr, torch.corrcoef(torch.stack([exact[label].reshape(-1) for label in labels])))


def test_check_runs_on_the_first_test_batch(tmp_path):
    class Wrong(Decay):
        def forward(self, x):
            return WrongSign.apply(self.A * x) * self.t

    monitor = SensitivityMonitor(targets=["A"], stages=["test"])
    trainer = make_trainer(tmp_path, monitor)
    with pytest.raises(SensitivityCheckError, match="on the first test batch"):
        trainer.test(Wrong(), DataLoader(TensorDataset(inputs()), batch_size=8))


def test_monitors_of_different_stages_may_share_a_prefix(tmp_path):
    validate = SensitivityMonitor(targets=["A"])
    test = SensitivityMonitor(targets=["A"], stages=["test"])
    trainer = make_trainer(tmp_path, None, callbacks=[validate, test])
    trainer.test(Decay(), DataLoader(TensorDataset(inputs()), batch_size=8))
    assert "sensitivity_test/A" in read_events(trainer.logger.log_dir)[0]


def test_what_the_engine_learned_holds_for_the_next_run_of_the_same_module(monkeypatch):
    """auto's timing probe runs once per module and monitor, not again at every trainer.validate (or fit)."""
    calls = []
    choose = engine.choose
    monkeypatch.setattr(engine, "choose", lambda *a, **k: calls.append(1) or choose(*a, **k))
    model, monitor = Counted(), SensitivityMonitor(["C", "net.0.weight[1, 0]"], log_figures=False, verify=False)
    for _ in range(3):
        trainer = L.Trainer(logger=False, callbacks=[monitor], enable_progress_bar=False, enable_model_summary=False)
        trainer.validate(model, DataLoader(physics_data(16), batch_size=8), verbose=False)
    assert len(calls) == 1
    assert monitor.summary()["C"]["count"] == 16 * 3
