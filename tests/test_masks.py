"""Per-LoRA token masks (masks.py) with two chained diffusers LoRAs, through the stock loader.

The reference is the independent per-LoRA hook of masked_reference.py: for every adapter of
LoRA i it adds m_i ⊙ s·(α/r)·up(down x) into its slice, with the token roles of the issue
(double-block image modules masked, text modules not, single blocks: text unmasked then image
masked).
"""

import re

import pytest
import torch

import comfy.sd

import freefuse_bypass_patch as ffbp
from freefuse_bypass_patch import kit as sc
from masked_reference import masked_reference
from support import REL_TOL, bypass_era

pytestmark = bypass_era

IMAGE = 4 * 4  # tiny Flux: an 8x8 latent, patch 2 -> a 4x4 token grid


def _two_loras(base):
    a = sc.make_lora(base.model, "diffusers", rank=4, seed=201, alpha=4)
    b = sc.make_lora(base.model, "diffusers", rank=4, seed=202, alpha=2)
    return a, b


def _chain(base, a, b, sa=1.0, sb=0.8):
    m = comfy.sd.load_bypass_lora_for_models(base, None, a, sa, 0)[0]
    return comfy.sd.load_bypass_lora_for_models(m, None, b, sb, 0)[0]


def _reference(base, loras, inputs):
    """Base model plus the independent per-LoRA hooks of masked_reference.py, each adapter times
    its flat image mask (None: unmasked); text tokens unmasked."""
    return masked_reference("flux", base, inputs,
                            [(sd, strength, None if mask is None else mask.reshape(-1, 4, 4), None)
                             for sd, strength, mask in loras])


def _no_function(sd):
    """Drop norm_out (a diff-function target, outside the blocks) so the reference stays simple."""
    return {k: v for k, v in sd.items() if "norm_out" not in k}


@pytest.fixture
def setup():
    base = sc.tiny_flux()
    a, b = (_no_function(x) for x in _two_loras(base))
    return base, sc.flux_inputs(), a, b


def test_names_and_masks_of_ones_equal_the_unmasked_chain(setup):
    base, inputs, a, b = setup
    chained = _chain(base, a, b)
    assert ffbp.bypass_loras(chained) == ["lora_0", "lora_1"]
    ones = ffbp.with_lora_masks(chained, {0: torch.ones(IMAGE), "lora_1": torch.ones(4, 4)})
    assert sc.max_rel_diff(sc.forward(ones, inputs), sc.forward(chained, inputs)) <= REL_TOL


@pytest.mark.parametrize("shape,layout", [("tokens", "auto"), ("grid", "auto"), ("batch", "auto"), ("grid", "block")])
def test_complementary_halves_equal_a_per_lora_reference(setup, shape, layout):
    """Both up-projection layouts: per slice (CPU) and block-diagonal (CUDA, columns by LoRA)."""
    base, inputs, a, b = setup
    left = torch.zeros(4, 4)
    left[:, :2] = 1.0
    right = 1.0 - left
    as_shape = {"tokens": lambda m: m.flatten(), "grid": lambda m: m, "batch": lambda m: m.reshape(1, -1)}[shape]
    masked = ffbp.with_lora_masks(sc.with_layout(_chain(base, a, b), layout), {0: as_shape(left), 1: as_shape(right)})
    expected = _reference(base, [(a, 1.0, left), (b, 0.8, right)], inputs)
    unmasked = _reference(base, [(a, 1.0, None), (b, 0.8, None)], inputs)
    assert sc.max_rel_diff(expected, unmasked) > 1e-3  # the masks change the output
    assert sc.max_rel_diff(sc.forward(masked, inputs), expected) <= REL_TOL


def test_soft_ramp_with_cond_uncond_batch(setup):
    base, _, a, b = setup
    inputs = sc.flux_inputs(batch=2)
    ramp = torch.linspace(0.0, 1.0, IMAGE)
    masked = ffbp.with_lora_masks(_chain(base, a, b), {"lora_0": ramp, "lora_1": torch.stack([1 - ramp, ramp])})
    expected = _reference(base, [(a, 1.0, ramp), (b, 0.8, torch.stack([1 - ramp, ramp]))], inputs)
    assert sc.max_rel_diff(sc.forward(masked, inputs), expected) <= REL_TOL


def test_parent_unchanged_masks_replaced_and_eject_gives_base(setup):
    base, inputs, a, b = setup
    chained = _chain(base, a, b)
    unmasked = sc.forward(chained, inputs)
    masked = ffbp.with_lora_masks(chained, {0: torch.zeros(IMAGE)})
    assert ffbp.lora_masks(chained) == {"lora_0": None, "lora_1": None}
    assert torch.equal(sc.forward(chained, inputs), unmasked)  # the parent keeps computing unmasked
    only_b = _reference(base, [(a, 1.0, torch.zeros(IMAGE)), (b, 0.8, None)], inputs)
    assert sc.max_rel_diff(sc.forward(masked, inputs), only_b) <= REL_TOL
    ffbp.set_lora_masks(masked, {0: None, 1: torch.zeros(4, 4)})  # between steps, on the same patcher
    only_a = _reference(base, [(a, 1.0, None), (b, 0.8, torch.zeros(IMAGE))], inputs)
    assert sc.max_rel_diff(sc.forward(masked, inputs), only_a) <= REL_TOL
    assert torch.equal(sc.forward(base, inputs), _reference(base, [], inputs))  # ejected: base, bit for bit


def test_masks_survive_lowvram_partial_loading(setup):
    from test_lowvram import _run_partially_loaded

    base, inputs, a, b = setup
    left = torch.zeros(4, 4)
    left[:, :2] = 1.0
    masked = ffbp.with_lora_masks(_chain(base, a, b), {0: left, 1: 1 - left})
    expected = _reference(base, [(a, 1.0, left), (b, 0.8, 1 - left)], inputs)
    out, lowvram = _run_partially_loaded(masked, inputs)
    assert lowvram > 10 and sc.max_rel_diff(out, expected) <= REL_TOL


def test_names_from_lora_name_and_unknown_keys_list_the_loras(setup):
    base, _, a, b = setup
    with ffbp.lora_name("harry"):
        m = comfy.sd.load_bypass_lora_for_models(base, None, a, 1.0, 0)[0]
    with ffbp.lora_name("daiyu"):
        m = comfy.sd.load_bypass_lora_for_models(m, None, b, 1.0, 0)[0]
    assert ffbp.bypass_loras(m) == ["harry", "daiyu"]
    for key in ("ron", 2, -1):
        with pytest.raises(ffbp.LoraMaskError, match=r"0: harry, 1: daiyu"):
            ffbp.with_lora_masks(m, {key: torch.ones(IMAGE)})
    with pytest.raises(ValueError, match="harry"):
        with ffbp.lora_name("harry"):
            comfy.sd.load_bypass_lora_for_models(m, None, a, 1.0, 0)
    with pytest.raises(ffbp.LoraMaskError, match="no bypass LoRAs"):
        ffbp.with_lora_masks(base, {0: torch.ones(IMAGE)})


@pytest.mark.parametrize("bad", [torch.ones(IMAGE + 1), torch.ones(IMAGE - 1)])
def test_a_flat_mask_that_fits_no_forward_names_both_shapes(setup, bad):
    """Flat masks must match the tokens exactly. A 2-D mask whose rows are not 1 or the batch
    (here (2, 16) or (3, 16) at batch 1) is a grid, resized like any other (issue 20)."""
    base, inputs, a, b = setup
    masked = ffbp.with_lora_masks(_chain(base, a, b), {1: bad})
    with pytest.raises(ffbp.LoraMaskError) as err:
        sc.forward(masked, inputs)
    message = str(err.value)
    assert "lora_1" in message and str(tuple(bad.shape)) in message and "(16,)" in message and "4x4 grid" in message
    assert torch.equal(sc.forward(base, inputs), _reference(base, [], inputs))  # nothing left behind


def test_masks_refused_on_a_family_without_a_known_layout():
    if not sc.available("pixart"):
        pytest.skip("this ComfyUI cannot build PixArt")
    base = sc.tiny_model("pixart")
    lora = sc.family_lora(base.model, "pixart")
    m = comfy.sd.load_bypass_lora_for_models(base, None, lora, 1.0, 0)[0]
    with pytest.raises(ffbp.LoraMaskError, match="PixArt.*not supported"):
        ffbp.with_lora_masks(m, {0: torch.ones(4)})
    assert ffbp.with_lora_masks(m, {0: None}) is not m  # clearing is always allowed


def test_masks_with_non_lora_forms(setup):
    """A DoRA and a LoKr chained after a LoRA: masks of ones change nothing; zero masks on the
    image-side modules (all image tokens) remove their terms, the DoRA reading W'x unmasked."""
    from test_forms import _variant_lora

    base, inputs, a, _ = setup
    image_side = re.compile(r"double_blocks_\d+_img_(attn|mlp)")
    dora = {k: v for k, v in _variant_lora(base.model, "dora", "kohya", seed=203, limit=40).items()
            if image_side.search(k)}
    lokr = {k: v for k, v in _variant_lora(base.model, "lokr-full", "kohya", seed=204, limit=40).items()
            if image_side.search(k)}
    assert dora and lokr
    chained = comfy.sd.load_bypass_lora_for_models(_chain(base, a, dora), None, lokr, 0.7, 0)[0]
    ones = ffbp.with_lora_masks(chained, {0: torch.ones(IMAGE), 1: torch.ones(IMAGE), 2: torch.ones(IMAGE)})
    assert sc.max_rel_diff(sc.forward(ones, inputs), sc.forward(chained, inputs)) <= REL_TOL
    zeros = ffbp.with_lora_masks(chained, {1: torch.zeros(IMAGE), 2: torch.zeros(IMAGE)})
    only_a = comfy.sd.load_bypass_lora_for_models(base, None, a, 1.0, 0)[0]
    assert sc.max_rel_diff(sc.forward(chained, inputs), sc.forward(only_a, inputs)) > 1e-3
    assert sc.max_rel_diff(sc.forward(zeros, inputs), sc.forward(only_a, inputs)) <= REL_TOL


def test_sd3_image_side_modules_are_masked():
    """SD3 (MMDiT): x_block modules see image tokens only; a zero mask removes a LoRA on them,
    ones change nothing, and a half mask lands between."""
    if not sc.available("sd3"):
        pytest.skip("this ComfyUI cannot build SD3")
    base = sc.tiny_model("sd3")
    inputs = sc.tiny_inputs("sd3")
    x_side = {k: v for k, v in sc.family_lora(base.model, "sd3", convention="kohya", seed=205).items()
              if "_x_block_" in k and "adaLN" not in k}  # modulation acts on a vector, unmasked
    assert x_side
    m = comfy.sd.load_bypass_lora_for_models(base, None, x_side, 1.0, 0)[0]
    grid = (inputs["x"].shape[-2] // 2, inputs["x"].shape[-1] // 2)
    unmasked, base_out = sc.forward(m, inputs), sc.forward(base, inputs)
    assert sc.max_rel_diff(unmasked, base_out) > 1e-3
    ones = sc.forward(ffbp.with_lora_masks(m, {0: torch.ones(grid)}), inputs)
    zeros = sc.forward(ffbp.with_lora_masks(m, {0: torch.zeros(grid)}), inputs)
    assert sc.max_rel_diff(ones, unmasked) <= REL_TOL
    assert sc.max_rel_diff(zeros, base_out) <= REL_TOL
