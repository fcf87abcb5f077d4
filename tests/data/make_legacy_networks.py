"""Write ``legacy_networks.pt``: small networks saved by invnet before the multiscale builder
(commit 7a8c599), so that ``tests/test_network_compat.py`` can check that today's code loads their
weights (old parameter names) and computes the same map.

Run once at that commit (it builds with the constructors of the time):

    git checkout 7a8c599 && PYTHONPATH=$PWD python tests/data/make_legacy_networks.py

Each entry holds the class name and keyword arguments (as a checkpoint's network spec stores
them), the ``state_dict`` after ActNorm initialisation and a random perturbation, the parameter
shapes in registration order (what an optimizer's state is keyed by), and a float64 input,
condition, latent and logdet.
"""
from __future__ import annotations

import pathlib

import torch

from invnet import networks
from invnet.core.checks import randomize_parameters_

D64 = torch.float64

# (class name, kwargs, x shape, c shape or None, summary (class name, kwargs) or None)
CASES = [
    ("Glow", dict(channels=2, hidden=4, levels=2, depth=2, ndim=2), (2, 2, 8, 8), None, None),
    ("Glow", dict(channels=3, hidden=4, levels=1, depth=2, ndim=0, cond_channels=2), (2, 3), (2, 2), None),
    ("ConditionalGlow", dict(channels=1, cond_channels=2, hidden=4, levels=2, depth=1, ndim=2),
     (2, 1, 8, 8), (2, 1, 4, 4), ("ImageSummary", dict(in_channels=1, out_channels=2, out_size=(8, 8), hidden=3))),
    ("ConditionalCouplingFlow", dict(channels=1, cond_channels=2, ndim=2, depth=2, hidden=4),
     (2, 1, 4, 4), (2, 2, 4, 4), None),
    ("ConditionalCouplingFlow", dict(channels=3, cond_channels=1, ndim=0, depth=2, hidden=4), (2, 3), (2, 1), None),
    ("ConditionalCouplingFlow", dict(channels=2, cond_channels=2, ndim=1, depth=1, hidden=4, squeeze=False,
                                     vector_condition=True), (2, 2, 4), (2, 2), None),
    ("HINT", dict(channels=5, hidden=4, depth=2, ndim=1, cond_channels=1), (2, 5, 4), (2, 1, 4), None),
    ("MultiscaleHINT", dict(channels=1, hidden=4, levels=2, depth=1, ndim=1, cond_channels=1),
     (2, 1, 8), (2, 1, 8), None),
    ("ConditionalHINT", dict(channels=3, cond_channels=2, hidden=4, depth=2, ndim=0), (2, 3), (2, 2), None),
    ("MultiscaleConditionalHINT", dict(channels=1, cond_channels=1, hidden=4, levels=2, depth=1, ndim=1),
     (2, 1, 8), (2, 1, 8), None),
]


def main() -> None:
    torch.manual_seed(0)
    entries = []
    for name, kwargs, x_shape, c_shape, summary in CASES:
        kw = dict(kwargs)
        if summary is not None:
            kw["summary"] = getattr(networks, summary[0])(**summary[1])
        net = getattr(networks, name)(**kw).double()
        x = torch.randn(*x_shape, dtype=D64)
        c = None if c_shape is None else torch.randn(*c_shape, dtype=D64)
        cond = net.condition(c) if summary is not None else c
        with torch.no_grad():
            net(x, cond)  # ActNorm initialisation
            randomize_parameters_(net, 0.1)
            cond = net.condition(c) if summary is not None else c
            z, logdet = net(x, cond)
        entries.append({
            "type": name, "kwargs": kwargs, "summary": summary,
            "state_dict": {k: v.clone() for k, v in net.state_dict().items()},
            "param_shapes": [list(p.shape) for p in net.parameters()],
            "x": x, "c": c, "z": z, "logdet": logdet,
        })
    out = pathlib.Path(__file__).with_name("legacy_networks.pt")
    torch.save(entries, out)
    print(f"wrote {len(entries)} networks to {out}")


if __name__ == "__main__":
    main()
