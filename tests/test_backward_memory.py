"""What a memory-saving backward keeps alive: the saved output is handed over and released, the
graph can still be kept on request, in-place changes are caught, and the peak of live tensors
stays a few image-sized tensors whatever the depth (exact counts, not RSS)."""
import weakref

import pytest
import torch

import invnet
from invnet.core.memory_trace import trace_live_bytes
from invnet.layers import ActNorm, AffineCoupling


def test_trace_counts_known_allocations_exactly():
    mb = 2**20

    def fn():
        a = torch.empty(mb, dtype=torch.uint8)
        b = torch.empty(2 * mb, dtype=torch.uint8)
        view = b[:10]  # a view shares b's storage: counted once
        del a
        c = torch.empty(mb // 2, dtype=torch.uint8)
        fn.keep = (view, c)

    trace = trace_live_bytes(fn)
    assert trace.peak_bytes == 3 * mb
    assert trace.end_bytes == 2 * mb + mb // 2
    del fn.keep


class _WatchOutput(invnet.InvertibleModule):
    """ActNorm-like wrapper that records whether anyone but its _vjp still holds the output."""

    def __init__(self):
        super().__init__()
        self.inner = ActNorm(2)
        self.output_was_released = None

    def _forward(self, x, c):
        return self.inner._forward(x, c)

    def _inverse(self, y, c):
        return self.inner._inverse(y, c)

    def _vjp(self, y, dy, dlogdet, c, grads):
        ref = weakref.ref(y)
        x, dx, dc = self.inner._vjp(y, dy, dlogdet, c, grads)
        del y
        self.output_was_released = ref() is None
        return x, dx, dc


def _loss(block, x):
    y, logdet = block(x)
    return (y.sum(dim=(1, 2)) ** 2).sum() - logdet.sum()  # sum() does not save y


def test_saved_output_is_handed_over_unless_the_graph_is_kept():
    block = _WatchOutput()
    x = torch.randn(3, 2, 5, requires_grad=True)
    _loss(block, x).backward()
    assert block.output_was_released is True
    loss = _loss(block, x)
    loss.backward(retain_graph=True)
    assert block.output_was_released is False


def test_second_backward_needs_retain_graph_and_then_matches():
    flow = invnet.Chain(ActNorm(4), AffineCoupling(4, hidden=8, ndim=1)).double()
    x = torch.randn(3, 4, 6, dtype=torch.float64, requires_grad=True)
    flow(x)
    loss = _loss(flow, x)
    loss.backward(retain_graph=True)
    first = x.grad.clone()
    loss.backward()  # allowed: the first call kept the graph
    assert torch.allclose(x.grad, 2 * first, rtol=1e-12, atol=0)
    with pytest.raises(RuntimeError, match="retain_graph=True"):
        loss.backward()


def test_in_place_change_of_the_output_is_caught():
    block = ActNorm(2)
    x = torch.randn(3, 2, 5, requires_grad=True)
    block(x)
    y, logdet = block(x)
    loss = y.sum(dim=(1, 2)).pow(2).sum() - logdet.sum()  # only the memory-saving node holds y
    with torch.no_grad():
        y.mul_(2.0)
    with pytest.raises(RuntimeError, match="in-place"):
        loss.backward()


def _peak_in_images(levels, depth):
    torch.manual_seed(0)
    # tiny conditioners, so that what the peak holds is counted in image-sized tensors
    flow = invnet.networks.Glow(2, hidden=2, levels=levels, depth=depth, ndim=2, conv1x1="lu")
    x = torch.randn(8, 2, 64, 64)
    flow(x)

    def step():
        z, logdet = flow(x)
        (0.5 * z.pow(2).sum() - logdet.sum()).backward()

    return trace_live_bytes(step).peak_bytes / (x.numel() * x.element_size())


@pytest.mark.parametrize("levels", [1, 3])
def test_glow_backward_peak_is_a_few_images_at_any_depth(levels):
    shallow, deep = _peak_in_images(levels, 2), _peak_in_images(levels, 8)
    # the user's z, the incoming cotangent, one step's output and cotangent, the conditioner's
    # output and a few half-sized temporaries: about 9 images (13 before the hand-over of the
    # saved output and the squeezed copies)
    assert shallow < 10.0 and deep < 10.0
    assert deep < shallow + 0.6  # what grows is parameter gradients, not activations
    with invnet.memory_saving(False):
        plain = _peak_in_images(levels, 8)
    assert plain > 5 * deep
