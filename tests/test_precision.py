"""fp8 weights (as ComfyUI loads fp8 checkpoints: float8_e4m3fn storage, fp32 compute):
the adapter math must not run in the storage dtype. Reference: an fp32 model holding the
dequantised weights, with the LoRA merged in fp32."""

import pytest
import torch

import comfy.sd

from freefuse_bypass_patch import selfcheck as sc
from support import REL_TOL, adapter_lora, bypass_era

pytestmark = bypass_era


@pytest.mark.parametrize("kind", ["diffusers-lora", "kohya-dora"])
def test_fp8_weights_match_fp32_reference(kind):
    fp8 = sc.tiny_flux(dtype=torch.float8_e4m3fn, manual_cast=torch.float32)
    assert fp8.model.diffusion_model.double_blocks[0].img_attn.qkv.weight.dtype == torch.float8_e4m3fn
    reference = sc.tiny_flux()
    with torch.no_grad():
        state = {k: v.to(torch.float32) for k, v in fp8.model.diffusion_model.state_dict().items()}
        reference.model.diffusion_model.load_state_dict(state)
    inputs = sc.flux_inputs()
    if kind == "diffusers-lora":
        lora = sc.make_lora(reference.model, "diffusers", rank=4, seed=31, alpha=4)
    else:
        lora = adapter_lora(reference.model, "dora", "kohya", seed=32, limit=12)
    before = sc.weights_snapshot(fp8)
    expected = sc.forward(comfy.sd.load_lora_for_models(reference, None, lora, 1.0, 0)[0], inputs)
    got = sc.forward(comfy.sd.load_bypass_lora_for_models(fp8, None, lora, 1.0, 0)[0], inputs)
    assert sc.max_rel_diff(expected, sc.forward(reference, inputs)) > 10 * REL_TOL
    assert sc.max_rel_diff(got, expected) <= REL_TOL
    after = sc.weights_snapshot(fp8)
    assert all(torch.equal(before[k].view(torch.uint8), after[k].view(torch.uint8))
               if before[k].dtype == torch.float8_e4m3fn else torch.equal(before[k], after[k]) for k in before)
