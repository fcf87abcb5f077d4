"""Parameter counts and autograd-saved bytes of Glow / ConditionalGlow, memory saving on vs off,
for docs/networks.md (counted with saved-tensor hooks; not a timing benchmark).

    PYTHONPATH=$PWD python scripts/glow_memory.py
"""
from __future__ import annotations

import torch

import invnet
from invnet.core.checks import saved_bytes
from invnet.networks import ConditionalGlow, Glow


def n_params(net: torch.nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


def measure(net, x, c=None) -> tuple[int, int]:
    x = x.clone().requires_grad_(True)
    on = saved_bytes(lambda: net.log_prob(x, c).sum())
    with invnet.memory_saving(False):
        off = saved_bytes(lambda: net.log_prob(x, c).sum())
    return on, off


def main() -> None:
    torch.manual_seed(0)
    mib = 2.0**20
    print("| network | input | params | saved MiB (memory saving on) | saved MiB (off) |")
    print("|---|---|---|---|---|")
    x = torch.randn(4, 3, 64, 64)
    for depth in (4, 8, 16):
        net = Glow(3, hidden=64, levels=3, depth=depth, ndim=2)
        on, off = measure(net, x)
        print(f"| Glow(3, 64, levels=3, depth={depth}, ndim=2) | 4x3x64x64 | {n_params(net):,} | "
              f"{on / mib:.2f} | {off / mib:.1f} |")
    net = ConditionalGlow(3, 1, hidden=64, levels=3, depth=8, ndim=2)
    on, off = measure(net, x, torch.randn(4, 1, 64, 64))
    print(f"| ConditionalGlow(3, 1, 64, levels=3, depth=8, ndim=2) | 4x3x64x64 | {n_params(net):,} | "
          f"{on / mib:.2f} | {off / mib:.1f} |")
    x3 = torch.randn(1, 1, 32, 32, 32)
    net = Glow(1, hidden=32, levels=2, depth=4, ndim=3)
    on, off = measure(net, x3)
    print(f"| Glow(1, 32, levels=2, depth=4, ndim=3) | 1x1x32x32x32 | {n_params(net):,} | "
          f"{on / mib:.2f} | {off / mib:.1f} |")
    net = Glow(8, hidden=64, levels=1, depth=8, ndim=0)
    on, off = measure(net, torch.randn(512, 8))
    print(f"| Glow(8, 64, levels=1, depth=8, ndim=0) | 512x8 | {n_params(net):,} | {on / mib:.3f} | {off / mib:.2f} |")


if __name__ == "__main__":
    main()
