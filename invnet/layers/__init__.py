"""Invertible blocks, one file per family, and the conditioners used inside couplings
(whose convolutions run through :mod:`invnet.layers.kernels`)."""
from . import kernels
from .activations import LeakyReLU, Logit, Sigmoid
from .actnorm import ActNorm
from .conditional_affine import ConditionalAffine
from .conditioners import ConvConditioner, MLPConditioner, ZeroPad, make_conditioner
from .conv1x1 import ChannelPermutation, Conv1x1
from .coupling import AdditiveCoupling, AffineCoupling
from .coupling_kinds import COUPLINGS, make_coupling
from .hint import HINTCoupling, hint_conditioner_count
from .hyperbolic import HyperbolicLayer, TiedConvResidual
from .irim import IRIMCoupling
from .resampling import LearnableDownsample
from .spline import SplineCoupling, rq_spline, spline_knots
from .squeeze import (
    HaarSqueeze,
    Squeeze,
    SqueezeBase,
    depth_to_space,
    haar_matrix,
    merge_channels,
    space_to_depth,
    split_channels,
)
from .structural import ChannelSubset, Inverted

__all__ = [
    "ActNorm", "Conv1x1", "ChannelPermutation", "AffineCoupling", "AdditiveCoupling", "SplineCoupling",
    "rq_spline", "spline_knots", "COUPLINGS", "make_coupling",
    "Squeeze", "HaarSqueeze", "SqueezeBase", "space_to_depth", "depth_to_space", "haar_matrix",
    "split_channels", "merge_channels",
    "LeakyReLU", "Sigmoid", "Logit",
    "ConvConditioner", "MLPConditioner", "ZeroPad", "make_conditioner",
    "HINTCoupling", "hint_conditioner_count", "ConditionalAffine",
    "IRIMCoupling", "HyperbolicLayer", "TiedConvResidual", "LearnableDownsample", "ChannelSubset", "Inverted",
]
