"""comfy.sd.load_bypass_lora_for_models with the plugin: bugs fixed, merged as reference."""

import logging

import comfy.lora
import comfy.sd
import pytest
import torch

import freefuse_bypass_patch as ffbp
from freefuse_bypass_patch import kit as sc
from support import REL_TOL, bypass_era

pytestmark = bypass_era


@pytest.fixture
def stock():
    ffbp.uninstall()
    yield
    ffbp.install()
    assert ffbp.is_patched()


def test_stock_bypass_is_broken_here(stock):
    """Documents the bugs the plugin fixes on this tree (and proves these comparisons can fail)."""
    base = sc.tiny_flux()
    inputs = sc.flux_inputs()
    a = sc.make_lora(base.model, "diffusers", rank=4, seed=1, alpha=4)
    b = sc.make_lora(base.model, "kohya", rank=4, seed=2)
    result = sc.compare([(a, 1.0)])
    first = comfy.sd.load_bypass_lora_for_models(base, None, a, 1.0, 0)[0]
    first_before = sc.forward(first, inputs)
    comfy.sd.load_bypass_lora_for_models(first, None, b, 1.0, 0)
    first_changed = sc.max_rel_diff(sc.forward(first, inputs), first_before)
    if ffbp.capabilities().native_offsets:
        # the 0.14.1 fork: slices applied, but the diff function is ignored and chaining
        # a second LoRA changes the first patcher too
        assert result["dropped"] == 0 and result["rel_diff"] > 1e-3
        assert first_changed > 1e-3
    else:
        assert result["dropped"] >= 20 and result["rel_diff"] > 1e-3
        assert first_changed == 0.0


def test_summary_line_counts_fused_slices(caplog):
    base = sc.tiny_flux()
    lora = sc.make_lora(base.model, "diffusers", rank=4, seed=1)
    with caplog.at_level(logging.INFO):
        comfy.sd.load_bypass_lora_for_models(base, None, lora, 1.0, 0)
    ours = [r.getMessage() for r in caplog.records if "[freefuse_bypass_patch] bypass LoRA" in r.getMessage()]
    loaded = comfy.lora.load_lora(dict(lora), comfy.lora.model_lora_keys_unet(base.model, {}))
    assert len(ours) == 1
    assert "%d adapters in bypass (20 on fused slices, 1 with a diff function)" % len(loaded) in ours[0]
    assert "not in model state_dict" not in caplog.text


def test_bad_key_is_skipped_rest_still_loads(caplog):
    base = sc.tiny_flux()
    inputs = sc.flux_inputs()
    good = sc.make_lora(base.model, "diffusers", rank=4, seed=2)
    bad = dict(good)
    bad["transformer.transformer_blocks.0.attn.to_k.lora_B.weight"] = torch.randn(63, 4)  # 63 rows for a 64-row slice
    with caplog.at_level(logging.INFO):
        patcher = comfy.sd.load_bypass_lora_for_models(base, None, bad, 1.0, 0)[0]
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR and "freefuse" in r.getMessage()]
    assert len(errors) == 1
    assert "to_k" in errors[0] or "img_attn.qkv" in errors[0]
    assert "(63, 4)" in errors[0] and "(4, 64)" in errors[0] and "(192, 64)" in errors[0]
    assert "NOT applied (1): ('diffusion_model.double_blocks.0.img_attn.qkv.weight', (0, 64, 64))" in caplog.text
    without_bad = {k: v for k, v in good.items() if not k.startswith("transformer.transformer_blocks.0.attn.to_k.")}
    merged = comfy.sd.load_lora_for_models(base, None, without_bad, 1.0, 0)[0]
    assert sc.max_rel_diff(sc.forward(patcher, inputs), sc.forward(merged, inputs)) <= REL_TOL
    # the model is as it was, and the next load works in full
    after = comfy.sd.load_bypass_lora_for_models(base, None, good, 1.0, 0)[0]
    merged_good = comfy.sd.load_lora_for_models(base, None, good, 1.0, 0)[0]
    assert sc.max_rel_diff(sc.forward(after, inputs), sc.forward(merged_good, inputs)) <= REL_TOL


def test_lora_for_another_architecture_warns_once(caplog):
    base = sc.tiny_flux()
    foreign = {"lora_te_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.zeros(4, 8),
               "lora_te_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": torch.zeros(8, 4)}
    with caplog.at_level(logging.INFO):
        patcher = comfy.sd.load_bypass_lora_for_models(base, None, foreign, 1.0, 0)[0]
    assert patcher is not base and "bypass_lora" not in patcher.injections
    ours = [r.getMessage() for r in caplog.records if "[freefuse_bypass_patch]" in r.getMessage()]
    assert ours == ["[freefuse_bypass_patch] bypass LoRA: 0 of 2 keys matched this model "
                    "(a LoRA for another architecture?)"]


def test_empty_lora_says_so_and_changes_nothing(caplog):
    base = sc.tiny_flux()
    inputs = sc.flux_inputs()
    with caplog.at_level(logging.INFO):
        patcher = comfy.sd.load_bypass_lora_for_models(base, None, {}, 1.0, 0)[0]
    assert "bypass LoRA is empty" in caplog.text
    assert torch.equal(sc.forward(patcher, inputs), sc.forward(base, inputs))


def test_nan_factors_warn_with_the_key(caplog):
    base = sc.tiny_flux()
    lora = sc.make_lora(base.model, "diffusers", rank=2, seed=13)
    lora["transformer.transformer_blocks.1.attn.to_v.lora_A.weight"][0, 0] = float("nan")
    with caplog.at_level(logging.INFO):
        comfy.sd.load_bypass_lora_for_models(base, None, lora, 1.0, 0)
    warnings = [r.getMessage() for r in caplog.records if "NaN or inf" in r.getMessage()]
    assert len(warnings) == 1 and "double_blocks.1.img_attn.qkv" in warnings[0] and "(0, 128, 64)" in warnings[0]


def test_slice_outside_the_weight_is_refused_with_shapes(caplog):
    from freefuse_bypass_patch.manager import FusedBypassManager

    base = sc.tiny_flux()
    lora = sc.make_lora(base.model, "diffusers", rank=2, seed=14)
    loaded = comfy.lora.load_lora(lora, comfy.lora.model_lora_keys_unet(base.model, {}))
    key = ("diffusion_model.double_blocks.0.img_attn.qkv.weight", (0, 128, 64))
    manager = FusedBypassManager()
    manager.add_adapter(("diffusion_model.double_blocks.0.img_attn.qkv.weight", (0, 160, 64)), loaded[key])
    with caplog.at_level(logging.INFO):
        assert manager.create_hooks(base.model) == []
    assert "slice(dim=0, start=160, length=64)" in caplog.text and "(192, 64)" in caplog.text


def test_stock_manager_used_directly_takes_tuple_keys_and_stacks():
    """What FreeFuse and the trainer do: BypassInjectionManager + load_lora keys, by hand."""
    import comfy.weight_adapter.bypass as stock_bypass

    base = sc.tiny_flux()
    inputs = sc.flux_inputs()
    a = sc.make_lora(base.model, "diffusers", rank=4, seed=3)
    b = sc.make_lora(base.model, "onetrainer", rank=4, seed=4)
    key_map = comfy.lora.model_lora_keys_unet(base.model, {})
    manager = stock_bypass.BypassInjectionManager()
    for sd, s in ((a, 0.5), (b, 1.5)):
        for key, adapter in comfy.lora.load_lora(dict(sd), key_map).items():
            manager.add_adapter(key, adapter, strength=s)
    patcher = base.clone()
    patcher.set_injections("bypass_lora", manager.create_injections(patcher.model))
    assert manager.get_hook_count() == len({m for m in manager.__dict__["_freefuse_bypass_manager"].by_module()})
    merged = sc.chain(comfy.sd.load_lora_for_models, base, [(a, 0.5), (b, 1.5)])
    assert sc.max_rel_diff(sc.forward(patcher, inputs), sc.forward(merged, inputs)) <= REL_TOL
    manager.clear_adapters()
    assert not manager.__dict__["_freefuse_bypass_manager"].slots


def test_negative_and_large_strengths_applied_as_given():
    base = sc.tiny_flux()
    lora = sc.make_lora(base.model, "diffusers", rank=4, seed=9)
    for strength in (-1.5, 40.0):
        r = sc.compare([(lora, strength)])
        assert r["dropped"] == 0 and r["rel_diff"] <= REL_TOL, (strength, r)


def test_alternating_clones_each_give_their_own_result():
    base = sc.tiny_flux()
    inputs = sc.flux_inputs()
    a = sc.make_lora(base.model, "diffusers", rank=4, seed=10)
    b = sc.make_lora(base.model, "diffusers", rank=4, seed=11)
    pa = comfy.sd.load_bypass_lora_for_models(base, None, a, 1.0, 0)[0]
    pb = comfy.sd.load_bypass_lora_for_models(base, None, b, 1.0, 0)[0]
    ma = sc.forward(comfy.sd.load_lora_for_models(base, None, a, 1.0, 0)[0], inputs)
    mb = sc.forward(comfy.sd.load_lora_for_models(base, None, b, 1.0, 0)[0], inputs)
    for _ in range(2):
        assert sc.max_rel_diff(sc.forward(pa, inputs), ma) <= REL_TOL
        assert sc.max_rel_diff(sc.forward(pb, inputs), mb) <= REL_TOL


def test_adapters_the_fork_put_on_a_patcher_are_carried_over():
    """0.14.1 fork: a bypass LoRA loaded by the fork's own loader (before the plugin was
    installed) stays active when the plugin's loader chains a second one onto it."""
    if not ffbp.capabilities().native_chaining:
        pytest.skip("this ComfyUI's loader keeps no shared manager on the patcher")
    base = sc.tiny_flux()
    inputs = sc.flux_inputs()
    a = sc.make_lora(base.model, "kohya", rank=4, seed=15)  # plain keys: the fork applies these right
    b = sc.make_lora(base.model, "diffusers", rank=4, seed=16)
    ffbp.uninstall()
    try:
        first = comfy.sd.load_bypass_lora_for_models(base, None, a, 0.7, 0)[0]
        assert first.get_attachment("bypass_lora_manager") is not None
    finally:
        ffbp.install()
    second = comfy.sd.load_bypass_lora_for_models(first, None, b, 1.0, 0)[0]
    merged = sc.chain(comfy.sd.load_lora_for_models, base, [(a, 0.7), (b, 1.0)])
    assert sc.max_rel_diff(sc.forward(second, inputs), sc.forward(merged, inputs)) <= REL_TOL


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float8_e4m3fn])
def test_nonfinite_factors_are_named_once_at_load(caplog, dtype):
    """NaN or inf in a factor (any storage dtype, fp8 included) is named at load; finite ones are not."""
    base = sc.tiny_flux()
    lora = {k: v.to(dtype) if v.dim() > 1 else v for k, v in sc.make_lora(base.model, "kohya", rank=4, seed=17).items()}
    with caplog.at_level(logging.WARNING):
        comfy.sd.load_bypass_lora_for_models(base, None, lora, 1.0, 0)
    assert "NaN or inf" not in caplog.text
    bad = next(k for k in lora if k.endswith("lora_down.weight"))
    lora[bad] = lora[bad].float().index_put_((torch.tensor([0]), torch.tensor([1])), torch.tensor(float("nan"))).to(dtype)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        comfy.sd.load_bypass_lora_for_models(base, None, lora, 1.0, 0)
    assert caplog.text.count("NaN or inf factors") == 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_finite_factors_whose_sum_overflows_are_not_named(caplog, dtype):
    """The load's one-pass check sums each factor; a sum that overflows on finite values goes to
    the exact per-factor check, which names nothing."""
    base = sc.tiny_flux()
    lora = {k: v.to(dtype) if v.dim() > 1 else v for k, v in sc.make_lora(base.model, "kohya", rank=4, seed=18).items()}
    big = next(k for k in lora if k.endswith("lora_down.weight"))
    lora[big] = torch.full_like(lora[big], 3e38)
    assert not torch.isfinite(lora[big].sum())
    with caplog.at_level(logging.WARNING):
        comfy.sd.load_bypass_lora_for_models(base, None, lora, 1.0, 0)
    assert "NaN or inf" not in caplog.text
