import math

import pytest
import torch

from invnet.layers import AffineCoupling, ChannelPermutation
from invnet.networks import FlowNetwork


class TinyFlow(FlowNetwork):
    def __init__(self):
        super().__init__()
        self.ndim = 0
        self.channels = 2
        self.data_shape = (2,)
        self.a = AffineCoupling(2, 8, 0)
        self.p = ChannelPermutation(2)

    def _forward(self, x, c):
        y, l1 = self.a._forward(x, c)
        y, l2 = self.p._forward(y, c)
        return y, l1 + l2

    def _inverse(self, y, c):
        x, l2 = self.p._inverse(y, c)
        x, l1 = self.a._inverse(x, c)
        return x, l1 + l2


def test_log_prob_of_identity_flow_is_standard_normal():
    flow = TinyFlow()
    x = torch.randn(5, 2)
    expected = -0.5 * (x**2).sum(1) - math.log(2 * math.pi)
    assert torch.allclose(flow.log_prob(x), expected, atol=1e-6)
    assert torch.allclose(flow.bits_per_dim(x), -expected / (2 * math.log(2)), atol=1e-6)


def test_sample_shapes_and_bad_arguments():
    flow = TinyFlow()
    assert flow.sample(7).shape == (7, 2)
    with pytest.raises(ValueError, match="positive number"):
        flow.sample(0)
    with pytest.raises(ValueError, match="temperature"):
        flow.sample(3, temperature=0.0)
