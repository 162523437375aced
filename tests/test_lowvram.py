"""Partial loading (ComfyUI's lowvram path) on CPU: with a memory budget far below the
model's size, ComfyUI leaves most weights to be cast at forward time; bypass must still
equal merged loaded the same way, and unpatching must restore the base output."""

import sys

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


@pytest.mark.parametrize("kind", ["dora", "oft"])
def test_partial_load_merged_lora_after_a_bypass_weight_reader(kind):
    """Issue 20: the merged LoRA comes after the bypass reader and is applied at cast time; the
    replay undoes it from the weight the cast gives, not from ``module.weight``. Reference: the
    same graph merged, loaded the same way (fp32 rounding: REL_TOL of the output)."""
    base = sc.tiny_flux()
    inputs = sc.flux_inputs()
    reader = sc.adapter_lora(base.model, kind, "kohya", seed=56, limit=20)
    merged_lora = sc.make_lora(base.model, "kohya", rank=4, seed=57, alpha=4)
    bypass = comfy.sd.load_lora_for_models(comfy.sd.load_bypass_lora_for_models(base, None, reader, 0.8, 0)[0],
                                           None, merged_lora, 1.0, 0)[0]
    everything = sc.chain(comfy.sd.load_lora_for_models, base, [(reader, 0.8), (merged_lora, 1.0)])
    expected, _ = _run_partially_loaded(everything, inputs)
    got, lowvram = _run_partially_loaded(bypass, inputs)
    assert lowvram > 10
    assert sc.max_rel_diff(got, expected) <= REL_TOL, kind
    assert sc.max_rel_diff(sc.forward(bypass, inputs), expected) <= REL_TOL  # fully loaded: W' patched in place


def test_every_cast_that_reads_a_weight_is_uncast():
    """Issue 20: ComfyUI's own ops pair ``cast_bias_weight(..., offloadable=True)`` with
    ``uncast_bias_weight`` (under DynamicVRAM the cast pins the module until then); so does every
    read of W' (DoRA's norms here, under partial loading, where the reads go through the cast)."""
    import comfy.ops

    if not hasattr(comfy.ops, "uncast_bias_weight"):
        pytest.skip("this ComfyUI has no uncast_bias_weight (no async offload)")
    base = sc.tiny_flux()
    inputs = sc.flux_inputs()
    dora = sc.adapter_lora(base.model, "dora", "kohya", seed=55, limit=8)
    bypass = comfy.sd.load_bypass_lora_for_models(base, None, dora, 0.8, 0)[0]
    cast, uncast, seen = comfy.ops.cast_bias_weight, comfy.ops.uncast_bias_weight, []

    def caller():  # the module that called the cast: ComfyUI's own ops pair their casts as each tree does
        return sys._getframe(2).f_globals.get("__name__", "")

    def counting_cast(module, *args, **kwargs):
        seen.append(("cast", caller(), kwargs.get("offloadable", args[4] if len(args) > 4 else False)))
        return cast(module, *args, **kwargs)

    def counting_uncast(module, *args, **kwargs):
        seen.append(("uncast", caller(), True))
        return uncast(module, *args, **kwargs)

    comfy.ops.cast_bias_weight, comfy.ops.uncast_bias_weight = counting_cast, counting_uncast
    try:
        out, _ = _run_partially_loaded(bypass, inputs)
    finally:
        comfy.ops.cast_bias_weight, comfy.ops.uncast_bias_weight = cast, uncast
    ours = [(kind, offloadable) for kind, where, offloadable in seen if where == "freefuse_bypass_patch.weights"]
    casts = [offloadable for kind, offloadable in ours if kind == "cast"]
    assert casts, "W' was not read through the cast"
    assert all(casts), "a cast without offloadable=True (never uncast)"
    assert len(casts) == sum(1 for kind, _ in ours if kind == "uncast")
    merged, _ = _run_partially_loaded(comfy.sd.load_lora_for_models(base, None, dora, 0.8, 0)[0], inputs)
    assert sc.max_rel_diff(out, merged) <= REL_TOL
