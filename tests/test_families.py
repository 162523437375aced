"""Every fused-weight family the tree builds: bypass == merged, weights untouched.

Flux only exercises Flux's key map; SD3, PixArt, Lumina2/Z-Image, Chroma, Flux2 and
AuraFlow each have their own fused layouts (thirds of qkv, halves of kv, 9H-row linear1,
function tuples). Tiny random models are built by the tree's own classes (kit.models),
LoRAs come from the tree's own key map. Runs on every pinned tree: through the stock
loader where bypass mode exists, and through the plugin's manager directly everywhere.
"""

import os

import pytest
import torch

import comfy.lora
import comfy.lora_convert
import comfy.sd

from freefuse_bypass_patch import kit as sc
from freefuse_bypass_patch.patching import comfyui_version
import support
from support import REL_TOL, TREE, bypass_era

VERSION = comfyui_version()
if VERSION == "unknown":
    VERSION = os.path.basename(os.path.normpath(TREE))
STRENGTH = 0.8


@pytest.fixture(params=sc.FAMILIES)
def family(request):
    if not sc.available(request.param):
        pytest.skip("ComfyUI %s (%s) cannot build a %s model" % (VERSION, TREE, request.param))
    return request.param


def _loaded(base, lora):
    key_map = comfy.lora.model_lora_keys_unet(base.model, {})
    return comfy.lora.load_lora(comfy.lora_convert.convert_lora(dict(lora)), key_map)


def _manager_bypass(base, lora, strength):
    """The plugin's manager applied directly (no bypass loader needed, so 0.3.75 too)."""
    return sc.manager_bypass(base, [(lora, strength)])[0]


def _check(family, make_bypass, base=None, lora=None):
    base = sc.tiny_model(family) if base is None else base
    inputs = sc.tiny_inputs(family)
    lora = sc.family_lora(base.model, family) if lora is None else lora
    before = sc.weights_snapshot(base)
    base_out = sc.forward(base, inputs)
    merged_out = sc.forward(comfy.sd.load_lora_for_models(base, None, lora, STRENGTH, 0)[0], inputs)
    with sc.LogCapture() as logs:
        bypass_out = sc.forward(make_bypass(base, lora, STRENGTH), inputs)
    after_out = sc.forward(base, inputs)
    after = sc.weights_snapshot(base)
    assert logs.count("not in model state_dict") == 0  # nothing dropped
    assert sc.max_rel_diff(merged_out, base_out) > 10 * REL_TOL  # the LoRA visibly changes the output
    rel = sc.max_rel_diff(bypass_out, merged_out)
    assert rel <= REL_TOL, "%s on ComfyUI %s: max|bypass - merged|/max = %.3e" % (family, VERSION, rel)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert torch.equal(after_out, base_out)


def test_family_lora_reaches_fused_weights(family):
    base = sc.tiny_model(family)
    lora = sc.family_lora(base.model, family)
    loaded = _loaded(base, lora)
    assert len(loaded) * 2 == len(lora)  # every name found its weight, one patch per target
    forms = sc.key_forms(loaded)
    assert forms["whole"] > 0
    if family in sc.SLICED:
        assert forms["slice"] > 0, forms
    else:  # AuraFlow: separate q/k/v, the final modulation is the function tuple
        assert forms["function"] > 0, forms


@bypass_era
def test_stock_bypass_loader_matches_merged(family):
    _check(family, lambda base, lora, s: comfy.sd.load_bypass_lora_for_models(base, None, lora, s, 0)[0])


def test_manager_matches_merged(family):
    _check(family, _manager_bypass)


@pytest.mark.parametrize("convention", ["onetrainer", "lycoris", "kohya", "native"])
def test_family_naming_conventions_match_merged(family, convention):
    """Every naming convention this tree's key map has for the family (skipped where it has none)."""
    base = sc.tiny_model(family)
    if not sc.named_targets(base.model, sc.CONVENTIONS[convention][0]):
        pytest.skip("ComfyUI %s maps no %s names for %s" % (VERSION, convention, family))
    lora = sc.family_lora(base.model, family, convention=convention, seed=91)
    assert len(_loaded(base, lora)) * 2 == len(lora)

    def bypass(base, lora, strength):
        if support.HAS_BYPASS:
            return comfy.sd.load_bypass_lora_for_models(base, None, lora, strength, 0)[0]
        return _manager_bypass(base, lora, strength)

    _check(family, bypass, base=base, lora=lora)


KINDS = ("dora", "loha", "lokr", "oft", "boft", "glora")


def _family_adapter_lora(model, kind, seed, limit=16):
    """``kind`` adapters on up to ``limit`` targets, the family's fused slices first, then whole
    weights (diffusers-style names). Returns (state dict, number of targets)."""
    targets = sc.named_targets(model, "transformer.")
    if not any(isinstance(t, tuple) for _, t, _ in targets):
        targets = sc.named_targets(model, "diffusion_model.")
    targets = sorted(targets, key=lambda item: not (isinstance(item[1], tuple) and item[1][1] is not None))
    sd = sc.adapter_lora(model, kind, seed=seed, limit=limit, targets=targets)
    return sd, sum(1 for key in sd if key.endswith(".alpha"))  # one alpha per adapter


# Strengths that keep every family's output in a sane range (a LoRA that triples the
# output amplifies fp32 rounding through softmax and norms); OFT/BOFT rotate, so full.
KIND_STRENGTH = {"oft": 1.0, "boft": 1.0}


@pytest.mark.parametrize("kind", KINDS)
def test_family_adapter_types_match_merged(family, kind):
    """Family x adapter type: every type on the family's fused slices and whole weights."""
    base = sc.tiny_model(family)
    inputs = sc.tiny_inputs(family)
    lora, targets = _family_adapter_lora(base.model, kind, seed=81)
    loaded = _loaded(base, lora)
    assert len(loaded) == targets
    if family in sc.SLICED:
        assert sc.key_forms(loaded)["slice"] > 0
    base_out = sc.forward(base, inputs)
    strength = KIND_STRENGTH.get(kind, 0.3)
    merged_out = sc.forward(comfy.sd.load_lora_for_models(base, None, lora, strength, 0)[0], inputs)
    if support.HAS_BYPASS:
        bypass = comfy.sd.load_bypass_lora_for_models(base, None, lora, strength, 0)[0]
    else:
        bypass = _manager_bypass(base, lora, strength)
    bypass_out = sc.forward(bypass, inputs)
    effect = sc.max_rel_diff(merged_out, base_out)
    rel = sc.max_rel_diff(bypass_out, merged_out)
    print("MATRIX %s %s %s effect %.2e max|bypass-merged|/max %.3e" % (VERSION, family, kind, effect, rel))
    assert effect > 10 * REL_TOL
    assert rel <= REL_TOL, "%s/%s on ComfyUI %s: max|bypass - merged|/max = %.3e" % (family, kind, VERSION, rel)
