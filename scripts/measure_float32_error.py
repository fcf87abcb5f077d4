"""Measure the float32 reconstruction error of every core block and of deep stacks.

Run: PYTHONPATH=. python scripts/measure_float32_error.py  (prints a Markdown table)
"""
from __future__ import annotations

import torch

import invnet
from invnet.core.checks import randomize_parameters_, relative_error
from invnet.layers import (
    ActNorm,
    AdditiveCoupling,
    AffineCoupling,
    ChannelPermutation,
    Conv1x1,
    HaarSqueeze,
    LeakyReLU,
    Sigmoid,
    SplineCoupling,
    Squeeze,
)


def block_errors() -> list[tuple[str, float]]:
    torch.manual_seed(0)
    rows = []
    x = torch.randn(8, 6, 16, 16)
    cases = {
        "ActNorm": ActNorm(6), "Conv1x1 (Householder)": Conv1x1(6), "Conv1x1 (LU)": Conv1x1(6, "lu"),
        "AffineCoupling": AffineCoupling(6, 32, 2), "AdditiveCoupling": AdditiveCoupling(6, 32, 2),
        "SplineCoupling (8 bins)": SplineCoupling(6, 32, 2),
        "ChannelPermutation": ChannelPermutation(6), "LeakyReLU": LeakyReLU(0.2), "Sigmoid": Sigmoid(),
        "Squeeze": Squeeze(), "HaarSqueeze": HaarSqueeze(),
    }
    for name, block in cases.items():
        randomize_parameters_(block, 0.3)
        with torch.no_grad():
            y, _ = block(x)
            rows.append((name, relative_error(block.inverse(y)[0], x)))
    return rows


def stack_errors(depths=(8, 32, 64), weight_scale=0.02, coupling=AffineCoupling) -> list[tuple[int, float]]:
    rows = []
    for depth in depths:
        torch.manual_seed(0)
        blocks = []
        for _ in range(depth):
            blocks += [ActNorm(6), Conv1x1(6), coupling(6, 32, 2)]
        flow = randomize_parameters_(invnet.Chain(*blocks), weight_scale)
        x = torch.randn(8, 6, 16, 16)
        with torch.no_grad():
            y, _ = flow(x)
            rows.append((depth, relative_error(flow.inverse(y)[0], x)))
    return rows


if __name__ == "__main__":
    print("| block | float32 relative reconstruction error |\n|---|---|")
    for name, err in block_errors():
        print(f"| {name} | {err:.1e} |")
    print("\n| Glow steps (ActNorm, Conv1x1, coupling) | weights + N(0, 0.02^2) | weights + N(0, 0.05^2) |")
    print("|---|---|---|")
    for coupling in (AffineCoupling, SplineCoupling):
        mild = stack_errors(weight_scale=0.02, coupling=coupling)
        large = stack_errors(weight_scale=0.05, coupling=coupling)
        for (depth, e1), (_, e2) in zip(mild, large):
            print(f"| {depth} steps, {coupling.__name__} | {e1:.1e} | {e2:.1e} |")
