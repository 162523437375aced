"""A load does no full-size work (issue 20): what the loader allocates on the CPU while it decides
every adapter stays far below the weights it adapts, also for OFT and BOFT with alpha > 0, whose
merge code branches on a value (``norm(q) > alpha``) that the meta device cannot take.

Every CPU tensor created during the load is watched (``kit.LargestNewCpuTensor``, a
TorchDispatchMode; views of existing storage do not count); the largest must stay within 0.1x
the adapted weight's bytes.
"""

import re

import comfy.lora
import comfy.sd
import comfy.utils
import pytest
import torch

from freefuse_bypass_patch import kit as sc
from freefuse_bypass_patch.loader import REPORT_ATTACHMENT
from freefuse_bypass_patch.slots import FACTORED, TRANSIENT
from support import REL_TOL, bypass_era

pytestmark = bypass_era


def _oft(kind: str, rows: int, cols: int, seed: int, block: int = 16):
    """OFT/BOFT factors with alpha 100 (> 0: the merge code checks the norm constraint, a branch on a
    value; this large, it does not rescale, so the rotation stays visible); "oft_dora_in": with a
    DoRA magnitude per input column (no factored form: the merge code runs it, transient)."""
    gen = torch.Generator().manual_seed(seed)
    factors = sc.adapter_factors("boft" if kind == "boft" else "oft", rows, cols, gen, block=block, alpha=100.0)
    if kind == "oft_dora_in":
        factors["dora_scale"] = 1.0 + 0.2 * torch.randn(1, cols, generator=gen)
    return factors


def _load_watched(base, name: str, factors):
    lora = {"%s.%s" % (name, k): v for k, v in factors.items()}
    with sc.LargestNewCpuTensor() as watch:
        patcher = comfy.sd.load_bypass_lora_for_models(base, None, lora, 0.8, 0)[0]
    return lora, patcher, watch


def _only_decision(patcher):
    decisions = list(patcher.attachments[REPORT_ATTACHMENT].decisions.values())
    assert len(decisions) == 1, decisions
    return decisions[0]


def _sdxl_conv(base):
    """The first 3x3 conv of the tiny SDXL's last ResBlock (``output_blocks.N.0.in_layers.2``, 128 in,
    64 out: one whose rotation the output shows at 1e-3), by its kohya name: (name, weight key, weight)."""
    key_map = comfy.lora.model_lora_keys_unet(base.model, {})
    tensors = dict(base.model.named_parameters())
    blocks = [k for k in tensors if re.fullmatch(r"diffusion_model\.output_blocks\.\d+\.0\.in_layers\.2\.weight", k)]
    key = max(blocks, key=lambda k: int(k.split(".")[2]))
    name = next(n for n, k in key_map.items() if k == key and n.startswith("lora_unet_"))
    return name, key, tensors[key]


@pytest.mark.parametrize("kind", ["oft", "boft"])
def test_oft_with_alpha_on_a_conv_loads_without_full_size_work(kind):
    if not sc.available("sdxl"):
        pytest.skip("this ComfyUI cannot build SDXL")
    base = sc.tiny_model("sdxl")
    inputs = sc.sdxl_inputs()
    name, key, weight = _sdxl_conv(base)
    factors = _oft(kind, weight.shape[0], weight[0].numel(), seed=61)
    lora, patcher, watch = _load_watched(base, name, factors)
    assert _only_decision(patcher).fate == TRANSIENT  # no factored conv form for OFT: the merge code, per forward
    weight_bytes = weight.numel() * weight.element_size()
    assert watch.largest <= 0.1 * weight_bytes, (watch.largest / weight_bytes, watch.what)
    merged = sc.forward(comfy.sd.load_lora_for_models(base, None, lora, 0.8, 0)[0], inputs)
    assert sc.max_rel_diff(merged, sc.forward(base, inputs)) > 1e-4
    assert sc.max_rel_diff(sc.forward(patcher, inputs), merged) <= REL_TOL


@pytest.mark.parametrize("kind", ["oft", "boft", "oft_dora_in"])
def test_oft_with_alpha_on_a_real_size_linear_loads_without_full_size_work(kind):
    """Flux's ``single_blocks.0.linear2`` at real width (3072 x 15360, 188 MB in fp32) on the meta
    device, as the dry run builds it: the load allocates nothing of that size on the CPU."""
    base = sc.build_model("flux", sc.flux_config(depth=1, depth_single_blocks=1), device="meta")
    key = "diffusion_model.single_blocks.0.linear2.weight"
    weight = comfy.utils.get_attr(base.model, key)
    factors = _oft(kind, weight.shape[0], weight.shape[1], seed=62, block=64)
    _, patcher, watch = _load_watched(base, "lora_unet_single_blocks_0_linear2", factors)
    decision = _only_decision(patcher)
    assert decision.fate == (TRANSIENT if kind == "oft_dora_in" else FACTORED), decision
    assert watch.largest <= 0.1 * weight.numel() * 4, (watch.largest / (weight.numel() * 4), watch.what)
