"""Token masks on SDXL, Z-Image and Lumina2, text masks, mask resizing and every mask error.

Two LoRAs per family, chained through the stock loader; the masked results are compared
with the independent per-LoRA reference of masked_reference.py (issue 15's rules). SDXL
runs at an odd 14x18 latent (its transformers see 7x9 and 4x5 tokens), Z-Image at 5x5
tokens, padded with 7 image tokens (and the 5-token caption with 27).
"""

import pytest
import torch

import comfy.sd

import freefuse_bypass_patch as ffbp
from freefuse_bypass_patch import kit as sc
from masked_reference import grid_of, masked_reference, without_functions
from support import REL_TOL, bypass_era

pytestmark = bypass_era

LATENT = {"sdxl": (14, 18), "zimage": 10, "lumina2": 8}
TEXT = 5
STRENGTHS = (1.0, 0.8)


def _inputs(family, batch=1):
    if family == "sdxl":
        return sc.sdxl_inputs(image=LATENT["sdxl"], tokens=TEXT, batch=batch)
    inputs = sc.tiny_inputs(family, image=LATENT.get(family, 8), tokens=TEXT)
    if batch == 2:  # cond and uncond rows: the second latent and prompt differ from the first
        for key in ("x", "c_crossattn", "y"):
            if key in inputs:
                inputs[key] = torch.cat([inputs[key], 0.5 * inputs[key].flip(-1)])
        for key in ("t", "guidance"):
            if key in inputs:
                inputs[key] = inputs[key].repeat(2)
    return inputs


def _loras(base, family, convention="diffusers"):
    return [sc.family_lora(base.model, family, seed=seed, convention=convention, scale=0.4) for seed in (301, 302)]


def _chain(base, loras):
    m = base
    for sd, strength in zip(loras, STRENGTHS):
        m = comfy.sd.load_bypass_lora_for_models(m, None, sd, strength, 0)[0]
    return m


@pytest.fixture(params=["sdxl", "zimage", "lumina2"])
def family(request):
    if not sc.available(request.param):
        pytest.skip("this ComfyUI cannot build %s" % request.param)
    return request.param


@pytest.mark.parametrize("convention", ["diffusers", "kohya"])
def test_masks_of_ones_equal_the_unmasked_chain_and_merged(family, convention):
    base = sc.tiny_model(family)
    inputs = _inputs(family)
    loras = _loras(base, family, convention)
    chained = _chain(base, loras)
    merged = sc.chain(comfy.sd.load_lora_for_models, base, list(zip(loras, STRENGTHS)))
    unmasked = sc.forward(chained, inputs)
    assert sc.max_rel_diff(unmasked, sc.forward(base, inputs)) > 1e-3
    assert sc.max_rel_diff(unmasked, sc.forward(merged, inputs)) <= REL_TOL
    h, w = grid_of(family, base, inputs)
    text = {0: torch.ones(TEXT), 1: torch.ones(1, TEXT)} if family != "sdxl" else None
    ones = ffbp.with_lora_masks(chained, {0: torch.ones(h, w), 1: torch.ones(h * w)}, text_masks=text)
    assert sc.max_rel_diff(sc.forward(ones, inputs), unmasked) <= REL_TOL


def _case_masks(case, grid, batch):
    """(image masks, text masks) per LoRA position for a test case, as grids / rows."""
    h, w = grid
    if case == "halves":
        left = torch.zeros(h, w)
        left[:, : w // 2] = 1.0
        text0 = torch.ones(TEXT)
        text0[3:] = 0.0  # LoRA 0 off on the other concept's words, as FreeFuse's Z-Image reference
        return {0: left, 1: 1.0 - left}, {0: text0, 1: 1.0 - text0}
    if case == "soft":  # a ramp for all rows, and per-row ramps (cond / uncond)
        ramp = torch.linspace(0.0, 1.0, h * w).reshape(h, w)
        rows = torch.stack([1.0 - ramp, 0.5 * ramp])[:batch]
        return {0: ramp, 1: rows}, {0: torch.linspace(0.2, 1.0, TEXT), 1: torch.linspace(1.0, 0.0, TEXT)[None]}
    # a random region map drawn at twice the grid, resized to each grid the forward has
    gen = torch.Generator().manual_seed(7)
    regions = (torch.rand(2 * h, 2 * w, generator=gen) > 0.5).float()
    return {0: regions, 1: 1.0 - regions}, {}


@pytest.mark.parametrize("case", ["halves", "soft", "double"])
def test_masks_equal_the_per_lora_reference(family, case):
    base = sc.tiny_model(family)
    batch = 2 if case == "soft" else 1
    inputs = _inputs(family, batch)
    loras = _loras(base, family)
    grid = grid_of(family, base, inputs)
    image, text = _case_masks(case, grid, batch)
    if family == "sdxl":
        text = {}  # no masked SDXL module sees the text
    flat = {i: m.reshape(m.shape[0], -1) if m.dim() == 3 else m for i, m in image.items()}  # (B, N) rows as given
    masked = ffbp.with_lora_masks(_chain(base, loras), flat, text_masks=text)
    refs = [(sd, s, image.get(i), text.get(i)) for i, (sd, s) in enumerate(zip(loras, STRENGTHS))]
    expected = masked_reference(family, base, inputs, refs)
    unmasked = masked_reference(family, base, inputs, [(sd, s, None, None) for sd, s in zip(loras, STRENGTHS)])
    assert sc.max_rel_diff(expected, unmasked) > 1e-4  # the masks change the output
    assert sc.max_rel_diff(sc.forward(masked, inputs), expected) <= REL_TOL


# the 14x18 latent's pixels; one level's grid and the other; the latent; widths equal to a token
# count of the forward (252, 63, 20: a grid, since the rows are not 1 or the batch); odd sizes
SDXL_GRIDS = [(112, 144), (7, 9), (4, 5), (14, 18), (63, 63), (5, 252), (20, 20), (13, 5), (3, 11)]


@pytest.mark.parametrize("size", SDXL_GRIDS, ids=["%dx%d" % s for s in SDXL_GRIDS])
def test_sdxl_masks_of_any_grid_size_are_resized_per_level(size):
    """Issue 20: an SDXL mask drawn at the image's pixel size (whose width can equal a level's
    token count, 1024 at 1024x1024) is a grid like any other, resized bilinearly per level."""
    if not sc.available("sdxl"):
        pytest.skip("this ComfyUI cannot build SDXL")
    base = sc.tiny_model("sdxl")
    inputs = _inputs("sdxl")
    loras = _loras(base, "sdxl")
    gen = torch.Generator().manual_seed(size[0] * 1000 + size[1])
    region = torch.rand(size, generator=gen)
    masked = ffbp.with_lora_masks(_chain(base, loras), {0: region, 1: 1.0 - region})
    refs = [(loras[0], STRENGTHS[0], region, None), (loras[1], STRENGTHS[1], 1.0 - region, None)]
    assert sc.max_rel_diff(sc.forward(masked, inputs), masked_reference("sdxl", base, inputs, refs)) <= REL_TOL


def test_sdxl_odd_latent_has_two_token_grids():
    """The 14x18 latent reaches the transformers as 7x9 and 4x5 (ComfyUI rounds up), so the
    reference tests above resize every mask twice per forward."""
    if not sc.available("sdxl"):
        pytest.skip("this ComfyUI cannot build SDXL")
    base = sc.tiny_model("sdxl")
    seen = set()
    handles = [m.register_forward_pre_hook(lambda m, args: seen.add(tuple(args[0].shape[-2:])))
               for m in base.model.diffusion_model.modules() if type(m).__name__ == "SpatialTransformer"]
    try:
        sc.forward(base, _inputs("sdxl"))
    finally:
        for h in handles:
            h.remove()
    assert seen == {(7, 9), (4, 5)}


@pytest.mark.parametrize("family_name", ["flux", "sd3"])
def test_text_masks_on_flux_single_blocks_and_text_sides(family_name):
    """Flux: single blocks see [text | image], txt_attn/txt_mlp the text; SD3: context_block the text."""
    if not sc.available(family_name):
        pytest.skip("this ComfyUI cannot build %s" % family_name)
    base = sc.tiny_model(family_name)
    inputs = sc.tiny_inputs(family_name, tokens=TEXT)
    loras = [without_functions(base, sd) for sd in _loras(base, family_name)]
    image, text = _case_masks("halves", grid_of(family_name, base, inputs), 1)
    masked = ffbp.with_lora_masks(_chain(base, loras), {0: image[0]}, text_masks=text)
    refs = [(loras[0], STRENGTHS[0], image[0], text[0]), (loras[1], STRENGTHS[1], None, text[1])]
    expected = masked_reference(family_name, base, inputs, refs)
    text_only = masked_reference(family_name, base, inputs, [(loras[0], STRENGTHS[0], image[0], None),
                                                              (loras[1], STRENGTHS[1], None, None)])
    assert sc.max_rel_diff(expected, text_only) > 1e-4  # the text masks change the output
    assert sc.max_rel_diff(sc.forward(masked, inputs), expected) <= REL_TOL
    assert torch.equal(ffbp.lora_text_masks(masked)["lora_1"], text[1])
    assert ffbp.lora_masks(masked)["lora_1"] is None


# -- errors ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def sdxl_chain():
    if not sc.available("sdxl"):
        pytest.skip("this ComfyUI cannot build SDXL")
    base = sc.tiny_model("sdxl")
    return base, _chain(base, _loras(base, "sdxl"))


BAD_AT_SET = [
    ("a list", lambda: [1.0, 0.0], None, r"expected a non-empty tensor .* got list"),
    ("0-d", lambda: torch.tensor(1.0), None, r"got \(\)"),
    ("3-D", lambda: torch.ones(1, 7, 9), None, r"got \(1, 7, 9\)"),
    ("empty", lambda: torch.ones(0), None, r"got \(0,\)"),
    ("complex", lambda: torch.ones(7, 9, dtype=torch.complex64), None, "real values"),
    ("NaN", lambda: torch.full((7, 9), float("nan")), None, "NaN or Inf"),
    ("Inf", lambda: torch.tensor([1.0, float("inf")]), None, "NaN or Inf"),
    ("unknown name", lambda: torch.ones(7, 9), "harry", r"no bypass LoRA 'harry'.*0: lora_0, 1: lora_1"),
    ("unknown position", lambda: torch.ones(7, 9), 2, r"no bypass LoRA 2.*0: lora_0, 1: lora_1"),
]


@pytest.mark.parametrize("what,make,key,message", BAD_AT_SET, ids=[b[0] for b in BAD_AT_SET])
def test_bad_masks_are_refused_when_set(sdxl_chain, what, make, key, message):
    _, chained = sdxl_chain
    with pytest.raises(ffbp.LoraMaskError, match=message):
        ffbp.set_lora_masks(chained, {1 if key is None else key: make()})
    assert ffbp.lora_masks(chained) == {"lora_0": None, "lora_1": None}  # nothing changed


def test_other_refusals_when_set(sdxl_chain):
    base, chained = sdxl_chain
    with pytest.raises(ffbp.LoraMaskError, match="text masks need .* UNetModel"):
        ffbp.set_lora_masks(chained, {}, text_masks={0: torch.ones(TEXT)})
    with pytest.raises(ffbp.LoraMaskError, match="NaN or Inf"):
        ffbp.set_lora_masks(chained, {0: torch.ones(7, 9)}, text_masks={1: torch.tensor([float("nan")])})
    assert ffbp.lora_masks(chained)["lora_0"] is None  # the good image mask was not set either
    with pytest.raises(ffbp.LoraMaskError, match="no bypass LoRAs"):
        ffbp.with_lora_masks(base, {0: torch.ones(7, 9)})
    for name in ("pixart", "auraflow"):
        if not sc.available(name):
            continue
        other = sc.tiny_model(name)
        m = comfy.sd.load_bypass_lora_for_models(other, None, sc.family_lora(other.model, name), 1.0, 0)[0]
        with pytest.raises(ffbp.LoraMaskError, match="known token layout.*is not supported"):
            ffbp.with_lora_masks(m, {0: torch.ones(4, 4)})
        assert ffbp.with_lora_masks(m, {0: None}) is not m  # clearing is always allowed


BAD_AT_FORWARD = [
    ("flat, wrong length", lambda n: {1: torch.ones(n + 1)}, {}, r"\(%(n1)d,\).*expected \(252,\), \(63,\), \(20,\)"),
]


@pytest.mark.parametrize("what,image,text,message", BAD_AT_FORWARD, ids=[b[0] for b in BAD_AT_FORWARD])
def test_masks_that_fit_no_forward_name_both_shapes(sdxl_chain, what, image, text, message):
    base, chained = sdxl_chain
    inputs = _inputs("sdxl")
    masked = ffbp.with_lora_masks(chained, image(14 * 18))
    with pytest.raises(ffbp.LoraMaskError, match=message % {"n1": 14 * 18 + 1}) as err:
        sc.forward(masked, inputs)
    assert "lora_1" in str(err.value) and "14x18 grid" in str(err.value)
    assert torch.equal(sc.forward(chained, inputs), sc.forward(chained, inputs))  # nothing left behind


def test_text_mask_of_the_wrong_length_names_both_shapes():
    base = sc.tiny_flux()
    inputs = sc.flux_inputs(tokens=TEXT)
    chained = _chain(base, _loras(base, "flux"))
    masked = ffbp.with_lora_masks(chained, {}, text_masks={"lora_0": torch.ones(TEXT + 2)})
    with pytest.raises(ffbp.LoraMaskError, match=r"text mask for LoRA 'lora_0' has shape \(7,\).*5 text tokens.*"
                                                 r"expected \(5,\) or \(1, 5\)"):
        sc.forward(masked, inputs)
    unmasked = sc.forward(chained, inputs)
    assert torch.equal(sc.forward(ffbp.with_lora_masks(masked, {}, text_masks={0: None}), inputs), unmasked)


def test_text_masks_with_z_image_reference_latents_are_refused():
    """Z-Image omni: the reference latents' captions come first, the prompt's is not at the start."""
    if not sc.available("zimage"):
        pytest.skip("this ComfyUI cannot build Z-Image")
    base = sc.tiny_model("zimage")
    inputs = dict(_inputs("zimage"), ref_latents=[torch.randn(1, 16, 8, 8)])
    chained = _chain(base, _loras(base, "zimage"))
    masked = ffbp.with_lora_masks(chained, {}, text_masks={"lora_1": torch.ones(TEXT)})
    with pytest.raises(ffbp.LoraMaskError, match="'lora_1': this forward has reference latents"):
        sc.forward(masked, inputs)
