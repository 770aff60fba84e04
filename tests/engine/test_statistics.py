"""The aggregator's statistics (``_aggregate``): a column without spread has an undefined correlation whatever
the rounding, exactly dependent columns an infinite collinearity index, one value no standard deviation; and
the aggregator in float32."""

from __future__ import annotations

import math

import pytest
import torch

from lightning_sensitivity._aggregate import SensitivityAggregator, collinearity, correlation


@pytest.mark.parametrize("seed", range(8))
def test_a_constant_column_has_an_undefined_correlation_whatever_the_rounding(seed):
    torch.manual_seed(seed)
    agg = SensitivityAggregator(3)
    for _ in range(40):
        k = torch.randn(64) * 3.7 + 11.3
        agg.update(torch.stack([k, torch.full((64,), 0.1), -0.33 * k + torch.randn(64)]))
    state = agg.compute()
    r = correlation(state["products"], state["product_sum"], state["product_count"])
    assert r[1].isnan().all() and r[:, 1].isnan().all()
    kept = r[[0, 2]][:, [0, 2]]
    assert torch.isfinite(kept).all() and (kept.abs() <= 1).all()
    assert kept[0, 1] < -0.5 and kept[0, 0] == pytest.approx(1.0)
    assert state["std"][1] == 0.0 and state["std"][0] > 1.0
    assert math.isfinite(float(collinearity(state["products"])))


def test_exactly_dependent_columns_have_an_infinite_collinearity_index():
    torch.manual_seed(0)
    agg = SensitivityAggregator(3)
    for _ in range(20):
        x = torch.randn(50)
        agg.update(torch.stack([x, 3 * x, torch.randn(50)]))
    assert float(collinearity(agg.compute()["products"])) == math.inf


def test_one_value_has_no_standard_deviation():
    agg = SensitivityAggregator(1)
    agg.update(torch.tensor([[2.5]]))
    assert agg.compute()["std"].isnan().all()  # as torch.std of one element


def test_aggregator_in_float32_for_devices_without_float64():
    from lightning_sensitivity._aggregate import SensitivityAggregator

    values = torch.tensor([[0.5, -2.0, 3.0, float("inf"), 0.0], [1.0, 1.0, 1.0, 1.0, 1.0]])
    agg = SensitivityAggregator(num_targets=2, dtype=torch.float32)
    agg.update(values)
    assert agg.sum.dtype == torch.float32 and agg.count.dtype == torch.long
    first, second = agg.histograms()
    assert (first.num, first.nonfinite, first.sum, first.sum_squares, first.min, first.max) == (4, 1, 1.5, 13.25, -2, 3)
    assert (second.num, second.sum, sum(second.bucket_counts)) == (5, 5.0, 5)
