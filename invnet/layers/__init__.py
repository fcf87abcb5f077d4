"""Invertible blocks, one file per family, and the conditioners used inside couplings."""
from .actnorm import ActNorm
from .activations import LeakyReLU, Logit, Sigmoid
from .conditioners import ConvConditioner, MLPConditioner, ZeroPad, make_conditioner
from .conv1x1 import ChannelPermutation, Conv1x1
from .coupling import AdditiveCoupling, AffineCoupling
from .squeeze import HaarSqueeze, Squeeze, merge_channels, split_channels

__all__ = [
    "ActNorm", "Conv1x1", "ChannelPermutation", "AffineCoupling", "AdditiveCoupling",
    "Squeeze", "HaarSqueeze", "split_channels", "merge_channels",
    "LeakyReLU", "Sigmoid", "Logit",
    "ConvConditioner", "MLPConditioner", "ZeroPad", "make_conditioner",
]
from .irim import IRIMCoupling  # noqa: E402

__all__ += ["IRIMCoupling"]
from .hyperbolic import HyperbolicLayer, TiedConvResidual  # noqa: E402

__all__ += ["HyperbolicLayer", "TiedConvResidual"]
from .resampling import LearnableDownsample  # noqa: E402
from .structural import ChannelSubset, Inverted  # noqa: E402

__all__ += ["LearnableDownsample", "ChannelSubset", "Inverted"]
