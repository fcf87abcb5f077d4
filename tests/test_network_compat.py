"""Networks saved before the multiscale builder still build from their spec, load their weights
(old parameter names) and compute the same map; parameters keep their order (optimizer state)."""
import pathlib

import pytest
import torch

from invnet.training.network_spec import build_network

LEGACY = torch.load(pathlib.Path(__file__).parent / "data" / "legacy_networks.pt", weights_only=True)


def _build(entry):
    spec = {"type": entry["type"], **entry["kwargs"]}
    if entry["summary"] is not None:
        spec["summary"] = {"type": entry["summary"][0], **entry["summary"][1]}
    return build_network(spec).double()


@pytest.mark.parametrize("entry", LEGACY, ids=[f"{e['type']}-{i}" for i, e in enumerate(LEGACY)])
def test_old_weights_load_and_give_the_same_map(entry):
    net = _build(entry)
    old_keys = set(entry["state_dict"])
    missing, unexpected = net.load_state_dict(entry["state_dict"], strict=True)
    assert not missing and not unexpected
    assert [list(p.shape) for p in net.parameters()] == entry["param_shapes"]
    c = entry["c"]
    with torch.no_grad():
        cond = net.condition(c) if entry["summary"] is not None else c
        z, logdet = net(entry["x"], cond)
        x_back, _ = net.inverse(z, cond)
    assert z.shape == entry["z"].shape
    assert torch.allclose(z, entry["z"], rtol=1e-12, atol=1e-12)
    assert torch.allclose(logdet, entry["logdet"], rtol=1e-12, atol=1e-12)
    assert torch.allclose(x_back, entry["x"], rtol=1e-10, atol=1e-10)
    # saved again, the weights carry today's names and load into a fresh network
    again = _build(entry)
    again.load_state_dict(net.state_dict(), strict=True)
    renamed = old_keys != set(net.state_dict())
    renaming_types = ("HINT", "MultiscaleHINT", "ConditionalCouplingFlow", "MultiscaleConditionalHINT")
    assert renamed == (entry["type"] in renaming_types)


def test_old_names_load_inside_a_wrapper():
    # the renaming works under any prefix (a network held by another module, as in decompose)
    entry = next(e for e in LEGACY if e["type"] == "HINT")
    holder = torch.nn.Module()
    holder.network = _build(entry)
    holder.load_state_dict({f"network.{k}": v for k, v in entry["state_dict"].items()}, strict=True)
    with torch.no_grad():
        z, _ = holder.network(entry["x"], entry["c"])
    assert torch.allclose(z, entry["z"], rtol=1e-12, atol=1e-12)
