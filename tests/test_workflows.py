"""A bypass LoRA inside a workflow (issue 20): model merges after it, with ComfyUI's own nodes.

ModelMergeSimple, ModelSubtract and the block merge add model2 with ``add_patches(kp, 1 - ratio,
ratio)`` (ModelSubtract: ``-m, m``), and ``calculate_weight`` scales the weight patched so far by
``ratio``: a merged LoRA on model1 ends up scaled by it, and so must a bypass one. The reference
is always the same graph with every LoRA merged. Differences are stated relative to the LoRA's
effect on that graph's output (fp32 rounding: ~1e-6 of the effect measured; 1e-4 allowed).
"""

import importlib
import logging

import comfy.sd
import pytest
import torch

import freefuse_bypass_patch as ffbp
from freefuse_bypass_patch import kit as sc
from support import REL_TOL, bypass_era

pytestmark = bypass_era

EFFECT_TOL = 1e-4


def _merging():
    for name in ("comfy_extras.nodes_model_merging", "comfy_extras.nodes.nodes_model_merging"):
        try:
            return importlib.import_module(name)
        except ImportError:
            continue
    pytest.skip("this ComfyUI has no model merging nodes")


def _merge(node: str, model1, model2, *args, **kwargs):
    cls = getattr(_merging(), node)
    obj = cls()
    out = getattr(obj, getattr(cls, "FUNCTION", "merge"))(model1, model2, *args, **kwargs)
    out = getattr(out, "result", out)  # V3 nodes return a NodeOutput
    return out[0]


MERGES = {
    "simple 0.5": ("ModelMergeSimple", (0.5,), {}),
    "simple 0.25": ("ModelMergeSimple", (0.25,), {}),
    "subtract 0.7": ("ModelSubtract", (0.7,), {}),
    "blocks": ("ModelMergeBlocks", (), {"input": 0.3, "middle": 0.6, "out": 0.8}),
}


def _close(got, want, base_out):
    effect = (want - base_out).abs().max().item()
    return (got - want).abs().max().item() / effect, effect


@pytest.mark.parametrize("merge", sorted(MERGES))
@pytest.mark.parametrize("kind", ["diffusers", "lokr"])
def test_model_merge_after_a_bypass_lora_scales_it_as_merged(merge, kind):
    node, args, kwargs = MERGES[merge]
    model1, model2 = sc.tiny_flux(seed=0), sc.tiny_flux(seed=5)
    inputs = sc.flux_inputs()
    lora = (sc.make_lora(model1.model, "diffusers", rank=4, seed=71) if kind == "diffusers"
            else sc.adapter_lora(model1.model, "lokr", "kohya", seed=72))
    base_before = sc.forward(model1, inputs)
    bypass = comfy.sd.load_bypass_lora_for_models(model1, None, lora, 0.9, 0)[0]
    merged = comfy.sd.load_lora_for_models(model1, None, lora, 0.9, 0)[0]
    want = sc.forward(_merge(node, merged, model2, *args, **kwargs), inputs)
    plain = sc.forward(_merge(node, model1, model2, *args, **kwargs), inputs)
    got = sc.forward(_merge(node, bypass, model2, *args, **kwargs), inputs)
    rel, effect = _close(got, want, plain)
    assert effect > 1e-3 and rel <= EFFECT_TOL, (rel, effect)
    assert sc.max_rel_diff(sc.forward(bypass, inputs), sc.forward(merged, inputs)) <= REL_TOL  # unmerged: as before
    assert torch.equal(sc.forward(model1, inputs), base_before)  # ejecting restores the base bit for bit


def test_merge_with_two_chained_bypass_loras_and_the_switch():
    model1, model2 = sc.tiny_flux(seed=0), sc.tiny_flux(seed=5)
    inputs = sc.flux_inputs()
    a = sc.make_lora(model1.model, "diffusers", rank=4, seed=73)
    b = sc.make_lora(model1.model, "kohya", rank=4, seed=74)
    chained = sc.chain(comfy.sd.load_bypass_lora_for_models, model1, [(a, 1.0), (b, 0.7)])
    both = sc.chain(comfy.sd.load_lora_for_models, model1, [(a, 1.0), (b, 0.7)])
    only_b = sc.chain(comfy.sd.load_lora_for_models, model1, [(b, 0.7)])
    plain = sc.forward(_merge("ModelMergeSimple", model1, model2, 0.4), inputs)
    merged_chain = _merge("ModelMergeSimple", chained, model2, 0.4)
    rel, _ = _close(sc.forward(merged_chain, inputs), sc.forward(_merge("ModelMergeSimple", both, model2, 0.4),
                                                                 inputs), plain)
    assert rel <= EFFECT_TOL
    a_off = ffbp.with_loras_enabled(merged_chain, {0: False})
    rel, _ = _close(sc.forward(a_off, inputs), sc.forward(_merge("ModelMergeSimple", only_b, model2, 0.4), inputs),
                    plain)
    assert rel <= EFFECT_TOL
    everything_off = ffbp.with_loras_enabled(merged_chain, {0: False, 1: False})
    assert torch.equal(sc.forward(everything_off, inputs), plain)


def test_a_bypass_lora_on_model2_is_named_once(caplog):
    """``get_key_patches`` carries weights and patches, not hooks: model2's bypass LoRA is left
    out of the merge, as stock does, and the plugin says so once per patcher."""
    model1, model2 = sc.tiny_flux(seed=0), sc.tiny_flux(seed=5)
    inputs = sc.flux_inputs()
    lora = sc.make_lora(model2.model, "diffusers", rank=4, seed=75)
    bypass2 = comfy.sd.load_bypass_lora_for_models(model2, None, lora, 1.0, 0)[0]
    with caplog.at_level(logging.WARNING):
        out = sc.forward(_merge("ModelMergeSimple", model1, bypass2, 0.5), inputs)
        _merge("ModelMergeSimple", model1, bypass2, 0.25)
    named = [r for r in caplog.records if "get_key_patches" in r.getMessage()]
    assert len(named) == 1 and "lora_0" in named[0].getMessage()
    assert torch.equal(out, sc.forward(_merge("ModelMergeSimple", model1, model2, 0.5), inputs))


@pytest.mark.parametrize("after", ["merge", "merged LoRA"])
def test_a_weight_reader_with_patches_after_it_is_named_once(caplog, after):
    """A DoRA's norms read W'; a model merge or a merged LoRA after it changes W' in a way a hook
    cannot take back: named once when the model is loaded, never an error in a forward."""
    model1, model2 = sc.tiny_flux(seed=0), sc.tiny_flux(seed=5)
    inputs = sc.flux_inputs()
    dora = sc.adapter_lora(model1.model, "dora", "kohya", seed=76, limit=4)
    bypass = comfy.sd.load_bypass_lora_for_models(model1, None, dora, 1.0, 0)[0]
    if after == "merge":
        later = _merge("ModelMergeSimple", bypass, model2, 0.5)
    else:
        later = comfy.sd.load_lora_for_models(bypass, None, sc.adapter_lora(model1.model, "lora", "kohya", seed=77,
                                                                             limit=4), 1.0, 0)[0]
    with caplog.at_level(logging.WARNING):
        sc.forward(later, inputs)
        sc.forward(later, inputs)
    named = [r.getMessage() for r in caplog.records if "after bypass adapter(s) that read" in r.getMessage()]
    assert len(named) == 4 and all("LoRA (DoRA)" in m for m in named), named  # one line per module, once
