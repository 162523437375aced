"""Each adapter's fate is decided once, at load (slots.py), and the forward only carries it out.

The cases of issue 14, each against ComfyUI's own merge code (merged's result) or a named
refusal at load: a control LoRA's reshape_weight, conv LoKr with a full w2 and Tucker LoCon on
Conv1d/Conv3d, a plain LoRA on an input-axis slice, adapters merged cannot apply, mixed
modules that keep their factored adapters, 1-D dora_scale, a module called with its input as
a keyword, and the memory contract in both up-projection layouts. No forward raises or logs.
"""

import logging

import pytest
import torch
import torch.nn.functional as F

import comfy.lora
import comfy.ops
import comfy.sd

from freefuse_bypass_patch import kit as sc
from freefuse_bypass_patch.manager import FusedBypassManager
from freefuse_bypass_patch.slots import FACTORED, REFUSED, TRANSIENT
from support import REL_TOL, bypass_era


def _r(gen, *shape, scale=0.2):
    return torch.randn(*shape, generator=gen) * scale


def _quiet_forward(patcher, inputs):
    """sc.forward, asserting that the plugin logs nothing while it runs."""
    with sc.LogCapture() as logs:
        out = sc.forward(patcher, inputs)
    assert not [r.getMessage() for r in logs.records if "freefuse" in r.getMessage()]
    return out


# -- a single ComfyUI op, bypassed by the manager, against the merge code --------------------
class _Root(torch.nn.Module):
    def __init__(self, layer):
        super().__init__()
        self.layer = layer


def _layer(kind, gen):
    ops = comfy.ops.disable_weight_init
    layer = {"linear": lambda: ops.Linear(32, 48),
             "conv1d": lambda: ops.Conv1d(8, 16, 3, padding=1),
             "conv3d": lambda: ops.Conv3d(8, 16, 3, padding=1)}[kind]()
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(_r(gen, *p.shape))
    return layer


def _input(kind, gen):
    return {"linear": lambda: _r(gen, 2, 5, 32, scale=1.0), "conv1d": lambda: _r(gen, 2, 8, 11, scale=1.0),
            "conv3d": lambda: _r(gen, 2, 8, 4, 5, 6, scale=1.0)}[kind]()


def _direct(kind, factors, key=None, strength=0.8, seed=0):
    """(bypass output, merged output, base output, decision, forward logs) for one adapter on one op."""
    gen = torch.Generator().manual_seed(seed)
    layer, x = _layer(kind, gen), _input(kind, gen)
    root = _Root(layer)
    key = key or "layer.weight"
    adapter = comfy.lora.load_lora({"x.%s" % k: v for k, v in factors.items()}, {"x": key})[key]
    with torch.no_grad():
        base = layer(x)
        merged = None
        with sc.LogCapture():  # merged logs (or raises) its own failures; the decision below says them once
            try:
                merged_weight = comfy.lora.calculate_weight([(strength, adapter, 1.0) + (
                    (key[1], None) if isinstance(key, tuple) else (None, None))], layer.weight.detach().clone(),
                    "layer.weight", intermediate_dtype=torch.float32)
                merged = F.linear(x, merged_weight, layer.bias) if kind == "linear" else layer._conv_forward(
                    x, merged_weight, layer.bias)
            except Exception:  # a Tucker LoCon on Conv1d/3d: the merge code raises
                pass
        manager = FusedBypassManager()
        slot = manager.add_adapter(key, adapter, strength)
        with sc.LogCapture() as load_logs:
            hooks = manager.create_hooks(root)
        decision = [s for h in hooks for s in h.slots][0].decision if hooks else None
        for hook in hooks:
            hook.attach()
        try:
            with sc.LogCapture() as logs:
                out = layer(x)
        finally:
            for hook in hooks:
                hook.detach()
    return out, merged, base, decision, slot, load_logs, logs


def _lokr_full(gen, out_ch, in_ch, kernel):
    return {"lokr_w1": _r(gen, 2, 2), "lokr_w2": _r(gen, out_ch // 2, in_ch // 2, *kernel), "alpha": torch.tensor(1.0)}


@pytest.mark.parametrize("kind", ["conv1d", "conv3d"])
def test_conv_lokr_with_a_full_w2_follows_merged(kind):
    """Merged unsqueezes w1 only for a 4-D w2; for 3-D/5-D its kron pads w1 in front (the delta
    is scrambled): the plugin gives that same result, through the merge code, not the textbook one."""
    kernel = (3,) if kind == "conv1d" else (3, 3, 3)
    factors = _lokr_full(torch.Generator().manual_seed(1), 16, 8, kernel)
    out, merged, base, decision, *_ = _direct(kind, factors)
    assert decision.fate == TRANSIENT and "Conv" in decision.reason
    assert sc.max_rel_diff(merged, base) > 10 * REL_TOL
    assert sc.max_rel_diff(out, merged) <= REL_TOL


@pytest.mark.parametrize("kind", ["conv1d", "conv3d"])
def test_tucker_locon_on_conv1d_conv3d_is_refused_as_merged_cannot_apply_it(kind):
    gen = torch.Generator().manual_seed(2)
    kernel = (3,) if kind == "conv1d" else (3, 3, 3)
    ones = (1,) * len(kernel)
    factors = {"lora_up.weight": _r(gen, 16, 4, *ones), "lora_down.weight": _r(gen, 4, 8, *ones),
               "lora_mid.weight": _r(gen, 4, 4, *kernel), "alpha": torch.tensor(2.0)}
    out, _, base, decision, _, load_logs, logs = _direct(kind, factors)
    assert decision is None  # no hook: the only adapter was refused
    errors = [r.getMessage() for r in load_logs.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "merge code cannot apply it" in errors[0] and "layer.weight" in errors[0], errors
    assert torch.equal(out, base) and not logs.records


def test_plain_lora_on_an_input_axis_slice_is_transient_and_equals_merged():
    gen = torch.Generator().manual_seed(3)
    factors = {"lora_up.weight": _r(gen, 48, 4), "lora_down.weight": _r(gen, 4, 16), "alpha": torch.tensor(2.0)}
    out, merged, base, decision, *_ = _direct("linear", factors, key=("layer.weight", (1, 8, 16)))
    assert decision.fate == TRANSIENT and decision.reason == "a slice on the input axis"
    assert sc.max_rel_diff(merged, base) > 10 * REL_TOL
    assert sc.max_rel_diff(out, merged) <= REL_TOL


@pytest.mark.parametrize("square", [True, False])
def test_one_dimensional_dora_scale_follows_merged(square):
    """A (out,) dora_scale: merged broadcasts it against the (out, 1) row norms: on a square weight
    that scales columns (the plugin gives the same), on another it fails (refused at load)."""
    gen = torch.Generator().manual_seed(4)
    rows, cols = (32, 32) if square else (48, 32)
    factors = {"lora_up.weight": _r(gen, rows, 4), "lora_down.weight": _r(gen, 4, cols), "alpha": torch.tensor(4.0),
               "dora_scale": 1.0 + _r(gen, rows)}
    gen2 = torch.Generator().manual_seed(0)
    if square:
        ops = comfy.ops.disable_weight_init
        layer = ops.Linear(32, 32)
        with torch.no_grad():
            for p in layer.parameters():
                p.copy_(_r(gen2, *p.shape))
        root, x = _Root(layer), _r(gen2, 2, 5, 32, scale=1.0)
        adapter = comfy.lora.load_lora({"x.%s" % k: v for k, v in factors.items()}, {"x": "layer.weight"})["layer.weight"]
        with torch.no_grad():
            merged = F.linear(x, comfy.lora.calculate_weight([(0.8, adapter, 1.0, None, None)],
                                                             layer.weight.detach().clone(), "w"), layer.bias)
            manager = FusedBypassManager()
            manager.add_adapter("layer.weight", adapter, 0.8)
            hooks = manager.create_hooks(root)
            hooks[0].attach()
            out = layer(x)
            hooks[0].detach()
        assert hooks[0].slots[0].decision.fate == TRANSIENT and "1-D dora_scale" in hooks[0].slots[0].decision.reason
        assert sc.max_rel_diff(out, merged) <= REL_TOL
    else:
        out, _, base, decision, _, load_logs, logs = _direct("linear", factors)
        assert decision is None and any("merge code cannot apply" in r.getMessage() for r in load_logs.records)
        assert torch.equal(out, base) and not logs.records


# -- through the loader, on a tiny Flux ------------------------------------------------------


@bypass_era
def test_control_lora_reshape_is_merged_as_merged_does():
    """A control LoRA (BFL's Flux Depth/Canny: reshape_weight widens img_in for a concat latent)
    is handed to add_patches at load: the model then takes the concat input, as merged does."""
    base = sc.tiny_flux()
    inputs = dict(sc.flux_inputs(), c_concat=torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(5)))
    gen = torch.Generator().manual_seed(6)
    control = {"lora_unet_img_in.lora_up.weight": _r(gen, 64, 4), "lora_unet_img_in.lora_down.weight": _r(gen, 4, 128),
               "lora_unet_img_in.reshape_weight": torch.tensor([64, 128])}
    control.update(sc.make_lora(base.model, "kohya", rank=4, seed=7, include=lambda k: "img_attn.qkv" in k))
    merged = sc.forward(comfy.sd.load_lora_for_models(base, None, control, 1.0, 0)[0], inputs)
    with sc.LogCapture() as logs:
        patched = comfy.sd.load_bypass_lora_for_models(base, None, control, 1.0, 0)[0]
    summary = [r.getMessage() for r in logs.records if "bypass LoRA" in r.getMessage()]
    assert len(summary) == 1 and "1 merged (img_in.weight: it reshapes the weight" in summary[0], summary
    assert "diffusion_model.img_in.weight" in patched.patches
    assert sc.max_rel_diff(_quiet_forward(patched, inputs), merged) <= REL_TOL
    assert tuple(base.model.diffusion_model.img_in.weight.shape) == (64, 64)  # the base patcher is untouched


def _unappliable(kind, rows, cols, gen):
    if kind == "boft-no-alpha":
        return {"oft_blocks": _r(gen, 2, rows // 16, 16, 16)}
    if kind == "oft-not-tiling":
        return {"oft_blocks": _r(gen, rows // 16 - 1, 16, 16), "alpha": torch.tensor(1.0)}
    return {"lokr_w1": _r(gen, 4, 4), "lokr_w2_a": _r(gen, 4, rows // 4), "lokr_w2_b": _r(gen, 4, cols // 4),  # tucker
            "lokr_t2": _r(gen, 4, 4, 1, 1), "alpha": torch.tensor(1.0)}


@bypass_era
@pytest.mark.parametrize("kind", ["boft-no-alpha", "oft-not-tiling", "lokr-tucker-linear"])
def test_what_merged_cannot_apply_is_refused_once_at_load(kind):
    """Merged logs an error and leaves the weight; bypass refuses the adapter at load, once, with the
    key and shapes, and every forward is merged's (and silent), instead of an error per forward."""
    base = sc.tiny_flux()
    inputs = sc.flux_inputs()
    gen = torch.Generator().manual_seed(8)
    rows, cols = base.model.diffusion_model.double_blocks[0].img_attn.proj.weight.shape
    lora = {"lora_unet_double_blocks_0_img_attn_proj.%s" % k: v for k, v in _unappliable(kind, rows, cols, gen).items()}
    lora.update(sc.make_lora(base.model, "kohya", rank=4, seed=9, include=lambda k: "img_attn.qkv" in k))
    with sc.LogCapture():
        merged = sc.forward(comfy.sd.load_lora_for_models(base, None, lora, 1.0, 0)[0], inputs)
    with sc.LogCapture() as logs:
        patched = comfy.sd.load_bypass_lora_for_models(base, None, lora, 1.0, 0)[0]
    errors = [r.getMessage() for r in logs.records if r.levelno >= logging.ERROR and "freefuse" in r.getMessage()]
    assert len(errors) == 1 and "img_attn.proj.weight" in errors[0] and "merge code cannot apply" in errors[0], errors
    assert sc.max_rel_diff(_quiet_forward(patched, inputs), merged) <= REL_TOL
    assert sc.max_rel_diff(_quiet_forward(patched, inputs), merged) <= REL_TOL  # the second forward too


@bypass_era
def test_factored_adapters_stay_factored_beside_a_transient():
    """One module: a plain LoRA, then a DoRA on the input axis (transient, reads W'), then a LoRA on an
    input-axis slice. The first stays a factored form; the merge code forms the rest against W' with
    the first merged in; the result is merged's. The fates are in the one load-time summary."""
    base = sc.tiny_flux()
    inputs = sc.flux_inputs()
    gen = torch.Generator().manual_seed(10)
    rows, cols = base.model.diffusion_model.double_blocks[0].img_mlp[0].weight.shape
    name = "lora_unet_double_blocks_0_img_mlp_0"
    plain = {"%s.%s" % (name, k): v for k, v in sc.adapter_factors("lora", rows, cols, gen).items()}
    dora_in = {"%s.%s" % (name, k): v for k, v in sc.adapter_factors("dora_in", rows, cols, gen).items()}
    loras = [(plain, 0.9), (dora_in, 0.7)]
    merged = sc.forward(sc.chain(comfy.sd.load_lora_for_models, base, loras), inputs)
    with sc.LogCapture() as logs:
        patched = sc.chain(comfy.sd.load_bypass_lora_for_models, base, loras)
    summaries = [r.getMessage() for r in logs.records if "bypass LoRA" in r.getMessage()]
    assert "1 factored" in summaries[0] and "1 transient (double_blocks.0.img_mlp.0.weight: DoRA on the input " \
        "axis)" in summaries[1], summaries
    assert logs.count("DoRA on the input axis") == 1, [r.getMessage() for r in logs.records]  # said once, at its load
    assert sc.max_rel_diff(_quiet_forward(patched, inputs), merged) <= REL_TOL
    from freefuse_bypass_patch.manager import FusedBypassManager as Manager
    from freefuse_bypass_patch.loader import SLOTS_ATTACHMENT

    hook = Manager(patched.attachments[SLOTS_ATTACHMENT]).create_hooks(patched.model)[0]
    assert [s.decision.fate for s, _ in hook.form_slots] == [FACTORED]
    assert len(hook.transient_groups) == 1 and len(hook.transient_groups[0].prefix) == 1


@bypass_era
def test_keyword_input_is_applied():
    """A module called as ``module(input=x)`` gets its adapters as when called ``module(x)``."""
    base = sc.tiny_flux()
    lora = sc.make_lora(base.model, "kohya", rank=4, seed=11, include=lambda k: "img_attn.proj" in k)
    patched = comfy.sd.load_bypass_lora_for_models(base, None, lora, 1.0, 0)[0]
    import comfy.model_management as mm

    module = patched.model.diffusion_model.double_blocks[0].img_attn.proj
    x = torch.randn(1, 5, module.weight.shape[1], generator=torch.Generator().manual_seed(12))
    with torch.no_grad():
        plain = module(x)
        mm.load_models_gpu([patched])
        try:
            positional, keyword = module(x), module(input=x)
        finally:
            mm.unload_all_models()
    assert sc.max_rel_diff(positional, plain) > 10 * REL_TOL
    assert torch.equal(keyword, positional)


@bypass_era
@pytest.mark.parametrize("layout", ["sliced", "block"])
def test_memory_contract_in_both_layouts_rank_32_four_slices(layout):
    """Flux's linear1 with q, k, v and mlp slices at rank 32 (and qkv thirds): a hook holds at most
    twice the factors' bytes in either layout (block-diagonal only where that holds)."""
    base = sc.tiny_flux()
    inputs = sc.flux_inputs()
    lora = sc.make_lora(base.model, "diffusers", rank=32, seed=13, only="slices")
    patcher, manager = sc.manager_bypass(base, [(lora, 1.0)], layout)
    import comfy.model_management as mm

    mm.load_models_gpu([patcher])
    try:
        with torch.no_grad():
            patcher.model.apply_model(inputs["x"], inputs["t"], **{k: v for k, v in inputs.items() if k not in ("x", "t")})
        four = [h for h in manager.hooks if len(h.slots) == 4]
        assert four, "no module with four slices"
        for hook in manager.hooks:
            factors = sum(t.numel() * 4 for s in hook.slots for t in s.adapter.weights if isinstance(t, torch.Tensor))
            assert 0 < hook.held_bytes() <= 2 * factors, (hook.module_path, hook.held_bytes(), factors)
    finally:
        mm.unload_all_models()


@bypass_era
def test_dry_run_prints_the_decisions_the_load_takes():
    """check --lora on a file with every fate: its decisions are what the hooks and patches of a
    real load hold (factored forms, transient groups, add_patches), the rest refused."""
    from freefuse_bypass_patch.kit.dryrun import dry_run
    from freefuse_bypass_patch.loader import INJECTION_KEY

    base = sc.tiny_flux()
    gen = torch.Generator().manual_seed(14)
    model = base.model.diffusion_model
    parts = {"double_blocks.0.img_attn.proj": "lora", "double_blocks.0.img_mlp.0": "loha",
             "double_blocks.0.img_mlp.2": "dora_in", "double_blocks.1.img_attn.proj": "boft-no-alpha"}
    lora = {}
    for path, kind in parts.items():
        rows, cols = model.get_submodule(path).weight.shape
        factors = _unappliable(kind, rows, cols, gen) if kind == "boft-no-alpha" else sc.adapter_factors(kind, rows, cols,
                                                                                                        gen)
        lora.update({"diffusion_model.%s.%s" % (path, k): v for k, v in factors.items()})  # native names
    lora.update({"lora_unet_img_in.lora_up.weight": _r(gen, 64, 4), "lora_unet_img_in.lora_down.weight": _r(gen, 4, 128),
                 "lora_unet_img_in.reshape_weight": torch.tensor([64, 128])})
    run = dry_run(base, lora)
    printed = {d.module: d.how for d in run.adapters}
    assert printed == {"double_blocks.0.img_attn.proj": "factored", "double_blocks.0.img_mlp.0": "factored",
                       "double_blocks.0.img_mlp.2": "transient", "double_blocks.1.img_attn.proj": "refused",
                       "img_in": "merged"}, printed

    with sc.LogCapture():
        loaded = comfy.sd.load_bypass_lora_for_models(base, None, lora, 1.0, 0)[0]
    hooks = FusedBypassManager(loaded.attachments["freefuse_bypass_lora"]).create_hooks(loaded.model)
    held = {}
    for hook in hooks:
        module = hook.module_path.replace("diffusion_model.", "", 1)
        held.update({module: "factored" for _ in hook.form_slots})
        held.update({module: "transient" for group in hook.transient_groups for _ in group.slots})
    held.update({k.replace("diffusion_model.", "", 1)[: -len(".weight")]: "merged" for k in loaded.patches})
    assert {m: h for m, h in printed.items() if h != "refused"} == held
    assert INJECTION_KEY in loaded.injections
