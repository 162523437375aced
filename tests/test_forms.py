"""Every adapter form (forms.py) against merged, on whole weights and fused slices, at strength
≠ 1, chained after a plain LoRA, under lowvram; and the memory contract: what a hook keeps
after a forward is factor-sized, never a full-size tensor.

The plugin's manager is applied directly (kit.manager_bypass), so this runs on every pinned
tree, 0.3.75 included; the stock loader path is covered by test_adapter_types.py.
"""

import pytest
import torch

import comfy.sd

from freefuse_bypass_patch import conv_forms, forms
from freefuse_bypass_patch import kit as sc
from support import REL_TOL


def _r(gen, *shape, scale=0.2):
    return torch.randn(*shape, generator=gen) * scale


# variant -> (form class expected on a Linear, kit.adapter_factors options)
VARIANTS = {
    "lokr-full": (forms.LoKrForm, dict(kind="lokr")),
    "lokr-lowrank": (forms.LoKrForm, dict(kind="lokr", w1_rank=2, w2_rank=2, alpha=3)),
    "loha": (forms.LoHaForm, dict(kind="loha", rank=2, alpha=2)),
    # r1·r2·(out + in) >= out·in on these tiny weights: the delta is formed inside the forward
    "loha-dense": (forms.DenseLoHaForm, dict(kind="loha", rank=16, scale=0.2, alpha=16)),
    "dora": (forms.DoRAForm, dict(kind="dora")),
    "dora-loha": (forms.DoRAForm, dict(kind="dora_loha", rank=2, alpha=2)),
    "dora-lokr": (forms.DoRAForm, dict(kind="dora_lokr")),
    "glora": (forms.GLoRAForm, dict(kind="glora")),
    "glora-old": (forms.GLoRAForm, dict(kind="glora_old")),
    "dora-glora": (forms.DoRAForm, dict(kind="dora_glora")),
    "oft": (forms.OFTForm, dict(kind="oft", alpha=0.0)),
    "oft-constrained": (forms.OFTForm, dict(kind="oft", alpha=0.5)),
    "dora-oft": (forms.DoRAForm, dict(kind="dora_oft", alpha=0.5)),
    "boft": (forms.BOFTForm, dict(kind="boft", scale=0.4, rescale=True)),
}


def _variant_lora(model, variant, convention, seed, limit=8):
    """``variant`` on up to ``limit`` Linear targets: fused slices for OneTrainer names, whole weights for kohya."""
    targets = [t for t in sc.adapter_targets(model, convention) if not (t[2][0] % 32 or t[2][1] % 4)]
    return sc.adapter_lora(model, seed=seed, limit=limit, targets=targets, **VARIANTS[variant][1])


def _hook_classes(manager):
    """The form classes the hooks chose, and how many adapters fell back to a transient delta."""
    return ([cls for hook in manager.hooks for _, cls in hook.form_slots],
            sum(len(group.slots) for hook in manager.hooks for group in hook.transient_groups))


def _compare(base, inputs, chain_):
    merged = sc.forward(sc.chain(comfy.sd.load_lora_for_models, base, chain_), inputs)
    patcher, manager = sc.manager_bypass(base, chain_)
    return sc.max_rel_diff(sc.forward(patcher, inputs), merged), merged, manager


@pytest.mark.parametrize("placement", ["whole", "slice"])
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_form_matches_merged(variant, placement):
    base = sc.tiny_flux()
    inputs = sc.flux_inputs()
    lora = _variant_lora(base.model, variant, "kohya" if placement == "whole" else "onetrainer", seed=101)
    strength = 1.0 if "oft" in variant else 0.7
    rel, merged, manager = _compare(base, inputs, [(lora, strength)])
    assert sc.max_rel_diff(merged, sc.forward(base, inputs)) > 10 * REL_TOL  # the adapter visibly acts
    assert rel <= REL_TOL, "%s on %s: %.3e" % (variant, placement, rel)
    classes, transient = _hook_classes(manager)
    assert classes and set(classes) == {VARIANTS[variant][0]}, classes
    assert transient == 0  # a factored form, not the transient delta


@pytest.mark.parametrize("variant", ["lokr-lowrank", "loha", "dora", "dora-loha", "glora", "oft", "boft"])
@pytest.mark.parametrize("strength", [0.5, -1.3])
def test_form_at_other_strengths_after_a_plain_lora(variant, strength):
    """Merged patches in load order and weight-reading forms see the weight as already patched."""
    base = sc.tiny_flux()
    inputs = sc.flux_inputs()
    first = sc.make_lora(base.model, "kohya", rank=4, seed=102, alpha=4)
    second = _variant_lora(base.model, variant, "kohya", seed=103)
    chain_ = [(first, 0.9), (second, strength)]
    rel, merged, _ = _compare(base, inputs, chain_)
    alone = sc.forward(sc.chain(comfy.sd.load_lora_for_models, base, chain_[1:]), inputs)
    assert sc.max_rel_diff(merged, alone) > 10 * REL_TOL
    assert rel <= REL_TOL, "%s after a LoRA at %s: %.3e" % (variant, strength, rel)


def test_every_form_stacked_on_one_fused_weight():
    """All kinds at once, each on its own slices of the same qkv / linear1, in load order."""
    base = sc.tiny_flux()
    inputs = sc.flux_inputs()
    chain_ = [(_variant_lora(base.model, v, "onetrainer", seed=110 + i, limit=20), 0.6 if "oft" not in v else 1.0)
              for i, v in enumerate(["dora", "lokr-full", "oft", "loha", "glora", "boft"])]
    rel, _, manager = _compare(base, inputs, chain_)
    assert rel <= REL_TOL, rel
    assert max(len(h.form_slots) for h in manager.hooks) >= 6


def test_memory_contract_factors_and_vectors_only():
    """After a forward, a hook holds its adapters' factors (compute dtype) and O(out) vectors:
    never a tensor of the weight's size, and at most twice the factors' bytes plus 6 vectors per slot."""
    base = sc.tiny_flux()
    inputs = sc.flux_inputs()
    chain_ = [(_variant_lora(base.model, v, conv, seed=120 + i, limit=20), 0.8)
              for i, (v, conv) in enumerate([("lokr-lowrank", "kohya"), ("loha", "onetrainer"), ("dora", "kohya"),
                                             ("oft", "onetrainer"), ("glora", "kohya"), ("boft", "kohya")])]
    patcher, manager = sc.manager_bypass(base, chain_)
    import comfy.model_management as mm

    mm.load_models_gpu([patcher])
    try:
        sc.apply_model(patcher, inputs)
        checked = 0
        for hook in manager.hooks:
            weight = hook.module.weight
            held = [t for built in hook._built.values() for t in built.tensors()]
            factors = sum(t.numel() for s in hook.slots for t in s.adapter.weights if isinstance(t, torch.Tensor))
            rows = sum(s.target.offset[2] if s.target.offset else weight.shape[0] for s in hook.slots)
            assert held and max(t.numel() for t in held) < weight.numel(), hook.module_path
            assert hook.held_bytes() <= 4 * (2 * factors + 6 * rows + weight.shape[0]), hook.module_path
            checked += 1
        assert checked >= 10
    finally:
        mm.unload_all_models()
    assert all(hook.held_bytes() == 0 for hook in manager.hooks)  # ejected: nothing kept


def test_lowvram_forms_match_merged():
    """ComfyUI's partial loading: weights cast per forward, forms read the weight in chunks."""
    from test_lowvram import _run_partially_loaded

    base = sc.tiny_flux()
    inputs = sc.flux_inputs()
    chain_ = [(sc.make_lora(base.model, "onetrainer", rank=4, seed=130), 0.8),
              (_variant_lora(base.model, "dora", "kohya", seed=131, limit=20), 0.7),
              (_variant_lora(base.model, "lokr-full", "onetrainer", seed=132, limit=20), 0.7),
              (_variant_lora(base.model, "oft", "kohya", seed=133, limit=20), 1.0)]
    merged, merged_low = _run_partially_loaded(sc.chain(comfy.sd.load_lora_for_models, base, chain_), inputs)
    bypass, bypass_low = _run_partially_loaded(sc.manager_bypass(base, chain_)[0], inputs)
    assert merged_low > 10 and bypass_low > 10
    assert sc.max_rel_diff(bypass, merged) <= REL_TOL


def _conv_lora(weight, kind, gen):
    out_ch, in_ch, kh, kw = weight.shape
    name = "lora_unet_x_embedder_proj"
    if kind == "locon":
        factors = {"lora_up.weight": _r(gen, out_ch, 4, 1, 1), "lora_down.weight": _r(gen, 4, in_ch, kh, kw)}
    elif kind == "locon-tucker":
        factors = {"lora_up.weight": _r(gen, out_ch, 4, 1, 1), "lora_down.weight": _r(gen, 4, in_ch, 1, 1),
                   "lora_mid.weight": _r(gen, 4, 4, kh, kw)}
    elif kind == "lokr":
        factors = {"lokr_w1": _r(gen, 4, 4), "lokr_w2": _r(gen, out_ch // 4, in_ch // 4, kh, kw)}
    else:  # DoRA on a conv: no factored form, a transient delta from the merge code
        factors = {"lora_up.weight": _r(gen, out_ch, 4, 1, 1), "lora_down.weight": _r(gen, 4, in_ch, kh, kw),
                   "dora_scale": 1.0 + _r(gen, out_ch, 1, 1, 1)}
    factors["alpha"] = torch.tensor(2.0)
    return {"%s.%s" % (name, k): v for k, v in factors.items()}


@pytest.mark.parametrize("kind", ["locon", "locon-tucker", "lokr", "dora"])
def test_conv_forms_match_merged(kind):
    """SD3's patch-embedding Conv2d: LoCon and LoKr in factored conv form; DoRA transient."""
    if not sc.available("sd3"):
        pytest.skip("this ComfyUI cannot build SD3")
    base = sc.tiny_model("sd3")
    inputs = sc.tiny_inputs("sd3")
    lora = _conv_lora(base.model.diffusion_model.x_embedder.proj.weight, kind, torch.Generator().manual_seed(140))
    merged = sc.forward(comfy.sd.load_lora_for_models(base, None, lora, 0.8, 0)[0], inputs)
    patcher, manager = sc.manager_bypass(base, [(lora, 0.8)])
    assert sc.max_rel_diff(merged, sc.forward(base, inputs)) > 10 * REL_TOL
    assert sc.max_rel_diff(sc.forward(patcher, inputs), merged) <= REL_TOL
    classes, transient = _hook_classes(manager)
    expected = {"locon": conv_forms.ConvLoRAForm, "locon-tucker": conv_forms.ConvLoRAForm, "lokr": conv_forms.ConvLoKrForm,
}.get(kind)
    assert classes == ([expected] if expected else []) and transient == (0 if expected else 1)


def test_factors_that_do_not_fit_are_refused_at_load_with_shapes(caplog):
    """A LoHa whose second pair has the wrong width: refused when loaded, the rest applies."""
    import logging

    base = sc.tiny_flux()
    inputs = sc.flux_inputs()
    good = _variant_lora(base.model, "loha", "kohya", seed=150, limit=3)
    bad = dict(good)
    name = sorted({k.rsplit(".", 1)[0] for k in good})[0]
    bad[name + ".hada_w2_b"] = torch.randn(2, 7)
    patcher, manager = sc.manager_bypass(base, [(bad, 0.7)])
    with caplog.at_level(logging.ERROR):
        out = sc.forward(patcher, inputs)
    assert "LoHaAdapter key" in caplog.text and "(2, 7)" in caplog.text
    kept = {k: v for k, v in good.items() if not k.startswith(name + ".")}
    merged = sc.forward(comfy.sd.load_lora_for_models(base, None, kept, 0.7, 0)[0], inputs)
    assert sc.max_rel_diff(out, merged) <= REL_TOL


@pytest.mark.parametrize("max_group", [512, 16])
def test_boft_composite_blocks_and_stage_by_stage_agree_with_merged(max_group, monkeypatch):
    """BOFT as one block-diagonal map of 2^(m-1)·b groups, or (groups too large) stage by stage."""
    monkeypatch.setattr(forms.BOFTForm, "max_group", max_group)
    base = sc.tiny_flux()
    inputs = sc.flux_inputs()
    lora = _variant_lora(base.model, "boft", "onetrainer", seed=160)
    rel, _, manager = _compare(base, inputs, [(lora, 0.6)])
    assert rel <= REL_TOL
    built = [seg.form for h in manager.hooks for seg in h._build(torch.device("cpu"), torch.float32, False).segments]
    assert built and all((f.blocks is not None) == (max_group == 512) for f in built)


def _shape_grid():
    """(adapter type, weights) for a (12, 8) Linear: the shapes each form takes, and near misses
    (a transposed or one-off factor, a rank that does not chain, a non-square or broadcastable
    block, a stage count the rows cannot pair, a rescale of the wrong length)."""
    import itertools

    t = torch.ones
    out = []
    for up, down in itertools.product([(12, 2), (12, 3), (11, 2), (12, 0), (1, 2)], [(2, 8), (3, 8), (2, 7), (0, 8)]):
        for dora in (None, t(12, 1), t(1, 8)):
            out.append(("LoRAAdapter", (t(*up), t(*down), 2.0, None, dora, None)))
    for a1, b1, a2, b2 in itertools.product([(12, 2), (11, 2), (1, 2)], [(2, 8), (3, 8)], [(12, 3), (4, 3)],
                                            [(3, 8), (3, 7), (3, 1)]):
        for dora in (None, t(12, 1)):
            out.append(("LoHaAdapter", (t(*a1), t(*b1), 2.0, t(*a2), t(*b2), None, None, dora)))
    lokr_w1 = [dict(w1=(3, 2)), dict(w1=(4, 2)), dict(w1a=(3, 1), w1b=(1, 2)), dict(w1a=(3, 2), w1b=(1, 2)),
               dict(w1a=(3, 0), w1b=(0, 2))]
    lokr_w2 = [dict(w2=(4, 4)), dict(w2=(4, 3)), dict(w2=(4, 4, 1)), dict(w2a=(4, 2), w2b=(2, 4)),
               dict(w2a=(4, 1), w2b=(2, 4)), dict(w2a=(4, 0), w2b=(0, 4))]
    for one, two in itertools.product(lokr_w1, lokr_w2):
        f = {k: t(*v) for k, v in {**one, **two}.items()}
        for alpha, dora in ((2.0, None), (None, None), (2.0, t(12, 1))):
            out.append(("LoKrAdapter", (f.get("w1"), f.get("w2"), alpha, f.get("w1a"), f.get("w1b"), f.get("w2a"),
                                        f.get("w2b"), None, dora)))
    for blocks in [(3, 4, 4), (4, 3, 3), (2, 6, 6), (3, 4, 1), (3, 1, 4), (3, 4, 3), (12, 1, 1)]:
        for alpha, dora in ((0.0, None), (1.0, None), (None, None), (1.0, t(12, 1))):
            out.append(("OFTAdapter", (torch.randn(*blocks) * 0.1, None, alpha, dora)))
    for blocks in [(1, 3, 4, 4), (2, 3, 4, 4), (3, 3, 4, 4), (2, 6, 2, 2), (1, 4, 3, 3), (2, 4, 3, 3), (2, 3, 4, 3),
                   (1, 12, 1, 1), (2, 2, 6, 6)]:
        for rescale in (None, t(12, 1), t(11, 1)):
            out.append(("BOFTAdapter", (torch.randn(*blocks) * 0.1, rescale, 1.0, None)))
    return out


def test_shape_check_skips_only_probes_that_pass():
    """form_shapes.fits answers True only where the form probe passes (so a factor that does not fit
    is still refused at load, by the probe, with its shapes); and it is True for the shapes each
    form takes, so those loads skip the probe."""
    import comfy.weight_adapter as wa

    from freefuse_bypass_patch import form_shapes, slots
    from freefuse_bypass_patch.keys import BypassKeyError, parse_target

    target = parse_target("diffusion_model.x.weight")
    counts = {"fits": 0, "probed ok": 0, "refused": 0}
    for kind, weights in _shape_grid():
        adapter = getattr(wa, kind)(set(), weights)
        cls = forms.form_class(adapter, 12, 8)
        if cls is None:
            continue
        slot = slots.AdapterSlot("k", target, adapter, 0.7)
        fits = form_shapes.fits(cls, adapter, 12, 8)
        try:
            slots._probe_form(slot, cls, 0, 12, 8, (12, 8))
            probed = True
        except BypassKeyError as err:
            assert "'k'" in str(err) and "(12, 8)" in str(err)
            probed = False
        assert probed or not fits, (kind, [tuple(w.shape) for w in weights if isinstance(w, torch.Tensor)])
        counts["fits" if fits else "probed ok" if probed else "refused"] += 1
    assert min(counts.values()) > 0, counts
    square = [("OFTAdapter", (torch.zeros(3, 4, 4), None, 1.0, None)),
              ("BOFTAdapter", (torch.zeros(2, 6, 2, 2), torch.ones(12, 1), 1.0, None)),
              ("LoKrAdapter", (torch.ones(3, 2), None, 2.0, None, None, torch.ones(4, 2), torch.ones(2, 4), None, None)),
              ("LoHaAdapter", (torch.ones(12, 2), torch.ones(2, 8), 2.0, torch.ones(12, 2), torch.ones(2, 8),
                               None, None, None)),
              ("LoRAAdapter", (torch.ones(12, 2), torch.ones(2, 8), 2.0, None, torch.ones(12, 1), None))]
    for kind, weights in square:
        adapter = getattr(wa, kind)(set(), weights)
        assert form_shapes.fits(forms.form_class(adapter, 12, 8), adapter, 12, 8), kind
