"""Every adapter type ComfyUI loads, on whole weights and on fused slices: bypass == merged.

Each adapter takes the fate the load decides for it (freefuse_bypass_patch/slots.py): plain
LoRA in the grouped low-rank path, DoRA, LoHa, LoKr, OFT, BOFT and GLoRA in their factored
forms on Linear, and only what has no factored form (diff functions, Tucker LoHa/LoKr, most
convs) as a transient delta from ComfyUI's own calculate_weight. Runs on
every pinned tree: through the stock loader where bypass mode exists, and through the
plugin's manager directly on 0.3.75.
"""

import pytest
import torch

import comfy.lora
import comfy.sd

from freefuse_bypass_patch import kit as sc
from support import HAS_BYPASS, REL_TOL


def _bypass(base, lora, strength):
    if HAS_BYPASS:
        return comfy.sd.load_bypass_lora_for_models(base, None, lora, strength, 0)[0]
    return sc.manager_bypass(base, [(lora, strength)])[0]


@pytest.mark.parametrize("convention", ["kohya", "diffusers"])
@pytest.mark.parametrize("kind", ["lora", "dora", "loha", "lokr", "oft", "boft", "glora"])
def test_adapter_type_matches_merged(kind, convention):
    base = sc.tiny_flux()
    inputs = sc.flux_inputs()
    lora = sc.adapter_lora(base.model, kind, "onetrainer" if convention == "diffusers" else "kohya", seed=21,
                           limit=6)  # OneTrainer names reach the slices
    key_map = comfy.lora.model_lora_keys_unet(base.model, {})
    loaded = comfy.lora.load_lora(dict(lora), key_map)
    assert len(loaded) == 6 and all(type(a).__name__.lower().startswith(kind[:3]) or kind == "dora"
                                    for a in loaded.values()), [type(a).__name__ for a in loaded.values()]
    if convention == "diffusers":
        assert all(isinstance(k, tuple) and k[1] is not None for k in loaded)
    before = sc.weights_snapshot(base)
    base_out = sc.forward(base, inputs)
    merged_out = sc.forward(comfy.sd.load_lora_for_models(base, None, lora, 0.9, 0)[0], inputs)
    bypass_out = sc.forward(_bypass(base, lora, 0.9), inputs)
    assert sc.max_rel_diff(merged_out, base_out) > 10 * REL_TOL  # the adapter visibly changes the output
    assert sc.max_rel_diff(bypass_out, merged_out) <= REL_TOL
    after = sc.weights_snapshot(base)
    assert all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("kind", ["dora", "oft"])
def test_weight_dependent_adapter_after_a_lora_on_the_same_weights(kind):
    """DoRA and OFT read the weight they patch: merged applies them to W + the earlier LoRA's
    delta, so bypass must too (their deltas do not commute with the LoRA's)."""
    base = sc.tiny_flux()
    inputs = sc.flux_inputs()
    first = sc.make_lora(base.model, "kohya", rank=4, seed=61, alpha=4)
    second = sc.adapter_lora(base.model, kind, "kohya", seed=62, limit=6)
    chain = [(first, 1.0), (second, 0.8)]
    merged = sc.forward(sc.chain(comfy.sd.load_lora_for_models, base, chain), inputs)
    separately = sc.forward(sc.chain(comfy.sd.load_lora_for_models, base, chain[1:]), inputs)
    if HAS_BYPASS:
        bypass = sc.chain(comfy.sd.load_bypass_lora_for_models, base, chain)
    else:  # 0.3.75: one manager holding both, in load order
        bypass = sc.manager_bypass(base, chain)[0]
    assert sc.max_rel_diff(merged, separately) > 10 * REL_TOL
    assert sc.max_rel_diff(sc.forward(bypass, inputs), merged) <= REL_TOL


@pytest.mark.parametrize("tucker", [False, True], ids=["locon", "locon-tucker"])
def test_conv_locon_matches_merged(tucker):
    """A conv LoRA (LoCon, optionally with a Tucker mid) on SD3's patch-embedding Conv2d."""
    if not sc.available("sd3"):
        pytest.skip("this ComfyUI cannot build SD3")
    base = sc.tiny_model("sd3")
    inputs = sc.tiny_inputs("sd3")
    weight = base.model.diffusion_model.x_embedder.proj.weight
    out_ch, in_ch, kh, kw = weight.shape
    gen = torch.Generator().manual_seed(71)
    name, rank = "lora_unet_x_embedder_proj", 4
    lora = {name + ".lora_up.weight": torch.randn(out_ch, rank, 1, 1, generator=gen) * 0.3,
            name + ".alpha": torch.tensor(2.0)}
    if tucker:
        lora[name + ".lora_down.weight"] = torch.randn(rank, in_ch, 1, 1, generator=gen) * 0.3
        lora[name + ".lora_mid.weight"] = torch.randn(rank, rank, kh, kw, generator=gen) * 0.3
    else:
        lora[name + ".lora_down.weight"] = torch.randn(rank, in_ch, kh, kw, generator=gen) * 0.3
    base_out = sc.forward(base, inputs)
    merged = sc.forward(comfy.sd.load_lora_for_models(base, None, lora, 0.8, 0)[0], inputs)
    bypass = sc.forward(_bypass(base, lora, 0.8), inputs)
    assert sc.max_rel_diff(merged, base_out) > 10 * REL_TOL
    assert sc.max_rel_diff(bypass, merged) <= REL_TOL
