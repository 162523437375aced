"""Bypass on INT8 layers that ComfyUI runs without calling them (issue 19, part 2).

Since 0.30 ``comfy.ops.linear_input_act`` computes Wan's ``ffn.2`` (and LTXV, MiniMax, Llama
down-projections) as ``comfy_kitchen.int8_linear(act(x), ...)`` when the weight is INT8
tensor-wise: no forward hook runs there. A tiny Wan 2.1 is written as a checkpoint whose
``ffn.2`` layers are INT8 with ``comfy_quant`` metadata and loaded by ComfyUI's own loader
(``kit.int8``); every factored adapter type is loaded with the real bypass loader and compared
with the same file merged.

Tolerance: ComfyUI's own INT8 rounding, measured per case as merged fully loaded (W+ΔW
re-quantized to INT8, activations quantized by the kernel) vs merged under lowvram (patches
applied at cast time: a dequantized weight, plain F.linear). Bypass keeps the checkpoint's INT8
base and adds the adapters in fp32. Measured on 0.33.0 (max|diff| / max|merged|, per type):
tolerance 7e-5 (OFT, BOFT) to 2.2e-3 (DoRA), bypass vs merged 0.95x to 1.10x it, the LoRAs' effect
2.5e-2 to 1.9e-1. Asserted: within TOL_FACTOR times it, and the same patcher with the wrapper
removed (its ffn.2 adapters lost, as stock ComfyUI loses them) off by more than MISS_FACTOR
times it (measured 17x to 118x).
"""

import contextlib
import os
import tempfile

import pytest
import torch

import comfy.ops
import comfy.sd

import freefuse_bypass_patch as ffbp
from freefuse_bypass_patch import kit as sc
from freefuse_bypass_patch.hooks import ACTIVE_HOOK_ATTR
from freefuse_bypass_patch.kit import int8 as k8
from support import REL_TOL, bypass_era

pytestmark = bypass_era
needs_input_act = pytest.mark.skipif(
    not k8.has_input_act_linear(), reason="this ComfyUI has no comfy.ops.linear_input_act (added in 0.30): "
                                          "every Linear is called, its forward hook runs")

KINDS = ("lora", "loha", "lokr", "glora", "dora", "oft", "boft")
# sizes whose effect on this tiny Wan is 1-20% (LoHa's default factors change its output ~50x; OFT's
# and BOFT's default, norm-constrained blocks ~0.5%, too close to the INT8 rounding; alpha 0: no constraint)
OPTIONS = {"loha": dict(scale=0.3), "oft": dict(scale=2.0, alpha=0.0), "boft": dict(scale=1.5, alpha=0.0)}
TOL_FACTOR = 3.0  # bypass vs merged, in units of merged's own INT8 rounding
MISS_FACTOR = 5.0  # what the lost ffn.2 adapters cost, in the same units (measured 17-118x)
BUDGET = 64 * 1024  # bytes: partial load, most layers cast at forward time (as test_lowvram.py)


@pytest.fixture(scope="module")
def wan():
    """(INT8 Wan patcher, inputs, names of its INT8 modules), loaded from a checkpoint by ComfyUI."""
    sd, metadata = k8.wan_checkpoint(seed=0)
    path = k8.save_checkpoint(sd, metadata, os.path.join(tempfile.mkdtemp(prefix="ffbp_int8_"), "wan.safetensors"))
    patcher = k8.load_wan(path)
    names = k8.int8_modules(patcher)
    assert names == ["blocks.0.ffn.2", "blocks.1.ffn.2"]
    return patcher, k8.wan_inputs(), names


def _block_lora(patcher, kind, seed):
    targets = [t for t in sc.lora_targets(patcher.model, "kohya") if t[0].startswith("lora_unet_blocks_")]
    lora = sc.adapter_lora(patcher.model, kind, "kohya", seed=seed, targets=targets, **OPTIONS.get(kind, {}))
    assert any(k.startswith("lora_unet_blocks_1_ffn_2.") for k in lora)
    return lora


@contextlib.contextmanager
def _module_calls(patcher, names):
    """Counts calls of the named modules (a forward pre-hook each) while active."""
    count = [0]
    handles = [patcher.model.diffusion_model.get_submodule(n).register_forward_pre_hook(
        lambda *_: count.__setitem__(0, count[0] + 1)) for n in names]
    try:
        yield count
    finally:
        for handle in handles:
            handle.remove()


def _forward_counted(patcher, inputs, names):
    """One forward as ComfyUI runs it: (output, int8_linear calls, calls of the named modules)."""
    with k8.counting_int8_linear() as kernel, _module_calls(patcher, names) as called:
        out = sc.forward(patcher, inputs)
    return out, kernel[0], called[0]


def _partially_loaded(patcher, inputs):
    patcher.patch_model(torch.device("cpu"), lowvram_model_memory=BUDGET)
    try:
        lowvram = sum(1 for m in patcher.model.modules() if getattr(m, "comfy_cast_weights", False))
        with k8.counting_int8_linear() as kernel:
            return sc.apply_model(patcher, inputs).clone(), lowvram, kernel[0]
    finally:
        patcher.unpatch_model()


@contextlib.contextmanager
def _without_plugin():
    """The plugin uninstalled (a model loaded before keeps its hooks), installed again after."""
    ffbp.uninstall()
    try:
        yield
    finally:
        ffbp.install()
    assert getattr(comfy.ops.linear_input_act, "_self_freefuse_bypass_patch", False)


def test_capability_follows_the_tree():
    """Wrapped exactly where the tree has linear_input_act; elsewhere nothing in comfy.ops changes."""
    assert ffbp.capabilities().input_act_linear == k8.has_input_act_linear()
    wrapped = getattr(getattr(comfy.ops, "linear_input_act", None), "_self_freefuse_bypass_patch", False)
    assert wrapped == k8.has_input_act_linear()


@needs_input_act
def test_wrapper_installed_once_and_removed():
    assert ffbp.capabilities().input_act_linear
    wrapped = comfy.ops.linear_input_act
    assert getattr(wrapped, "_self_freefuse_bypass_patch", False)
    ffbp.install()
    assert comfy.ops.linear_input_act is wrapped  # idempotent: not wrapped twice
    with _without_plugin():
        assert not hasattr(comfy.ops.linear_input_act, "__wrapped__")
        assert comfy.ops.linear_input_act is wrapped.__wrapped__


@needs_input_act
@pytest.mark.parametrize("kind", KINDS)
def test_int8_bypass_equals_merged(wan, kind):
    patcher, inputs, names = wan
    lora = _block_lora(patcher, kind, seed=KINDS.index(kind) + 11)
    base = sc.forward(patcher, inputs)
    merged = comfy.sd.load_lora_for_models(patcher, None, lora, 0.8, 0)[0]
    merged_full, merged_kernel, _ = _forward_counted(merged, inputs, names)
    merged_low, lowvram, _ = _partially_loaded(merged, inputs)
    assert merged_kernel == len(names) and lowvram > 10  # re-quantized INT8 vs patched at cast time
    tolerance = sc.max_rel_diff(merged_full, merged_low)
    assert 0 < tolerance < 0.1, tolerance
    effect = sc.max_rel_diff(merged_full, base)
    assert effect > 10 * tolerance, (effect, tolerance)

    bypass = comfy.sd.load_bypass_lora_for_models(patcher, None, lora, 0.8, 0)[0]
    out, kernel, called = _forward_counted(bypass, inputs, names)
    assert kernel == len(names) and called == 0  # ffn.2 ran on the INT8 kernel, its module never called
    error = sc.max_rel_diff(out, merged_full)
    assert error <= TOL_FACTOR * tolerance, (kind, error, tolerance)

    with _without_plugin():  # the hooks stay; only linear_input_act is stock again
        lost = sc.max_rel_diff(sc.forward(bypass, inputs), merged_full)
    assert lost > MISS_FACTOR * tolerance, (kind, lost, tolerance)
    assert torch.equal(sc.forward(patcher, inputs), base)  # the base model is untouched
    assert all(ACTIVE_HOOK_ATTR not in m.__dict__ for m in patcher.model.modules())


@needs_input_act
def test_int8_bypass_partially_loaded(wan):
    """Under lowvram the INT8 ffn.2 still runs on the kernel (no patch on it), and the adapters are added."""
    patcher, inputs, names = wan
    lora = _block_lora(patcher, "lora", seed=31)
    merged_low, _, _ = _partially_loaded(comfy.sd.load_lora_for_models(patcher, None, lora, 1.0, 0)[0], inputs)
    merged_full = sc.forward(comfy.sd.load_lora_for_models(patcher, None, lora, 1.0, 0)[0], inputs)
    tolerance = sc.max_rel_diff(merged_full, merged_low)
    out, lowvram, kernel = _partially_loaded(comfy.sd.load_bypass_lora_for_models(patcher, None, lora, 1.0, 0)[0],
                                             inputs)
    assert lowvram > 10 and kernel == len(names)
    assert sc.max_rel_diff(out, merged_low) <= TOL_FACTOR * tolerance


@needs_input_act
def test_called_module_not_doubled():
    """Plain fp32 weights: linear_input_act calls the module, its hook adds the adapters, the wrapper nothing."""
    sd, metadata = k8.wan_checkpoint(seed=2, int8=())
    path = k8.save_checkpoint(sd, metadata, os.path.join(tempfile.mkdtemp(prefix="ffbp_int8_"), "wan.safetensors"))
    patcher = k8.load_wan(path)
    assert k8.int8_modules(patcher) == []
    inputs, names = k8.wan_inputs(), ["blocks.0.ffn.2", "blocks.1.ffn.2"]
    lora = _block_lora(patcher, "lora", seed=41)
    merged = sc.forward(comfy.sd.load_lora_for_models(patcher, None, lora, 1.0, 0)[0], inputs)
    out, kernel, called = _forward_counted(comfy.sd.load_bypass_lora_for_models(patcher, None, lora, 1.0, 0)[0],
                                           inputs, names)
    assert kernel == 0 and called == len(names)
    assert sc.max_rel_diff(out, merged) <= REL_TOL


def test_unknown_linear_input_act_signature_left_alone(monkeypatch, caplog):
    """A linear_input_act whose signature we do not know is not wrapped: one warning, the rest of the
    plugin active (on every tree: where there is none, one is put there for the test)."""
    import logging

    def linear_input_act(module, inputs, activation):  # a future, different API
        return module(inputs)

    ffbp.uninstall()
    monkeypatch.setattr(comfy.ops, "linear_input_act", linear_input_act, raising=False)
    try:
        with caplog.at_level(logging.INFO):
            assert ffbp.install() is True
        assert comfy.ops.linear_input_act is linear_input_act and ffbp.is_patched()
        caps = ffbp.capabilities()
        assert not caps.input_act_linear and caps.patchable
        warnings = [r for r in caplog.records if "linear_input_act" in r.getMessage()]
        assert len(warnings) == 1 and warnings[0].levelno == logging.WARNING
    finally:
        ffbp.uninstall()
        monkeypatch.undo()
        ffbp.install()
    assert ffbp.capabilities().input_act_linear == k8.has_input_act_linear()
