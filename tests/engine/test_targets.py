"""Target syntax: parsing, canonical labels, globs and every bad-target error."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_sensitivity import per_sample_sensitivities
from lightning_sensitivity._targets import resolve_targets
from tests.helpers import Blocks, Oscillator


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 2)
        self.C = nn.Parameter(torch.tensor(1.5))
        self.register_buffer("steps", torch.tensor(3))
        self.register_buffer("table", torch.ones(2, 2, 2))

    def forward(self, x):
        return self.C * self.fc(x) * self.table.sum()


def labels(module, targets):
    return [t.label for t in resolve_targets(module, targets, "api")]


@pytest.mark.parametrize(
    ("given", "canonical"),
    [
        ("C", "C"),
        (" C ", "C"),
        ("fc.weight[1, 2]", "fc.weight[1, 2]"),
        ("fc.weight[1,2]", "fc.weight[1, 2]"),
        ("fc.weight [ -1 , -1 ]", "fc.weight[1, 2]"),
        ("fc.bias[-2]", "fc.bias[0]"),
        ("table[0, 1, -1]", "table[0, 1, 1]"),
    ],
)
def test_canonical_labels(given, canonical):
    assert labels(Net(), given) == [canonical]


def test_globs_expand_in_module_order_and_keep_the_given_order():
    model = Blocks(depth=3)
    assert labels(model, ["blocks.2.lin.bias[0]", "blocks.*.alpha"]) == [
        "blocks.2.lin.bias[0]",
        "blocks.0.alpha",
        "blocks.1.alpha",
        "blocks.2.alpha",
    ]
    assert labels(model, "blocks.?.lin.weight[0, 1]") == [f"blocks.{i}.lin.weight[0, 1]" for i in range(3)]


def test_one_element_tensor_without_index_and_with_it():
    model = Oscillator()  # F has shape (1,)
    assert labels(model, ["F", "m"]) == ["F", "m"]
    assert labels(model, ["F[0]"]) == ["F[0]"]


BAD = [
    # (targets, exception, fragments every message must contain)
    ("fc.wieght[0, 1]", ValueError, ["'fc.wieght[0, 1]'", "is not a parameter or buffer of Net", "'fc.weight[0, 1]'"]),
    ("nothing_like_it", ValueError, ["'nothing_like_it'", "named_parameters()"]),
    ("fc.weight", ValueError, ["'fc.weight'", "6 elements", "(2, 3)", "'fc.weight[0, 0]'"]),
    ("table", ValueError, ["'table'", "8 elements", "'table[0, 0, 0]'"]),
    ("fc.weight[2, 0]", IndexError, ["'fc.weight[2, 0]'", "out of range", "dimension 0", "-2..1"]),
    ("fc.weight[0, -4]", IndexError, ["'fc.weight[0, -4]'", "dimension 1", "-3..2"]),
    ("fc.weight[0]", IndexError, ["'fc.weight[0]'", "1 index", "2 dimension", "'fc.weight[0, 0]'"]),
    ("C[0]", IndexError, ["'C[0]'", "0-dimensional", "write 'C' without an index"]),
    ("steps", TypeError, ["'steps'", "torch.int64", "floating-point"]),
    ("fc.weight[a, 1]", ValueError, ["'fc.weight[a, 1]'", "integers"]),
    ("fc.weight[0]]", ValueError, ["'fc.weight[0]]'", "cannot parse"]),
    ("", ValueError, ["cannot parse"]),
    ("blocks.*.alpha", ValueError, ["'blocks.*.alpha'", "matches no parameter or buffer of Net"]),
    ([], ValueError, ["targets is empty"]),
    (["C", "C"], ValueError, ["'C'", "both name"]),
    (["fc.bias[1]", "fc.bias[-1]"], ValueError, ["'fc.bias[1]'", "'fc.bias[-1]'", "both name"]),
    ([1.5], TypeError, ["list of strings"]),
    (None, TypeError, ["list of strings"]),
]


@pytest.mark.parametrize(("targets", "error", "fragments"), BAD, ids=[repr(b[0]) for b in BAD])
def test_bad_targets_are_refused_with_the_target_named(targets, error, fragments):
    with pytest.raises(error) as info:
        per_sample_sensitivities(Net(), targets, (torch.ones(2, 3),))
    message = str(info.value)
    assert message.startswith("per_sample_sensitivities: ")
    for fragment in fragments:
        assert fragment in message, (fragment, message)


def test_suggestions_keep_the_index_and_apply_to_globs():
    with pytest.raises(ValueError, match="; did you mean") as info:
        resolve_targets(Blocks(), "blocks.0.alpah", "api")
    assert "'blocks.0.alpha'" in str(info.value)
    with pytest.raises(ValueError) as info:
        resolve_targets(Blocks(), "blocks.*.alpah", "api")
    assert "matches no parameter" in str(info.value)


class Named(nn.Module):
    """Layers named as scvi-tools names them (``Layer 0``: a space) and with brackets in a name."""

    def __init__(self):
        super().__init__()
        self.enc = nn.ModuleDict({"Layer 0": nn.Linear(3, 4), "Layer 1": nn.Linear(4, 2)})
        self.odd = nn.ModuleDict({"x[1]": nn.Linear(2, 2)})

    def forward(self, x):
        return self.odd["x[1]"](self.enc["Layer 1"](torch.tanh(self.enc["Layer 0"](x))))


def test_every_name_named_parameters_gives_is_a_target_and_labels_round_trip(reference):
    torch.manual_seed(0)
    model = Named().eval()
    x = torch.randn(5, 3)
    given = ["enc.Layer 0.weight[1, -1]", "enc.Layer 1.bias [0]", "odd.x[1].weight[0, 1]", "enc.Layer 1.weight[1, 2]"]
    sens = per_sample_sensitivities(model, given, (x,))
    assert list(sens) == [
        "enc.Layer 0.weight[1, 2]",
        "enc.Layer 1.bias[0]",
        "odd.x[1].weight[0, 1]",
        "enc.Layer 1.weight[1, 2]",
    ]
    again = per_sample_sensitivities(model, list(sens), (x,))  # a label is a target
    expected = reference(model, list(sens), (x,))
    for label in sens:
        torch.testing.assert_close(again[label], sens[label])
        torch.testing.assert_close(sens[label], expected[label], rtol=1e-5, atol=1e-6)
    assert labels(model, ["enc.*.bias[0]"]) == ["enc.Layer 0.bias[0]", "enc.Layer 1.bias[0]"]


@pytest.mark.parametrize("text", ["K,r", "K, r", " K , r[0, 1] "])
def test_a_comma_separated_string_is_refused_with_the_list_to_write(text):
    from lightning_sensitivity import SensitivityMonitor

    expected = ["K", "r"] if "[" not in text else ["K", "r[0, 1]"]
    with pytest.raises(ValueError, match="targets takes a list") as error:
        SensitivityMonitor(targets=text)
    assert repr(expected) in str(error.value)
    model = Net()
    with pytest.raises(ValueError, match="targets takes a list"):
        per_sample_sensitivities(model, text, (torch.ones(2, 3),))
    with pytest.raises(
        ValueError, match=r"several targets in one string: targets takes a list, \['C', 'fc.bias\[0\]'\]"
    ):
        per_sample_sensitivities(model, ["C, fc.bias[0]"], (torch.ones(2, 3),))
