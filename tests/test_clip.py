"""Bypass LoRAs on a text encoder (ComfyUI's own SD1 CLIP-L class, tiny): chained LoRAs all
stay active, the CLIP they were cloned from keeps its own, and bypass equals merged."""

import pytest

import comfy.lora
import comfy.model_management as mm
import comfy.model_patcher
import comfy.sd
import comfy.sd1_clip
import torch

from freefuse_bypass_patch import kit as sc
from support import REL_TOL, bypass_era

pytestmark = bypass_era

TINY_CLIP_L = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
               "projection_dim": 32}


def tiny_clip(seed=0):
    model = comfy.sd1_clip.SD1ClipModel(device="cpu", dtype=torch.float32,
                                        model_options={"clip_l_model_config": dict(TINY_CLIP_L)})
    sc.randomize_(model, seed)
    clip = comfy.sd.CLIP(no_init=True)  # the attributes CLIP.clone() copies; no checkpoint to load
    clip.cond_stage_model = model
    clip.patcher = comfy.model_patcher.ModelPatcher(model, load_device=torch.device("cpu"),
                                                    offload_device=torch.device("cpu"))
    clip.tokenizer = comfy.sd1_clip.SD1Tokenizer(embedding_directory=None)
    clip.layer_idx, clip.tokenizer_options = None, {}
    clip.use_clip_schedule, clip.apply_hooks_to_conds = False, None
    return clip


def encode(clip):
    tokens = torch.tensor([[49406, 320, 1125, 539, 320, 2368] + [49407] * 71])  # CLIP-L: 77 positions
    mm.load_models_gpu([clip.patcher])
    try:
        with torch.no_grad():
            return clip.cond_stage_model.clip_l.transformer(tokens)[0].clone()
    finally:
        mm.unload_all_models()


def clip_lora(clip, seed, rank=4):
    gen = torch.Generator().manual_seed(seed)
    shapes = {k: tuple(v.shape) for k, v in clip.cond_stage_model.state_dict().items()}
    sd = {}
    for name, target in comfy.lora.model_lora_keys_clip(clip.cond_stage_model, {}).items():
        if name.startswith("lora_te_") and isinstance(target, str) and len(shapes.get(target, ())) == 2:
            rows, cols = shapes[target]
            sd[name + ".lora_down.weight"] = torch.randn(rank, cols, generator=gen) * 0.3
            sd[name + ".lora_up.weight"] = torch.randn(rows, rank, generator=gen) * 0.3
    return sd


def test_chained_clip_loras_stay_active_and_match_merged():
    clip = tiny_clip()
    a, b = clip_lora(clip, 1), clip_lora(clip, 2)
    assert len(a) >= 24
    base_out = encode(clip)
    merged = comfy.sd.load_lora_for_models(None, clip, a, 0, 0.7)[1]
    merged = comfy.sd.load_lora_for_models(None, merged, b, 0, 1.2)[1]
    merged_a = encode(comfy.sd.load_lora_for_models(None, clip, a, 0, 0.7)[1])
    merged_out = encode(merged)

    first = comfy.sd.load_bypass_lora_for_models(None, clip, a, 0, 0.7)[1]
    second = comfy.sd.load_bypass_lora_for_models(None, first, b, 0, 1.2)[1]
    assert sc.max_rel_diff(merged_out, base_out) > 0.05 and sc.max_rel_diff(merged_out, merged_a) > 0.05
    assert sc.max_rel_diff(encode(second), merged_out) <= REL_TOL  # both LoRAs active
    assert sc.max_rel_diff(encode(first), merged_a) <= REL_TOL  # the first keeps its own only
    assert torch.equal(encode(clip), base_out)


def test_masks_and_the_switch_refuse_a_text_encoder_patcher():
    """They act on the diffusion model; on a CLIP patcher they would do nothing, so they say so."""
    import freefuse_bypass_patch as ffbp

    clip = comfy.sd.load_bypass_lora_for_models(None, tiny_clip(), clip_lora(tiny_clip(), 3), 0, 1.0)[1]
    assert ffbp.bypass_loras(clip.patcher) == ["lora_0"]
    with pytest.raises(ValueError, match="diffusion model's patcher; SD1ClipModel has none"):
        ffbp.set_loras_enabled(clip.patcher, {0: False})
    with pytest.raises(ffbp.LoraMaskError, match="SD1ClipModel is not supported"):
        ffbp.set_lora_masks(clip.patcher, {0: torch.ones(4)})
    assert ffbp.loras_enabled(clip.patcher) == {"lora_0": True}


def test_merged_lora_after_a_bypass_dora_on_the_text_encoder():
    """Issue 20 on a CLIP patcher: a merged LoRA loaded after a bypass DoRA is undone and applied
    again after it in each forward (the replay), == both merged in that order."""
    clip = tiny_clip()
    dora = clip_lora(clip, 4)
    gen = torch.Generator().manual_seed(5)
    for name in [k[: -len(".lora_up.weight")] for k in dora if k.endswith(".lora_up.weight")]:
        rows = dora[name + ".lora_up.weight"].shape[0]
        dora[name + ".dora_scale"] = 1.0 + 0.2 * torch.randn(rows, 1, generator=gen)
    lora = clip_lora(clip, 6)
    base_out = encode(clip)
    merged = comfy.sd.load_lora_for_models(None, comfy.sd.load_lora_for_models(None, clip, dora, 0, 0.8)[1],
                                           lora, 0, 1.0)[1]
    bypass = comfy.sd.load_lora_for_models(None, comfy.sd.load_bypass_lora_for_models(None, clip, dora, 0, 0.8)[1],
                                           lora, 0, 1.0)[1]
    merged_out = encode(merged)
    assert sc.max_rel_diff(merged_out, encode(comfy.sd.load_lora_for_models(None, clip, lora, 0, 1.0)[1])) > 0.05
    assert sc.max_rel_diff(encode(bypass), merged_out) <= REL_TOL
    assert torch.equal(encode(clip), base_out)
