"""Targets held in other ways than a plain Parameter: tied weights by either name, lazy modules, parametrized
weights (inside ``parametrize.cached()``), and embeddings with ``scale_grad_by_freq`` or sparse gradients."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import Tensor, nn

from lightning_sensitivity import per_sample_sensitivities
from tests.helpers import loop_reference


class TiedHead(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(7, 5)
        self.head = nn.Linear(5, 7, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, tokens: Tensor) -> Tensor:
        return self.head(torch.tanh(self.embed(tokens)))


@pytest.mark.parametrize("count", [1, 2], ids=["dual-numbers", "vmap"])
def test_tied_weight_by_either_name(count):
    torch.manual_seed(14)
    model = TiedHead().double()
    tokens = torch.randint(0, 7, (4, 3))
    for label in ("head.weight[2, 3]", "embed.weight[2, 3]"):
        sens = per_sample_sensitivities(
            model, [label, "embed.weight[0, 0]"][:count] if "head" in label else label, (tokens,)
        )
        assert list(sens)[0] == label
        torch.testing.assert_close(sens[label], loop_reference(model, [label], (tokens,))[label], rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="one tied tensor"):
        per_sample_sensitivities(model, ["head.weight[2, 3]", "embed.weight[2, 3]"], (tokens,))


def test_lazy_module_target_is_a_clear_error_until_materialised():
    torch.manual_seed(13)
    net = nn.Sequential(nn.LazyLinear(2), nn.Tanh())
    x = torch.randn(4, 3)
    with pytest.raises(ValueError, match="'0.weight\\[1, 2\\]'.*uninitialized.*lazy module.*run the module once"):
        per_sample_sensitivities(net, "0.weight[1, 2]", (x,))
    net(x)
    sens = per_sample_sensitivities(net, "0.weight[1, 2]", (x,))
    torch.testing.assert_close(sens["0.weight[1, 2]"], loop_reference(net, ["0.weight[1, 2]"], (x,))["0.weight[1, 2]"])


class Symmetric(nn.Module):
    def forward(self, weight: Tensor) -> Tensor:
        return weight.triu() + weight.triu(1).T


def _parametrized(kind: str) -> tuple[nn.Module, str]:
    from torch.nn.utils import parametrize
    from torch.nn.utils.parametrizations import weight_norm

    torch.manual_seed(0)
    if kind == "custom":
        model = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 2))
        parametrize.register_parametrization(model[0], "weight", Symmetric())
        return model, "0.parametrizations.weight.original[0, 2]"
    return nn.Sequential(
        weight_norm(nn.Linear(4, 4)), nn.Tanh(), nn.Linear(4, 2)
    ), "0.parametrizations.weight.original1[0, 2]"


@pytest.mark.parametrize("kind", ["custom", "weight_norm"])
@pytest.mark.parametrize("method", ["auto", "reverse"])
def test_parametrized_weights_inside_parametrize_cached(kind, method):
    from torch.nn.utils import parametrize

    model, label = _parametrized(kind)
    x = torch.randn(5, 4)
    expected = loop_reference(model, [label], (x,))[label]
    with warnings.catch_warnings(), parametrize.cached():
        warnings.simplefilter("ignore", UserWarning)  # weight_norm has no forward-mode formula: reverse mode
        model(x)  # the model's own call fills the cache first, as it would in a validation step
        sens = per_sample_sensitivities(model, label, (x,), method=method, verify=True)
        assert parametrize._cache  # the caller's cache is left as it was
    torch.testing.assert_close(sens[label], expected)


class Bag(nn.Module):
    def __init__(self, bag: bool, **kwargs) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.bag = bag
        self.emb = (nn.EmbeddingBag if bag else nn.Embedding)(6, 3, **kwargs)

    def forward(self, idx: Tensor) -> Tensor:
        return self.emb(idx) if self.bag else self.emb(idx).sum(1)


def test_an_embedding_with_scale_grad_by_freq_is_never_differentiated_in_reverse_mode():
    """Its backward divides a row's gradient by how often the index occurs: not dy/dθ."""
    idx = torch.tensor([[2, 2, 1], [2, 0, 0], [3, 4, 5], [2, 2, 2]])
    expected = (idx == 2).sum(1, keepdim=True).float() * torch.tensor([[0.0, 1.0, 0.0]])  # d sum_j w[idx_j] / d w[2, 1]
    model = Bag(bag=False, scale_grad_by_freq=True)
    torch.testing.assert_close(
        per_sample_sensitivities(model, "emb.weight[2, 1]", (idx,))["emb.weight[2, 1]"], expected
    )
    with pytest.raises(ValueError, match="scale_grad_by_freq=True.*method='auto' or 'forward'"):
        per_sample_sensitivities(model, "emb.weight[2, 1]", (idx,), method="reverse")
    bag = Bag(bag=True, scale_grad_by_freq=True)
    with (
        pytest.raises(ValueError, match="EmbeddingBag 'emb', made with scale_grad_by_freq=True"),
        pytest.warns(UserWarning, match="forward-mode AD is not available"),  # embedding_bag has no formula
    ):
        per_sample_sensitivities(bag, "emb.weight[2, 1]", (idx,))


@pytest.mark.parametrize(("bag", "method"), [(False, "reverse"), (True, "auto")])
def test_sparse_embedding_gradients_in_reverse_mode(bag, method):
    idx = torch.tensor([[2, 2, 1], [2, 0, 0], [3, 4, 5], [2, 2, 2]])
    model = Bag(bag=bag, sparse=True)
    labels = ["emb.weight[2, 1]", "emb.weight[0, 0]"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        sens = per_sample_sensitivities(model, labels, (idx,), method=method)
    dense = Bag(bag=bag)
    dense.load_state_dict(model.state_dict())
    expected = loop_reference(dense, labels, (idx,))
    for label in labels:
        torch.testing.assert_close(sens[label], expected[label])
