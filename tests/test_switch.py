"""The LoRA switch (switch.py): one LoRA off == the chain without it, every LoRA off == the
base model bit for bit (masks set or not), back on == the earlier output bit for bit, with
nothing reloaded or rebuilt; on Flux, SDXL and Z-Image, and with forms that read the output
(DoRA, OFT) and transient deltas (Flux's swap_scale_shift) in the chain.
"""

import pytest
import torch

import comfy.model_management as mm
import comfy.sd

import freefuse_bypass_patch as ffbp
from freefuse_bypass_patch import kit as sc
from freefuse_bypass_patch.hooks import ACTIVE_HOOK_ATTR
from support import REL_TOL, bypass_era

pytestmark = bypass_era


def _inputs(family):
    return sc.sdxl_inputs(image=(14, 18)) if family == "sdxl" else sc.tiny_inputs(family, image=10)


def _chain(base, loras):
    m = base
    for sd, strength in loras:
        m = comfy.sd.load_bypass_lora_for_models(m, None, sd, strength, 0)[0]
    return m


def _run_in_one_load(patcher, inputs, steps):
    """Load once; for each step, call it, run a forward and note the hooks' built forms."""
    mm.load_models_gpu([patcher])
    outs, built = [], []
    try:
        for step in steps:
            step()
            outs.append(sc.apply_model(patcher, inputs).clone())
            hooks = [m.__dict__[ACTIVE_HOOK_ATTR] for m in patcher.model.modules() if ACTIVE_HOOK_ATTR in m.__dict__]
            built.append({(id(hook), key): id(b) for hook in hooks for key, b in hook._built.items()})
    finally:
        mm.unload_all_models()
    return outs, built


@pytest.mark.parametrize("family", ["flux", "sdxl", "zimage"])
def test_off_is_the_chain_without_it_all_off_is_base_and_back_on_is_bitwise(family):
    if not sc.available(family):
        pytest.skip("this ComfyUI cannot build %s" % family)
    base = sc.tiny_model(family)
    inputs = _inputs(family)
    a, b = (sc.family_lora(base.model, family, seed=s, scale=0.4) for s in (401, 402))
    chained = _chain(base, [(a, 1.0), (b, 0.8)])
    base_out, only_b = sc.forward(base, inputs), sc.forward(_chain(base, [(b, 0.8)]), inputs)

    def switch(state):
        return lambda: ffbp.set_loras_enabled(chained, state)

    outs, built = _run_in_one_load(chained, inputs, [
        lambda: None, switch({0: False}), switch({"lora_1": False}), switch({0: True, 1: True})])
    on, one_off, all_off, back_on = outs
    assert sc.max_rel_diff(on, base_out) > 1e-3
    assert sc.max_rel_diff(one_off, only_b) <= REL_TOL
    assert torch.equal(all_off, base_out)
    assert torch.equal(back_on, on)
    assert built[0] and all(b == built[0] for b in built)  # the same hooks and forms throughout: no rebuild
    assert ffbp.loras_enabled(chained) == {"lora_0": True, "lora_1": True}

    h, w = (14, 18) if family == "sdxl" else (5, 5)
    left = torch.zeros(h, w)
    left[:, : w // 2] = 1.0
    masked = ffbp.with_lora_masks(chained, {0: left, 1: 1 - left})
    masked_on = sc.forward(masked, inputs)
    off = ffbp.with_loras_enabled(masked, {0: False, 1: False})
    assert torch.equal(sc.forward(off, inputs), base_out)  # masks set, every LoRA off: base
    assert ffbp.loras_enabled(masked) == {"lora_0": True, "lora_1": True}  # the clone's parent keeps its state
    ffbp.set_loras_enabled(off, {0: True, 1: True})
    assert torch.equal(sc.forward(off, inputs), masked_on)


def test_off_is_not_a_zero_mask():
    """A zero mask leaves the LoRA in the unmasked modules (text side, modulation, final layer);
    off removes it everywhere (issue 15: 7.7e-3 from base with zero masks)."""
    base = sc.tiny_flux()
    inputs = sc.flux_inputs()
    lora = sc.make_lora(base.model, "diffusers", rank=4, seed=403, alpha=4)
    m = comfy.sd.load_bypass_lora_for_models(base, None, lora, 1.0, 0)[0]
    base_out = sc.forward(base, inputs)
    zero = sc.forward(ffbp.with_lora_masks(m, {0: torch.zeros(4, 4)}, text_masks={0: torch.zeros(5)}), inputs)
    assert sc.max_rel_diff(zero, base_out) > 1e-3
    assert torch.equal(sc.forward(ffbp.with_loras_enabled(m, {0: False}), inputs), base_out)


def test_switch_with_forms_that_read_the_output_and_transient_deltas():
    """A diffusers LoRA (with the swap_scale_shift transient on norm_out), then a DoRA and an OFT
    on the same image-side weights: switching the DoRA or the OFT off gives the chain without it."""
    from test_forms import _variant_lora

    base = sc.tiny_flux()
    inputs = sc.flux_inputs()
    lora = sc.make_lora(base.model, "diffusers", rank=4, seed=404, alpha=4)
    dora = _variant_lora(base.model, "dora", "kohya", seed=405, limit=12)
    oft = _variant_lora(base.model, "oft", "kohya", seed=406, limit=12)
    parts = [(lora, 1.0), (dora, 0.7), (oft, 1.0)]
    chained = _chain(base, parts)
    left = torch.zeros(4, 4)
    left[:, :2] = 1.0
    for masks in ({}, {1: left, 2: 1 - left}):
        m = ffbp.with_lora_masks(chained, masks)
        for off in (1, 2):
            expected = ffbp.with_lora_masks(_chain(base, [p for i, p in enumerate(parts) if i != off]),
                                            {(i if i < off else i - 1): v for i, v in masks.items() if i != off})
            rel = sc.max_rel_diff(sc.forward(ffbp.with_loras_enabled(m, {off: False}), inputs),
                                  sc.forward(expected, inputs))
            assert rel <= REL_TOL, (masks.keys(), off, rel)
        assert torch.equal(sc.forward(ffbp.with_loras_enabled(m, {0: False, 1: False, 2: False}), inputs),
                           sc.forward(base, inputs))


def test_switch_keys_and_errors():
    base = sc.tiny_flux()
    lora = sc.make_lora(base.model, "kohya", rank=2, seed=407)
    with ffbp.lora_name("harry"):
        m = comfy.sd.load_bypass_lora_for_models(base, None, lora, 1.0, 0)[0]
    with ffbp.lora_name("daiyu"):
        m = comfy.sd.load_bypass_lora_for_models(m, None, lora, 1.0, 0)[0]
    off = ffbp.with_loras_enabled(m, {"daiyu": False})
    assert ffbp.loras_enabled(off) == {"harry": True, "daiyu": False}
    assert ffbp.loras_enabled(m) == {"harry": True, "daiyu": True}
    for key in ("ron", 2, -1, True):
        with pytest.raises(ValueError, match=r"0: harry, 1: daiyu"):
            ffbp.set_loras_enabled(off, {0: True, key: True})
    with pytest.raises(TypeError, match="'harry'.*True or False"):
        ffbp.set_loras_enabled(off, {1: True, "harry": 0})
    assert ffbp.loras_enabled(off) == {"harry": True, "daiyu": False}  # a bad call changes nothing
    with pytest.raises(ValueError, match="no bypass LoRAs"):
        ffbp.with_loras_enabled(base, {0: False})
    assert ffbp.loras_enabled(base) == {}
