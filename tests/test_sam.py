"""Sharpness-aware minimisation as an option of the one training loop."""
import pytest
import torch
import torch.nn as nn

from nncompress.core import ConfigError, TrainConfig, fit


class Quadratic(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64))


A = torch.tensor([[3.0, 0.5, 0.0], [0.5, 1.0, 0.2], [0.0, 0.2, 2.0]], dtype=torch.float64)


def loss(model, batch):
    return 0.5 * model.w @ A @ model.w + (model.w ** 4).sum()   # not quadratic: SAM's step differs from SGD's


def grad(w):
    return A @ w + 4 * w ** 3


def test_one_sam_step_is_the_gradient_at_the_worst_point_of_the_ball():
    rho, lr = 0.1, 0.05
    model = Quadratic()
    w = model.w.detach().clone()
    fit(model, [None], loss, TrainConfig(epochs=1, lr=lr, optimizer="sgd", momentum=0.0, lr_schedule="constant",
                                         sam_rho=rho))
    g = grad(w)
    expected = w - lr * grad(w + rho * g / g.norm())
    torch.testing.assert_close(model.w.detach(), expected)
    plain = Quadratic()
    fit(plain, [None], loss, TrainConfig(epochs=1, lr=lr, optimizer="sgd", momentum=0.0, lr_schedule="constant"))
    torch.testing.assert_close(plain.w.detach(), w - lr * g)
    assert not torch.allclose(plain.w, model.w)


def test_sam_radius_is_checked():
    with pytest.raises(ConfigError, match="sam_rho"):
        TrainConfig(sam_rho=-0.1)
