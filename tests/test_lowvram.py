"""Partial loading (ComfyUI's lowvram path) on CPU: with a memory budget far below the
model's size, ComfyUI leaves most weights to be cast at forward time; bypass must still
equal merged loaded the same way, and unpatching must restore the base output."""

import comfy.sd
import pytest
import torch

from freefuse_bypass_patch import kit as sc
from support import REL_TOL, bypass_era

pytestmark = bypass_era

BUDGET = 64 * 1024  # bytes: a few small layers fit, the rest is "lowvram"


def _run_partially_loaded(patcher, inputs):
    patcher.patch_model(torch.device("cpu"), lowvram_model_memory=BUDGET)
    try:
        lowvram = sum(1 for m in patcher.model.modules() if getattr(m, "comfy_cast_weights", False))
        return sc.apply_model(patcher, inputs).clone(), lowvram
    finally:
        patcher.unpatch_model()


def test_partial_load_bypass_equals_merged():
    base = sc.tiny_flux()
    inputs = sc.flux_inputs()
    lora = sc.make_lora(base.model, "diffusers", rank=4, seed=51, alpha=4)
    dora = sc.adapter_lora(base.model, "dora", "kohya", seed=52, limit=8)
    loras = [(lora, 0.9), (dora, 0.6)]
    base_out, _ = _run_partially_loaded(base, inputs)
    merged_out, merged_lowvram = _run_partially_loaded(sc.chain(comfy.sd.load_lora_for_models, base, loras), inputs)
    bypass_out, bypass_lowvram = _run_partially_loaded(sc.chain(comfy.sd.load_bypass_lora_for_models, base, loras),
                                                       inputs)
    assert merged_lowvram > 10 and bypass_lowvram > 10  # most layers really were left to lowvram casting
    assert sc.max_rel_diff(merged_out, base_out) > 0.05
    assert sc.max_rel_diff(bypass_out, merged_out) <= REL_TOL
    again, _ = _run_partially_loaded(base, inputs)
    assert torch.equal(again, base_out)


@pytest.mark.parametrize("kind", ["dora", "glora"])
def test_partial_load_merged_lora_under_bypass_weight_readers(kind):
    """Under partial loading a merged LoRA is applied at cast time (the module's weight_function),
    so ``module.weight`` is the base weight: DoRA's norms and GLoRA's W'·A must read the weight
    the forward computes with. Reference: everything merged, in the same order, loaded the same way."""
    base = sc.tiny_flux()
    inputs = sc.flux_inputs()
    merged_lora = sc.make_lora(base.model, "kohya", rank=4, seed=53, alpha=4)
    reader = sc.adapter_lora(base.model, kind, "kohya", seed=54, limit=20)
    with_merged = comfy.sd.load_lora_for_models(base, None, merged_lora, 1.0, 0)[0]
    bypass = comfy.sd.load_bypass_lora_for_models(with_merged, None, reader, 0.8, 0)[0]
    everything = sc.chain(comfy.sd.load_lora_for_models, base, [(merged_lora, 1.0), (reader, 0.8)])
    expected, _ = _run_partially_loaded(everything, inputs)
    got, lowvram = _run_partially_loaded(bypass, inputs)
    assert lowvram > 10
    assert sc.max_rel_diff(expected, _run_partially_loaded(with_merged, inputs)[0]) > 0.05
    assert sc.max_rel_diff(got, expected) <= REL_TOL, kind
    fully_loaded = sc.forward(bypass, inputs)  # the same patcher, fully loaded: module.weight is W'
    assert sc.max_rel_diff(fully_loaded, expected) <= REL_TOL
