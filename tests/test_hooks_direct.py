"""hooks.py/manager.py on real load_lora output of a real tiny Flux, on every pinned tree.

This runs on ComfyUI 0.3.75 too (which has no bypass mode): the manager only needs
ModelPatcher injections, which exist since late 2024.
"""

import pytest
import torch

import comfy.lora
import comfy.model_management as mm
import comfy.sd

from freefuse_bypass_patch import kit as sc
from freefuse_bypass_patch.hooks import ACTIVE_HOOK_ATTR
from support import REL_TOL


def _bypass_direct(base, lora, strength, layout="auto"):
    patcher, manager = sc.manager_bypass(base, [(lora, strength)], layout)
    return patcher, [slot.key for slot in manager.slots], manager


@pytest.mark.parametrize("convention", ["diffusers", "onetrainer", "lycoris", "kohya"])
def test_manager_matches_merged(convention):
    base = sc.tiny_flux()
    inputs = sc.flux_inputs()
    lora = sc.make_lora(base.model, convention, rank=4, seed=5, alpha=2)
    before = sc.weights_snapshot(base)
    base_out = sc.forward(base, inputs)
    merged_out = sc.forward(comfy.sd.load_lora_for_models(base, None, lora, 0.7, 0)[0], inputs)
    patcher, loaded, manager = _bypass_direct(base, lora, 0.7)
    bypass_out = sc.forward(patcher, inputs)

    assert sc.max_rel_diff(merged_out, base_out) > 0.05
    assert sc.max_rel_diff(bypass_out, merged_out) <= REL_TOL
    after = sc.weights_snapshot(base)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert torch.equal(sc.forward(base, inputs), base_out)  # ejected: base, bit for bit
    assert not any(ACTIVE_HOOK_ATTR in m.__dict__ or m._forward_hooks for m in base.model.modules())
    if convention != "kohya":  # diffusers-style names reach the fused slices
        assert sum(isinstance(k, tuple) and k[1] is not None for k in loaded) == 20


def test_fused_linear1_gets_one_hook_with_all_slices():
    base = sc.tiny_flux()
    lora = sc.make_lora(base.model, "diffusers", rank=4, seed=6)
    _, _, manager = _bypass_direct(base, lora, 1.0)
    hooks = {h.module_path: h for h in manager.hooks}
    linear1 = hooks["diffusion_model.single_blocks.0.linear1"]
    # to_q/to_k/to_v/proj_mlp slices (a Flux.1 diffusers LoRA has no whole-weight linear1 key)
    offsets = sorted(s.target.offset for s in linear1.slots)
    assert offsets == [(0, 0, 64), (0, 64, 64), (0, 128, 64), (0, 192, 256)]
    assert len(linear1.form_slots) == len(offsets) and not linear1.transient_groups  # all factored
    qkv = hooks["diffusion_model.double_blocks.1.img_attn.qkv"]
    assert len(qkv.slots) == 3
    assert len(manager.hooks) == len({s.target.module_path for s in manager.slots})


@pytest.mark.parametrize("layout", ["sliced", "block"])
def test_both_up_projection_layouts_match_merged(layout):
    base = sc.tiny_flux()
    inputs = sc.flux_inputs()
    lora = sc.make_lora(base.model, "diffusers", rank=3, seed=12, alpha=1.5)
    merged = comfy.sd.load_lora_for_models(base, None, lora, 1.3, 0)[0]
    patcher, _, manager = _bypass_direct(base, lora, 1.3, layout)
    mm.load_models_gpu([patcher])
    try:
        out = sc.apply_model(patcher, inputs).clone()
        fused = {h.module_path.rsplit(".", 1)[-1]: seg.grouped for h in manager.hooks
                 if len({s.target.offset for s in h.slots}) > 1
                 for built in h._built.values() for seg in built.segments}  # qkv and linear1: several slices
    finally:
        mm.unload_all_models()
    assert sc.max_rel_diff(out, sc.forward(merged, inputs)) <= REL_TOL
    # block-diagonal where its zero blocks keep it within twice the factors: q/k/v thirds, not
    # linear1's q/k/v/mlp (its zero-padded up would be 2.9x the factors at Flux's 1:1:1:4 slices)
    assert set(fused) == {"qkv", "linear1"}
    assert (fused["qkv"].up_full_t is not None) == (layout == "block")
    assert fused["linear1"].up_full_t is None
    assert not any(h._built for h in manager.hooks)  # cast factors dropped on eject


def test_two_loras_on_one_module_add_up():
    base = sc.tiny_flux()
    inputs = sc.flux_inputs()
    a = sc.make_lora(base.model, "diffusers", rank=4, seed=7, only="slices")
    b = sc.make_lora(base.model, "diffusers", rank=2, seed=8, only="slices")
    merged = sc.chain(comfy.sd.load_lora_for_models, base, [(a, 1.0), (b, -0.5)])
    patcher, _ = sc.manager_bypass(base, [(a, 1.0), (b, -0.5)])
    assert sc.max_rel_diff(sc.forward(patcher, inputs), sc.forward(merged, inputs)) <= REL_TOL
