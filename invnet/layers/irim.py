"""The i-RIM coupling: one invertible step of a learned iterative reconstruction that sees the
data-misfit gradient of a physical forward operator."""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..core.module import GradStore, InvertibleModule, parameter_aliases
from ..core.shapes import sum_per_sample
from ..operators import ForwardOperator, as_operator, misfit_gradient
from .conditioners import make_conditioner

__all__ = ["IRIMCoupling"]


class IRIMCoupling(InvertibleModule):
    r"""One invertible step of an invertible recurrent inference machine (i-RIM).

    From "Invert to Learn to Invert" (Putzky and Welling, 2019, arXiv:1911.10914). The state
    :math:`s = (x, h)` holds the current estimate :math:`x` (the first ``e`` channels, shaped like
    the operator's domain) and memory channels :math:`h`. The condition is the observation
    :math:`y`. With :math:`g(x) = A^T(Ax - y)` (:func:`invnet.operators.misfit_gradient`):

    .. math::
        (r, t) = \mathrm{NN}_1([x, g(x)]), \quad \sigma = \alpha\tanh(r/\alpha), \quad
        h' = h \odot e^{\sigma} + t, \qquad
        x' = x + \mathrm{NN}_2(h'), \qquad \log|\det J| = \textstyle\sum \sigma .

    Why it stays invertible although the gradient depends on the state: each half-step is a
    coupling whose conditioner sees only the part that half-step leaves unchanged. The memory
    update reads :math:`x` (and :math:`g(x)`, a function of :math:`x` and the fixed :math:`y`),
    which it does not change; the estimate update reads :math:`h'`, which it does not change.
    Inverse: :math:`x = x' - \mathrm{NN}_2(h')`, then :math:`g(x)`, then
    :math:`h = (h' - t) \odot e^{-\sigma}`. The Jacobian is block-triangular twice over, with
    diagonal blocks :math:`I` and :math:`\mathrm{diag}(e^\sigma)`, hence the logdet.

    Backward (from the output, one pass through each conditioner): with
    :math:`\bar h'_{tot} = \bar h' + J_{\mathrm{NN}_2}^T \bar x'`,
    :math:`\bar h = e^\sigma \bar h'_{tot}`,
    :math:`\bar\sigma = \bar h'_{tot} \odot (h' - t) + \overline{\log\det}`, :math:`\bar t = \bar h'_{tot}`,
    and :math:`\bar x = \bar x' + J_{[x, g(x)]}^T J_{\mathrm{NN}_1}^T(\bar\sigma, \bar t)`, where the
    misfit gradient's vector-Jacobian product is the closed form :math:`A^TA\,\bar g` (and
    :math:`\bar y = -A\bar g`), so operators autograd cannot see (pylops, numpy) still give exact
    state gradients. The conditioners are differentiated by a local autograd pass.

    Args:
        operator: the forward operator, anything :func:`invnet.operators.as_operator` accepts
            (matrices and pylops operators act on the flattened estimate; pass a
            :class:`~invnet.operators.ForwardOperator` to set shapes). Its ``domain_shape``
            ``(e, *space)`` fixes the estimate channels ``e`` and the space shape.
        channels: state channels (estimate plus memory; more than ``e``).
        hidden: hidden channels of both conditioners.
        clamp: bound :math:`\alpha` on the memory's log-scale.
        **conditioner_kwargs: passed to the default conditioners (``kernel_size``, ``residual_blocks``).

    >>> import torch
    >>> from invnet.operators import as_operator
    >>> A = torch.randn(10, 16, dtype=torch.float64) / 4
    >>> op = as_operator(A, domain_shape=(1, 4, 4))
    >>> block = IRIMCoupling(op, channels=3, hidden=8).double()
    >>> s, y = torch.randn(2, 3, 4, 4, dtype=torch.float64), torch.randn(2, 10, dtype=torch.float64)
    >>> out, logdet = block(s, y)
    >>> bool(torch.allclose(block.inverse(out, y)[0], s))
    True
    """

    def __init__(
        self,
        operator: Any,
        channels: int,
        hidden: int = 32,
        clamp: float = 2.0,
        **conditioner_kwargs,
    ) -> None:
        super().__init__()
        op = as_operator(operator)
        est = op.domain_shape[0]
        if channels <= est:
            raise ValueError(
                f"IRIMCoupling needs more state channels than the estimate's {est} (memory channels), got {channels}"
            )
        if not clamp > 0:
            raise ValueError(f"clamp must be positive, got {clamp}")
        self.operator: ForwardOperator = op
        self.channels = channels
        self.ndim = len(op.domain_shape) - 1
        self.n_est = est
        self.n_mem = channels - est
        self.cond_channels = op.range_shape[0]
        self.clamp = float(clamp)
        self.memory_net = make_conditioner(2 * est, 2 * self.n_mem, hidden, self.ndim, **conditioner_kwargs)
        self.estimate_net = make_conditioner(self.n_mem, est, hidden, self.ndim, **conditioner_kwargs)

    def extra_repr(self) -> str:
        return f"operator={self.operator!r}, channels={self.channels}, clamp={self.clamp}"

    def _check_shape(self, shape, c_shape, inverse):
        shape = super()._check_shape(shape, c_shape, inverse)
        space = tuple(self.operator.domain_shape[1:])
        if tuple(shape[2:]) != space:
            raise ValueError(f"IRIMCoupling: the state's space shape must be the operator's {space}, got {tuple(shape[2:])}")
        expected = (shape[0],) + self.operator.range_shape
        if c_shape is None or tuple(c_shape) != expected:
            raise ValueError(f"IRIMCoupling needs the observation y as condition, shape {expected}; got {c_shape}")
        return shape

    def _memory_scale_shift(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        g = misfit_gradient(self.operator, x, y)
        raw, t = torch.split(self.memory_net(torch.cat([x, g], dim=1)), [self.n_mem, self.n_mem], dim=1)
        return self.clamp * torch.tanh(raw / self.clamp), t

    def _forward(self, s, y):
        x, h = torch.split(s, [self.n_est, self.n_mem], dim=1)
        sig, t = self._memory_scale_shift(x, y)
        h_new = h * torch.exp(sig) + t
        x_new = x + self.estimate_net(h_new)
        return torch.cat([x_new, h_new], dim=1), sum_per_sample(sig)

    def _inverse(self, s, y):
        x_new, h_new = torch.split(s, [self.n_est, self.n_mem], dim=1)
        x = x_new - self.estimate_net(h_new)
        sig, t = self._memory_scale_shift(x, y)
        h = (h_new - t) * torch.exp(-sig)
        return torch.cat([x, h], dim=1), -sum_per_sample(sig)

    def _vjp(self, s, ds, dlogdet, y, grads: GradStore):
        x_new, h_new = torch.split(s, [self.n_est, self.n_mem], dim=1)
        dx_new, dh_new = torch.split(ds, [self.n_est, self.n_mem], dim=1)
        # estimate half-step: x' = x + NN2(h')
        h_in = h_new.detach().requires_grad_(True)
        with torch.enable_grad(), parameter_aliases(self.estimate_net) as (originals, params):
            u = self.estimate_net(h_in)
            g = torch.autograd.grad(u, [h_in] + params, dx_new, allow_unused=True)
        grads.add_many(originals, g[1:])
        x = x_new - u.detach()
        dh_tot = dh_new + g[0]
        # memory half-step: h' = h e^sig + t, (sig, t) from [x, g(x)]
        x_in = x.detach().requires_grad_(True)
        y_in = y.detach().requires_grad_(True)
        with torch.enable_grad(), parameter_aliases(self.memory_net) as (originals, params):
            sig, t = self._memory_scale_shift(x_in, y_in)
            scale = torch.exp(sig.detach())
            h_minus_t = h_new - t.detach()
            dsig = dh_tot * h_minus_t + dlogdet.reshape((-1,) + (1,) * (s.dim() - 1))
            g = torch.autograd.grad((sig, t), [x_in, y_in] + params, (dsig, dh_tot), allow_unused=True)
        grads.add_many(originals, g[2:])
        h = h_minus_t / scale
        dx = dx_new if g[0] is None else dx_new + g[0]
        dy = torch.zeros_like(y) if g[1] is None else g[1]
        return torch.cat([x, h], dim=1), torch.cat([dx, dh_tot * scale], dim=1), dy
