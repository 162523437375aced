"""FreeFuse's two-phase flow through ``comfy.sample.sample``, as a regional-LoRA node would run it.

Phase 1 samples with every LoRA switched off (FreeFuse finds the regions there; this test
collects nothing) and must equal sampling the base model, bit for bit. Phase 2 samples with
each LoRA masked to its region (here a fixed left/right split of the latent grid) and must
equal the same sampler run on the base model with the independent reference hooks of
masked_reference.py. The patcher the flow started from keeps its state and its output.
Tiny Flux and tiny SDXL (odd 14x18 latent), Euler, 3 steps, CFG 2 (cond and uncond rows).
"""

import pytest
import torch

import comfy.sample
import comfy.sd

import freefuse_bypass_patch as ffbp
from freefuse_bypass_patch import kit as sc
from masked_reference import reference_hooks, without_functions
from support import bypass_era

pytestmark = bypass_era

TEXT = 5
# Sampling runs the model 6 times (3 steps x cond/uncond) and feeds each output back: fp32
# rounding differences between the hook and the reference (~1e-7 per forward) grow a little.
SAMPLE_TOL = 1e-5


def _setup(family):
    gen = torch.Generator().manual_seed(11)
    if family == "flux":
        latent, extra = torch.zeros(1, 16, 8, 8), {"guidance": 3.5}
    else:
        latent, extra = torch.zeros(1, 4, 14, 18), {"width": 144, "height": 112}
    conds = [[[torch.randn(1, TEXT, 48, generator=gen), dict(extra, pooled_output=torch.randn(1, 32, generator=gen))]]
             for _ in range(2)]
    return latent, conds


def _sample(patcher, latent, conds):
    noise = comfy.sample.prepare_noise(latent, 42)
    return comfy.sample.sample(patcher, noise, 3, 2.0, "euler", "normal", conds[0], conds[1], latent, seed=42,
                               disable_pbar=True)


@pytest.mark.parametrize("family", ["flux", "sdxl"])
def test_two_phase_flow_through_comfy_sample(family):
    if not sc.available(family):
        pytest.skip("this ComfyUI cannot build %s" % family)
    base = sc.tiny_model(family)
    latent, conds = _setup(family)
    loras = [without_functions(base, sc.family_lora(base.model, family, seed=s, scale=0.4)) for s in (501, 502)]
    model = base
    for name, sd in zip(("harry", "daiyu"), loras):
        with ffbp.lora_name(name):
            model = comfy.sd.load_bypass_lora_for_models(model, None, sd, 1.0, 0)[0]
    base_out = _sample(base, latent, conds)
    start_out = _sample(model, latent, conds)
    assert sc.max_rel_diff(start_out, base_out) > 1e-3

    # phase 1: every LoRA off
    phase1 = ffbp.with_loras_enabled(model, {name: False for name in ffbp.bypass_loras(model)})
    assert torch.equal(_sample(phase1, latent, conds), base_out)

    # phase 2: the regions found (a fixed split of the token grid) as masks
    grid = (latent.shape[-2] // 2, latent.shape[-1] // 2) if family == "flux" else tuple(latent.shape[-2:])
    left = torch.zeros(grid)
    left[:, : grid[1] // 2] = 1.0
    regions = {"harry": left, "daiyu": 1.0 - left}
    phase2 = ffbp.with_lora_masks(model, regions)
    out = _sample(phase2, latent, conds)
    with reference_hooks(family, base, grid, TEXT, [(sd, 1.0, regions[n], None) for n, sd in zip(regions, loras)]):
        expected = _sample(base, latent, conds)
    assert sc.max_rel_diff(expected, start_out) > 1e-4  # the masks change the result
    assert sc.max_rel_diff(out, expected) <= SAMPLE_TOL

    # the patcher the flow started from is as it was
    assert ffbp.loras_enabled(model) == {"harry": True, "daiyu": True}
    assert ffbp.lora_masks(model) == {"harry": None, "daiyu": None}
    assert torch.equal(_sample(model, latent, conds), start_out)
