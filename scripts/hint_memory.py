"""Parameter counts and autograd-saved bytes of one training step of the HINT networks.

Saved bytes are counted with saved-tensor hooks (deterministic, see invnet.core.checks.saved_bytes),
with the memory-free backward on and off, at several depths.

Run: PYTHONPATH=$PWD python scripts/hint_memory.py
"""
from __future__ import annotations

import torch

import invnet
from invnet.core.checks import saved_bytes
from invnet.networks import HINT, ConditionalHINT, MultiscaleConditionalHINT, MultiscaleHINT


def step_bytes(net, x, c, enabled: bool) -> int:
    def step():
        with invnet.memory_saving(enabled):
            return -net.log_prob(x.clone().requires_grad_(True), c).sum()

    return saved_bytes(step)


def main() -> None:
    torch.manual_seed(0)
    x = torch.randn(4, 3, 32, 32)
    y = torch.randn(4, 3, 32, 32)
    makers = {
        "HINT(3, 32, depth, ndim=2)": (lambda d: HINT(3, 32, d, 2), None),
        "MultiscaleHINT(3, 32, 3, depth, ndim=2)": (lambda d: MultiscaleHINT(3, 32, 3, d, 2), None),
        "ConditionalHINT(3, 3, 32, depth, ndim=2)": (lambda d: ConditionalHINT(3, 3, 32, d, 2), y),
        "MultiscaleConditionalHINT(3, 3, 32, 3, depth, 2)": (lambda d: MultiscaleConditionalHINT(3, 3, 32, 3, d, 2), y),
    }
    print("input 4x3x32x32 float32; MB saved by autograd for one log-likelihood step")
    print(f"{'network':50s} {'depth':>5s} {'params':>9s} {'saving on':>10s} {'off':>10s}")
    for name, (make, c) in makers.items():
        for depth in (2, 4, 8):
            net = make(depth)
            with torch.no_grad():
                net(x, c)  # ActNorm initialisation
            n_params = sum(p.numel() for p in net.parameters())
            on = step_bytes(net, x, c, True) / 2**20
            off = step_bytes(net, x, c, False) / 2**20
            print(f"{name:50s} {depth:5d} {n_params:9d} {on:10.2f} {off:10.2f}")


if __name__ == "__main__":
    main()
