"""Every model of the zoo: sites found, head counts, gates-open equality, keep-mask reference."""
import pytest
import torch

import dhp_fx
from dhp_fx.testing import _tensors, check_gates_open, check_keep_mask

from zoo import all_entries

ENTRIES = all_entries()


@pytest.fixture(scope="module")
def optimized_cache():
    return {}


@pytest.mark.parametrize("entry", ENTRIES, ids=[e.name for e in ENTRIES])
def test_zoo_sites_and_gates_open(entry, optimized_cache):
    model, inputs = entry.build(), entry.inputs()
    optimized = check_gates_open(model, inputs)
    assert len(optimized.sites) == entry.sites, optimized.report()
    for site in optimized.sites:
        assert (site.num_heads, site.num_kv_heads, site.head_dim) == (entry.heads, entry.kv_heads, entry.head_dim), site
    if entry.sites == 0:
        assert "no attention" in optimized.report()
    optimized_cache[entry.name] = (model, optimized, inputs)


@pytest.mark.parametrize("entry", [e for e in ENTRIES if e.sites], ids=[e.name for e in ENTRIES if e.sites])
def test_zoo_random_keep_mask_matches_zeroed_heads(entry, optimized_cache):
    if entry.name in optimized_cache:
        model, optimized, inputs = optimized_cache[entry.name]
    else:  # the gates-open test ran in another process (pytest-xdist) or failed
        model, inputs = entry.build(), entry.inputs()
        optimized = dhp_fx.optimize(model, example_inputs=inputs)
    gen = torch.Generator().manual_seed(3)
    keep = torch.rand(entry.batch, entry.heads, generator=gen) < 0.5
    keep[0, 0] = True
    keep[-1] = False  # a batch row with every head pruned must stay finite
    if not entry.keep_reference:
        optimized.set_keep_mask(keep)
        try:
            with torch.no_grad():
                out = optimized(**inputs)
        finally:
            optimized.set_keep_mask(None)
        floats = [t for t in _tensors(out) if t.is_floating_point()]
        assert floats and all(torch.isfinite(t).all() for t in floats)
        return
    check_keep_mask(model, optimized, inputs, keep)
