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
from freefuse_bypass_patch.loader import MANAGER_ATTACHMENT
from support import REL_TOL, bypass_era

pytestmark = bypass_era

EFFECT_TOL = 1e-4
# replayed through the merge code in fp32, as merged: 3e-6 of the effect is the most measured (0.33.0)
EXACT_TOL = 1e-5


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


READERS = ["dora", "dora_in", "glora", "oft", "boft"]  # bypass adapters that read W' or the output
AFTER = ["merged LoRA", "merged LoRA first", "merge 0.25", "around"]


def _graph(load, model1, model2, kind, after):
    """model1 -> ``kind`` in bypass (or ``load``) -> ``after``; the same graph for every loader."""
    reader = sc.adapter_lora(model1.model, kind, "kohya", seed=76)
    lora = sc.adapter_lora(model1.model, "lora", "kohya", seed=77)
    merged = comfy.sd.load_lora_for_models
    if after == "merged LoRA first":
        return load(merged(model1, None, lora, 0.8, 0)[0], None, reader, 1.0, 0)[0]
    patcher = load(model1, None, reader, 1.0, 0)[0]
    if after == "merge 0.25":
        return _merge("ModelMergeSimple", patcher, model2, 0.25)
    patcher = merged(patcher, None, lora, 0.8, 0)[0]
    if after == "around":  # a second bypass LoRA after the merged one: two bypass LoRAs around it
        patcher = load(patcher, None, sc.adapter_lora(model1.model, "dora", "kohya", seed=78), 0.7, 0)[0]
    return patcher


@pytest.mark.parametrize("after", AFTER)
@pytest.mark.parametrize("kind", READERS)
def test_a_weight_reader_composes_with_patches_after_it_as_merged(kind, after):
    """LoraLoaderBypass (a DoRA, OFT, BOFT or GLoRA) -> LoraLoaderModelOnly, the reverse, a merge after
    it, two bypass LoRAs around a merged one: the module is replayed in load order through the merge
    code, == the graph merged. Before: 0.12 to 1.15 of the LoRA's effect off (issue 20)."""
    model1, model2 = sc.tiny_flux(seed=0), sc.tiny_flux(seed=5)
    inputs = sc.flux_inputs()
    base_before = sc.forward(model1, inputs)
    bypass = _graph(comfy.sd.load_bypass_lora_for_models, model1, model2, kind, after)
    want = sc.forward(_graph(comfy.sd.load_lora_for_models, model1, model2, kind, after), inputs)
    got = sc.forward(bypass, inputs)
    plain = sc.forward(_graph(lambda m, c, sd, s, sc_: (m, c), model1, model2, kind, after), inputs)
    rel, effect = _close(got, want, plain)
    assert effect > 1e-2 and rel <= EXACT_TOL, (rel, effect)
    assert torch.equal(sc.forward(model1, inputs), base_before)  # ejecting restores the base bit for bit
    # merged LoRAs after forms: undone and redone in factored form; a merge (a scale, model2's weight),
    # a bypass LoRA after the merged one, or an adapter with no form (input-axis DoRA): replayed
    expected = {"merged LoRA first": set(), "merged LoRA": {"factored" if kind != "dora_in" else "replayed"}}
    hooks = bypass.attachments[MANAGER_ATTACHMENT].hooks
    assert {h.composition for h in hooks if h.composition} == expected.get(after, {"replayed"})


@pytest.mark.parametrize("order", ["merged between", "merged last"])
def test_composed_module_with_masks_and_the_switch(order):
    """DoRA (LoRA 0) and a plain LoRA (LoRA 1) in bypass, a LoRA merged between them (those modules are
    replayed: one delta per LoRA) or after both (undone and redone around the forms): masks of ones
    give the merged graph, LoRA 1 masked to zero or switched off gives the graph without it (nothing
    reads it), LoRA 0 switched off the graph without the DoRA."""
    model1 = sc.tiny_flux(seed=0)
    inputs = sc.flux_inputs()
    dora = sc.adapter_lora(model1.model, "dora", "kohya", seed=76)
    lora = sc.adapter_lora(model1.model, "lora", "kohya", seed=77)
    masked = [t for t in sc.adapter_targets(model1.model, "kohya")  # modules that token masks reach
              if "double_blocks" in str(t[1]) and ("_attn.qkv" in str(t[1]) or "_mlp." in str(t[1]))]
    last = sc.adapter_lora(model1.model, "lora", "kohya", seed=79, targets=masked)
    bypass, merged = comfy.sd.load_bypass_lora_for_models, comfy.sd.load_lora_for_models

    def graph(first, second, with_dora=True):
        steps = [(first, dora, 1.0)] if with_dora else []
        steps += [(merged, lora, 0.8), (second, last, 0.9)] if order == "merged between" else \
            [(second, last, 0.9), (merged, lora, 0.8)]
        patcher = model1
        for load, sd, strength in steps:
            if load is not None:
                patcher = load(patcher, None, sd, strength, 0)[0]
        return patcher

    chained = graph(bypass, bypass)
    plain = sc.forward(merged(model1, None, lora, 0.8, 0)[0], inputs)
    want_both, want_first = sc.forward(graph(merged, merged), inputs), sc.forward(graph(merged, None), inputs)
    h, w = 4, 4  # the 8x8 latent's token grid
    ones = ffbp.with_lora_masks(chained, {0: torch.ones(h, w), 1: torch.ones(h, w)})
    assert _close(sc.forward(ones, inputs), want_both, plain)[0] <= EXACT_TOL
    zero = ffbp.with_lora_masks(chained, {0: torch.ones(h, w), 1: torch.zeros(h, w)}, text_masks={1: torch.zeros(5)})
    assert _close(sc.forward(zero, inputs), want_first, plain)[0] <= EXACT_TOL
    assert _close(sc.forward(ffbp.with_loras_enabled(chained, {1: False}), inputs), want_first, plain)[0] <= EXACT_TOL
    only_last = sc.forward(graph(None, merged, with_dora=False), inputs)
    assert _close(sc.forward(ffbp.with_loras_enabled(chained, {0: False}), inputs), only_last, plain)[0] <= EXACT_TOL
    ways = {h.composition for h in chained.attachments[MANAGER_ATTACHMENT].hooks}
    assert ("replayed" in ways) == (order == "merged between") and "factored" in ways, ways


@pytest.mark.parametrize("first", ["dora", "lora"])
@pytest.mark.parametrize("later", ["merged DoRA", "merged OFT"])
def test_a_patch_that_cannot_be_undone_is_named_once(caplog, later, first):
    """A merged DoRA or OFT after bypass adapters of the same weight is no s*W + d: it cannot be taken
    back out of W' (and it reads W', so even a plain LoRA before it does not commute with it). Named once, with the modules and keys, when the model is loaded; never an error."""
    model1 = sc.tiny_flux(seed=0)
    inputs = sc.flux_inputs()
    bypass = comfy.sd.load_bypass_lora_for_models(model1, None, sc.adapter_lora(model1.model, first, "kohya", seed=76,
                                                                                limit=2), 1.0, 0)[0]
    kind = {"merged DoRA": "dora", "merged OFT": "oft"}[later]
    after = comfy.sd.load_lora_for_models(bypass, None, sc.adapter_lora(model1.model, kind, "kohya", seed=77,
                                                                        limit=2), 1.0, 0)[0]
    with caplog.at_level(logging.WARNING):
        sc.forward(after, inputs)
        sc.forward(after, inputs)
    named = [r.getMessage() for r in caplog.records if "cannot be undone" in r.getMessage()]
    assert len(named) == 1 and "in 2 module(s)" in named[0], named  # one line for both modules, once
    assert "%s after %s" % ("LoRA (DoRA)" if kind == "dora" else "OFT", "LoRA (DoRA)" if first == "dora" else "LoRA") \
        in named[0], named
    assert all(k in named[0] for k in ("img_attn.qkv.weight", "img_attn.proj.weight")), named  # the keys


@pytest.mark.parametrize("kind", ["oft", "lokr_conv"])
def test_conv_reader_then_merged_conv_lora_then_merge(kind):
    """A 3x3 conv of the tiny SDXL: a bypass OFT (transient: the merge code, per forward) or a conv
    LoKr (factored, additive) -> a merged conv LoRA on the same weight -> ModelMergeSimple 0.5;
    == the same graph merged (replayed with conv deltas / scaled)."""
    if not sc.available("sdxl"):
        pytest.skip("this ComfyUI cannot build SDXL")
    import comfy.lora

    model1, model2 = sc.tiny_model("sdxl"), sc.tiny_model("sdxl", seed=5)
    inputs = sc.sdxl_inputs()
    tensors = dict(model1.model.named_parameters())
    key = "diffusion_model.output_blocks.8.0.in_layers.2.weight"
    key = key if key in tensors else max((k for k in tensors if k.endswith(".0.in_layers.2.weight")
                                          and "output_blocks" in k), key=lambda k: int(k.split(".")[2]))
    weight = tensors[key]
    name = next(n for n, k in comfy.lora.model_lora_keys_unet(model1.model, {}).items()
                if k == key and n.startswith("lora_unet_"))
    gen = torch.Generator().manual_seed(81)
    if kind == "oft":
        factors = sc.adapter_factors("oft", weight.shape[0], weight[0].numel(), gen, block=16, alpha=100.0, scale=2.0)
    else:
        factors = {"lokr_w1": torch.randn(4, 4, generator=gen) * 3.0,
                   "lokr_w2": torch.randn(weight.shape[0] // 4, weight.shape[1] // 4, *weight.shape[2:],
                                          generator=gen) * 0.3}
    reader = {"%s.%s" % (name, k): v for k, v in factors.items()}
    lora = {name + ".lora_up.weight": torch.randn(weight.shape[0], 4, 1, 1, generator=gen) * 0.3,
            name + ".lora_down.weight": torch.randn(4, *weight.shape[1:], generator=gen) * 0.3,
            name + ".alpha": torch.tensor(2.0)}

    def graph(first, with_reader=True):
        patcher = first(model1, None, reader, 0.8, 0)[0] if with_reader else model1
        patcher = comfy.sd.load_lora_for_models(patcher, None, lora, 1.0, 0)[0]
        return _merge("ModelMergeSimple", patcher, model2, 0.5)

    want = sc.forward(graph(comfy.sd.load_lora_for_models), inputs)
    rel, effect = _close(sc.forward(graph(comfy.sd.load_bypass_lora_for_models), inputs), want,
                         sc.forward(graph(None, with_reader=False), inputs))
    # the tiny SDXL damps one conv's change to ~2e-3 of its output, whose fp32 rounding (~1e-7 of it)
    # is then ~1e-4 of the effect (measured 3e-5 to 8e-5); uncomposed, an OFT here is off by ~0.5 of it
    assert effect > 1e-4 and rel <= 1e-3, (rel, effect)
