"""The i-RIM coupling: one invertible step of a learned iterative reconstruction that sees the
data-misfit gradient of a physical forward operator."""
from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor

from ..core.module import GradStore, InvertibleModule, Shape, VJPResult
from ..core.shapes import sum_per_sample
from ..core.vjp import local_vjp
from ..operators import ForwardOperator, as_operator, misfit_gradient
from .conditioners import make_conditioner

__all__ = ["IRIMCoupling"]


class IRIMCoupling(InvertibleModule):
    r"""One invertible step of an invertible recurrent inference machine (i-RIM).

    From "Invert to Learn to Invert" (Putzky and Welling, 2019, arXiv:1911.10914). The state
    :math:`s = (x, h)` holds the current estimate :math:`x` (the first ``e`` channels, shaped like
    the operator's domain) and memory channels :math:`h`. The condition is the observation
    :math:`y` (in the block contract the state :math:`s` is the input ``x`` and the observation
    the condition ``c``; the code names the parts ``est``, ``mem``). With
    :math:`g(x) = A^T(Ax - y)` (:func:`invnet.operators.misfit_gradient`):

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

    def _check_shape(self, shape: Shape, c_shape: Optional[Shape], inverse: bool) -> Shape:
        shape = super()._check_shape(shape, c_shape, inverse)
        space = tuple(self.operator.domain_shape[1:])
        if tuple(shape[2:]) != space:
            raise ValueError(
                f"IRIMCoupling: the state's space shape must be the operator's {space}, got {tuple(shape[2:])}"
            )
        expected = (shape[0],) + self.operator.range_shape
        if c_shape is None or tuple(c_shape) != expected:
            raise ValueError(f"IRIMCoupling needs the observation y as condition, shape {expected}; got {c_shape}")
        return shape

    def _memory_scale_shift(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        g = misfit_gradient(self.operator, x, y)
        h = self.run_conditioner(self.memory_net, torch.cat([x, g], dim=1))
        raw, t = torch.split(h, [self.n_mem, self.n_mem], dim=1)
        return self.clamp * torch.tanh(raw / self.clamp), t

    def _forward(self, x: Tensor, c: Optional[Tensor]) -> tuple[Tensor, Tensor]:
        # state x = (estimate, memory); the condition c is the observation
        est, mem = torch.split(x, [self.n_est, self.n_mem], dim=1)
        sig, t = self._memory_scale_shift(est, c)
        mem_new = mem * torch.exp(sig) + t
        est_new = est + self.run_conditioner(self.estimate_net, mem_new)
        return torch.cat([est_new, mem_new], dim=1), sum_per_sample(sig)

    def _inverse(self, y: Tensor, c: Optional[Tensor]) -> tuple[Tensor, Tensor]:
        est_new, mem_new = torch.split(y, [self.n_est, self.n_mem], dim=1)
        est = est_new - self.run_conditioner(self.estimate_net, mem_new)
        sig, t = self._memory_scale_shift(est, c)
        mem = (mem_new - t) * torch.exp(-sig)
        return torch.cat([est, mem], dim=1), -sum_per_sample(sig)

    def _vjp(self, y: Tensor, dy: Tensor, dlogdet: Tensor, c: Optional[Tensor], grads: GradStore) -> VJPResult:
        est_new, mem_new = torch.split(y, [self.n_est, self.n_mem], dim=1)
        dest_new, dmem_new = torch.split(dy, [self.n_est, self.n_mem], dim=1)
        # estimate half-step: est' = est + NN2(mem')
        with local_vjp(self.estimate_net, mem_new, grads=grads) as vjp:
            u = self.run_conditioner(self.estimate_net, *vjp.inputs)
            (dmem_from_est,) = vjp.grad(u, dest_new)
        est = est_new - u.detach()
        dmem_tot = dmem_new + dmem_from_est
        # memory half-step: mem' = mem e^sig + t, (sig, t) from [est, g(est)]
        with local_vjp(self.memory_net, est, c, grads=grads) as vjp:
            sig, t = self._memory_scale_shift(*vjp.inputs)
            scale = torch.exp(sig.detach())
            mem_minus_t = mem_new - t.detach()
            dsig = dmem_tot * mem_minus_t + dlogdet.reshape((-1,) + (1,) * (y.dim() - 1))
            dest_from_mem, dc = vjp.grad((sig, t), (dsig, dmem_tot))
        mem = mem_minus_t / scale
        return torch.cat([est, mem], dim=1), torch.cat([dest_new + dest_from_mem, dmem_tot * scale], dim=1), dc
