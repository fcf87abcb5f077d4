"""The runnable examples of docs/architecture.md ("Writing your own block") run as written."""
import re
from pathlib import Path

import torch

DOC = Path(__file__).resolve().parents[1] / "docs" / "architecture.md"


def _section_code(title: str) -> list[str]:
    text = DOC.read_text()
    start = text.index(f"## {title}")
    end = text.find("\n## ", start + 1)
    section = text[start : end if end >= 0 else len(text)]
    return re.findall(r"```python\n(.*?)```", section, flags=re.S)


def test_writing_your_own_block_example_runs_and_passes_its_checks():
    blocks = _section_code("Writing your own block")
    assert len(blocks) >= 2, "the section lost its examples"
    namespace: dict = {}
    for code in blocks:
        exec(compile(code, str(DOC), "exec"), namespace)  # the examples assert their own checks
    block = namespace["block"]
    x = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    y, logdet = block(x)
    (y.square().sum() - logdet.sum()).backward()
    assert x.grad is not None and all(p.grad is not None for p in block.parameters())


def test_the_example_block_takes_the_standard_autocast_pattern():
    namespace: dict = {}
    for code in _section_code("Writing your own block"):
        exec(compile(code, str(DOC), "exec"), namespace)
    block = namespace["ShiftCoupling"](5).float()
    x = torch.randn(4, 5, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, logdet = block(x)
        loss = y.square().sum() - logdet.sum()
    loss.backward()  # outside the autocast block, memory saving on
    assert y.dtype == torch.float32 and x.grad is not None
    assert torch.equal(y[:, : block.half], x[:, : block.half])  # the arithmetic stayed float32
