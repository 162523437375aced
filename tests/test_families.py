"""Every fused-weight family the tree builds: bypass == merged, weights untouched.

Flux only exercises Flux's key map; SD3, PixArt, Lumina2/Z-Image, Chroma, Flux2 and
AuraFlow each have their own fused layouts (thirds of qkv, halves of kv, 9H-row linear1,
function tuples). Tiny random models are built by the tree's own classes (families.py),
LoRAs come from the tree's own key map. Runs on every pinned tree: through the stock
loader where bypass mode exists, and through the plugin's manager directly everywhere.
"""

import os

import pytest
import torch

import comfy.lora
import comfy.lora_convert
import comfy.sd

from freefuse_bypass_patch import families
from freefuse_bypass_patch import selfcheck as sc
from freefuse_bypass_patch.patching import comfyui_version
from support import REL_TOL, TREE, bypass_era

VERSION = comfyui_version()
if VERSION == "unknown":
    VERSION = os.path.basename(os.path.normpath(TREE))
STRENGTH = 0.8


@pytest.fixture(params=families.FAMILIES)
def family(request):
    if not families.available(request.param):
        pytest.skip("ComfyUI %s (%s) cannot build a %s model" % (VERSION, TREE, request.param))
    return request.param


def _loaded(base, lora):
    key_map = comfy.lora.model_lora_keys_unet(base.model, {})
    return comfy.lora.load_lora(comfy.lora_convert.convert_lora(dict(lora)), key_map)


def _manager_bypass(base, lora, strength):
    """The plugin's manager applied directly (no bypass loader needed, so 0.3.75 too)."""
    return sc.manager_bypass(base, [(lora, strength)])[0]


def _check(family, make_bypass):
    base = families.tiny_model(family)
    inputs = families.tiny_inputs(family)
    lora = families.family_lora(base.model, family)
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
    base = families.tiny_model(family)
    lora = families.family_lora(base.model, family)
    loaded = _loaded(base, lora)
    assert len(loaded) * 2 == len(lora)  # every name found its weight, one patch per target
    forms = families.key_forms(loaded)
    assert forms["whole"] > 0
    if family in families.SLICED:
        assert forms["slice"] > 0, forms
    else:  # AuraFlow: separate q/k/v, the final modulation is the function tuple
        assert forms["function"] > 0, forms


@bypass_era
def test_stock_bypass_loader_matches_merged(family):
    _check(family, lambda base, lora, s: comfy.sd.load_bypass_lora_for_models(base, None, lora, s, 0)[0])


def test_manager_matches_merged(family):
    _check(family, _manager_bypass)
