"""Bypass LoRAs follow a patcher into the copies of its model that ComfyUI runs (issue 19, part 3).

``deepclone_multigpu`` and ``match_multigpu_clones`` (comfy/multigpu.py, 0.28+) and
``clone(force_deepcopy=True)`` (the trainer) give a clone another torch model; the clone
keeps the injections by reference. Before the fix such a copy ran the base model bit for
bit. Here, with ComfyUI's own functions on CPU devices and a tiny Flux loaded through the
core loader path (``comfy.sd.load_diffusion_model``: it sets ``cached_patcher_init``, which
both copies need), two diffusers LoRAs (fused q/k/v slices) chained in bypass mode:

* a copy's output equals merged, and the original's bit for bit; the original keeps the
  same hooks (same objects, same count) and its output; both loaded at once, each runs
  its own hooks;
* masks and the LoRA switch act on the copy (``match_multigpu_clones`` carries the
  patcher's attachments): masked == the independent reference of masked_reference.py,
  one LoRA off == merged without it, all off == base bit for bit;
* sampling through ComfyUI's multi-GPU path (the copy runs in its worker thread) equals
  the same sampling without the copy;
* a copy's hooks go with its model; ComfyUI's trainer on a model with a bypass LoRA gives
  the losses and gradients of the same LoRA merged.

Tolerances (fp32): outputs 1e-5 relative (support.REL_TOL; measured 1.0e-6 against merged,
1.0e-6 against the masked reference); three Euler steps 1e-5 (as test_two_phase; measured
1.9e-6); trainer losses 1e-5 (measured 6.5e-8), gradients 1e-4 per tensor against its
largest entry (measured 1.6e-5, on a LoRA's scalar alpha: a sum over the whole weight; the
same merged model trained through the trainer's two adapter paths, bypass and weight
wrapper, differs by 1.2e-5). Same digits on 0.28.0 and 0.33.0.
"""

import gc
import inspect
import os
import threading
import weakref

import pytest
import torch

import comfy.model_management as mm
import comfy.model_patcher
import comfy.sample
import comfy.sd

import freefuse_bypass_patch as ffbp
from freefuse_bypass_patch import kit as sc
from freefuse_bypass_patch.hooks import ACTIVE_HOOK_ATTR
from masked_reference import masked_reference, reference_hooks, without_functions
from support import REL_TOL, bypass_era

pytestmark = bypass_era

_PATCHER = comfy.model_patcher.ModelPatcher
HAS_MULTIGPU = hasattr(_PATCHER, "deepclone_multigpu") and hasattr(_PATCHER, "match_multigpu_clones")
HAS_DEEPCOPY = "force_deepcopy" in inspect.signature(_PATCHER.clone).parameters
CPU = torch.device("cpu")
TEXT, TEXT_DIM, VEC_DIM = 5, 32, 32  # detectable_flux_state_dict's default feature sizes
STRENGTHS = (1.0, 0.8)
SAMPLE_TOL = 1e-5
LOSS_TOL, GRAD_TOL = 1e-5, 1e-4


@pytest.fixture(scope="module")
def flux(tmp_path_factory):
    """(base patcher from the core loader, two diffusers LoRAs, inputs)."""
    if not HAS_MULTIGPU and not HAS_DEEPCOPY:
        pytest.skip("this ComfyUI gives no clone another model (no deepclone_multigpu, no force_deepcopy: 0.28+)")
    from safetensors.torch import save_file

    path = os.path.join(str(tmp_path_factory.mktemp("multigpu")), "tiny_flux.safetensors")
    save_file(sc.detectable_flux_state_dict(), path)
    base = comfy.sd.load_diffusion_model(path)
    if getattr(base, "cached_patcher_init", None) is None:
        pytest.skip("this ComfyUI's load_diffusion_model sets no cached_patcher_init, which copies need")
    loras = [sc.make_lora(base.model, "diffusers", rank=4, seed=s, alpha=4) for s in (901, 902)]
    inputs = sc.flux_inputs(config=dict(in_channels=16, context_in_dim=TEXT_DIM, vec_in_dim=VEC_DIM), tokens=TEXT)
    return base, loras, inputs


def _needs(multigpu=False, deepcopy=False):
    if multigpu and not HAS_MULTIGPU:
        pytest.skip("this ComfyUI has no multi-GPU clones (comfy/multigpu.py came in 0.28)")
    if deepcopy and not HAS_DEEPCOPY:
        pytest.skip("this ComfyUI's clone() has no force_deepcopy (0.28+)")


def _chain(base, loras, load=None):
    """The LoRAs chained as 'a', 'b' at STRENGTHS (bypass by default)."""
    m = base
    for name, sd, strength in zip("ab", loras, STRENGTHS):
        if load is None:
            with ffbp.lora_name(name):
                m = comfy.sd.load_bypass_lora_for_models(m, None, sd, strength, 0)[0]
        else:
            m = load(m, None, sd, strength, 0)[0]
    return m


def _loaded_hooks(patcher):
    """{module path: hook} attached while ``patcher`` is loaded."""
    mm.load_models_gpu([patcher])
    try:
        return _hooks_on(patcher.model)
    finally:
        mm.unload_all_models()


def _hooks_on(model):
    return {path: m.__dict__[ACTIVE_HOOK_ATTR] for path, m in model.named_modules() if ACTIVE_HOOK_ATTR in m.__dict__}


def _torch_hooks(model) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def _matched(patcher, copy):
    """``patcher``'s multi-GPU clone for ``copy``'s model, as ``match_multigpu_clones`` makes it."""
    p = patcher.clone()
    p.set_additional_models("multigpu", [copy])
    p.match_multigpu_clones()
    (n,) = p.get_additional_models_with_key("multigpu")
    assert n.model is copy.model
    return n


def _halves():
    left = torch.zeros(4, 4)  # the 8x8 latent's 4x4 token grid
    left[:, :2] = 1.0
    return left, 1.0 - left


def test_deepclone_multigpu_copy_runs_the_bypass_lora(flux):
    _needs(multigpu=True)
    base, loras, inputs = flux
    chained = _chain(base, loras)
    merged_out = sc.forward(_chain(base, loras, comfy.sd.load_lora_for_models), inputs)
    base_out = sc.forward(base, inputs)
    out = sc.forward(chained, inputs)
    home = _loaded_hooks(chained)
    torch_hooks = _torch_hooks(chained.model)

    copy = chained.deepclone_multigpu(new_load_device=CPU)
    assert copy.model is not chained.model
    copy_out = sc.forward(copy, inputs)
    assert sc.max_rel_diff(copy_out, base_out) > 1e-2  # before the fix: equal to base, bit for bit
    assert sc.max_rel_diff(copy_out, merged_out) <= REL_TOL
    assert torch.equal(copy_out, out)  # same weights, same hooks on another model

    copy_hooks = _loaded_hooks(copy)
    assert sorted(copy_hooks) == sorted(home)
    assert not {id(h) for h in copy_hooks.values()} & {id(h) for h in home.values()}
    assert all(h.module is copy.model.get_submodule(path) for path, h in copy_hooks.items())
    # the original: the same hook objects, the same count, the same output bit for bit
    again = _loaded_hooks(chained)
    assert {p: id(h) for p, h in again.items()} == {p: id(h) for p, h in home.items()}
    assert torch.equal(sc.forward(chained, inputs), out)

    # the original and two copies (two extra devices) loaded at once, as multi-GPU sampling keeps
    # them: no hook detaches another's (attach only does that on its own module), each model
    # runs its own
    second = chained.deepclone_multigpu(new_load_device=CPU)
    patchers = (chained, copy, second)
    mm.load_models_gpu(list(patchers))
    try:
        for p in patchers:
            assert _hooks_on(p.model).keys() == home.keys()
        assert {p: id(h) for p, h in _hooks_on(chained.model).items()} == {p: id(h) for p, h in home.items()}
        for p in patchers:
            assert torch.equal(sc.apply_model(p, inputs), out)
    finally:
        mm.unload_all_models()
    for model in (p.model for p in patchers):  # eject detached everything inject attached, per model
        assert not _hooks_on(model)
        assert _torch_hooks(model) == torch_hooks


def test_an_injection_made_for_a_submodule_follows_too(flux):
    """A manager used directly on ``patcher.model.diffusion_model`` (another plugin's way):
    the patcher's own model holds it (its hooks, as before); a copy gets hooks on the same
    place in its own model, found through the clone's parent."""
    _needs(multigpu=True)
    import comfy.lora
    import comfy.lora_convert

    from freefuse_bypass_patch.manager import FusedBypassManager

    base, loras, inputs = flux
    prefix = "diffusion_model."
    manager = FusedBypassManager()
    key_map = comfy.lora.model_lora_keys_unet(base.model, {})
    for key, adapter in comfy.lora.load_lora(comfy.lora_convert.convert_lora(dict(loras[0])), key_map).items():
        key = key[len(prefix):] if isinstance(key, str) else (key[0][len(prefix):],) + tuple(key[1:])
        manager.add_adapter(key, adapter, 1.0)
    patcher = base.clone()
    patcher.set_injections("bypass_lora", manager.create_injections(patcher.model.diffusion_model))
    out = sc.forward(patcher, inputs)
    merged = sc.forward(comfy.sd.load_lora_for_models(base, None, loras[0], 1.0, 0)[0], inputs)
    assert sc.max_rel_diff(out, merged) <= REL_TOL
    assert {id(h) for h in _loaded_hooks(patcher).values()} == {id(h) for h in manager.hooks}
    copy = patcher.deepclone_multigpu(new_load_device=CPU)
    assert torch.equal(sc.forward(copy, inputs), out)
    assert sorted(_loaded_hooks(copy)) == sorted(prefix + h.module_path for h in manager.hooks)


def test_match_multigpu_clones_carry_masks_and_switch(flux):
    _needs(multigpu=True)
    base, loras, inputs = flux
    loras = [without_functions(base, sd) for sd in loras]  # the reference does LoRA math only
    chained = _chain(base, loras)
    copy = chained.deepclone_multigpu(new_load_device=CPU)
    left, right = _halves()
    words = torch.tensor([1.0, 1.0, 0.0, 0.0, 1.0])
    masked = ffbp.with_lora_masks(chained, {"a": left, "b": right}, text_masks={"a": words, "b": 1.0 - words})
    expected = masked_reference("flux", base, inputs, [(loras[0], STRENGTHS[0], left, words),
                                                        (loras[1], STRENGTHS[1], right, 1.0 - words)])
    n = _matched(masked, copy)
    assert ffbp.lora_masks(n)["a"] is not None
    masked_out = sc.forward(n, inputs)
    assert sc.max_rel_diff(masked_out, sc.forward(chained, inputs)) > 1e-3  # the masks change the output
    assert sc.max_rel_diff(masked_out, expected) <= REL_TOL
    assert torch.equal(masked_out, sc.forward(masked, inputs))

    only_b = comfy.sd.load_lora_for_models(base, None, loras[1], STRENGTHS[1], 0)[0]
    off = _matched(ffbp.with_loras_enabled(chained, {"a": False}), copy)
    assert sc.max_rel_diff(sc.forward(off, inputs), sc.forward(only_b, inputs)) <= REL_TOL
    all_off = _matched(ffbp.with_loras_enabled(masked, {"a": False, "b": False}), copy)
    assert torch.equal(sc.forward(all_off, inputs), sc.forward(base, inputs))

    # every clone matched to this copy runs the one hook set built for it
    built = [{p: id(h) for p, h in _loaded_hooks(m).items()} for m in (n, off, all_off)]
    assert built[0] and built[0] == built[1] == built[2]


def _sample(patcher, conds):
    latent = torch.zeros(1, 16, 8, 8)
    noise = comfy.sample.prepare_noise(latent, 42)
    return comfy.sample.sample(patcher, noise, 3, 2.0, "euler", "normal", conds[0], conds[1], latent, seed=42,
                               disable_pbar=True)


def test_sampling_through_the_multigpu_path_runs_the_copy(flux):
    """``_prepare_sampling`` matches the clone and loads it; with every device a CPU its entry
    replaces the main model's in ``multigpu_clones``, so the copy runs every step, in the
    multi-GPU worker thread."""
    _needs(multigpu=True)
    base, loras, _ = flux
    loras = [without_functions(base, sd) for sd in loras]
    gen = torch.Generator().manual_seed(11)
    conds = [[[torch.randn(1, TEXT, TEXT_DIM, generator=gen),
               {"guidance": 3.5, "pooled_output": torch.randn(1, VEC_DIM, generator=gen)}]] for _ in range(2)]
    chained = _chain(base, loras)
    left, right = _halves()
    masked = ffbp.with_lora_masks(chained, {"a": left, "b": right})
    copy = chained.deepclone_multigpu(new_load_device=CPU)
    copy.is_multigpu_base_clone = True
    ran = {}
    counters = [m.diffusion_model.register_forward_pre_hook(
        lambda module, args, name=name: ran.setdefault(name, set()).add(threading.current_thread().name))
        for name, m in (("main", chained.model), ("copy", copy.model))]
    try:
        plain, with_masks = [], []
        for patcher, outs in ((chained, plain), (masked, with_masks)):
            outs.append(_sample(patcher, conds))
            assert set(ran) == {"main"}
            ran.clear()
            multi = patcher.clone()
            multi.set_additional_models("multigpu", [copy])
            outs.append(_sample(multi, conds))
            assert set(ran) == {"copy"} and threading.current_thread().name not in ran["copy"]
            ran.clear()
    finally:
        for handle in counters:
            handle.remove()
    merged = _sample(_chain(base, loras, comfy.sd.load_lora_for_models), conds)
    with reference_hooks("flux", base, (4, 4), TEXT, [(loras[0], STRENGTHS[0], left, None),
                                                      (loras[1], STRENGTHS[1], right, None)]):
        expected = _sample(base, conds)
    assert sc.max_rel_diff(plain[1], merged) <= SAMPLE_TOL
    assert torch.equal(plain[1], plain[0])
    assert sc.max_rel_diff(with_masks[1], expected) <= SAMPLE_TOL
    assert torch.equal(with_masks[1], with_masks[0])


def test_force_deepcopy_clone_runs_the_bypass_lora(flux):
    _needs(deepcopy=True)
    base, loras, inputs = flux
    chained = _chain(base, loras)
    out = sc.forward(chained, inputs)
    merged_out = sc.forward(_chain(base, loras, comfy.sd.load_lora_for_models), inputs)
    deep = chained.clone(force_deepcopy=True)
    assert deep.model is not chained.model
    assert sc.max_rel_diff(sc.forward(deep, inputs), merged_out) <= REL_TOL
    assert torch.equal(sc.forward(deep, inputs), out)

    plain = [without_functions(base, sd) for sd in loras]
    left, right = _halves()
    masked = ffbp.with_lora_masks(_chain(base, plain), {"a": left, "b": right}).clone(force_deepcopy=True)
    expected = masked_reference("flux", base, inputs, [(plain[0], STRENGTHS[0], left, None),
                                                        (plain[1], STRENGTHS[1], right, None)])
    assert sc.max_rel_diff(sc.forward(masked, inputs), expected) <= REL_TOL
    assert torch.equal(sc.forward(chained, inputs), out)


def test_a_copys_hooks_go_with_its_model(flux):
    _needs(multigpu=True)
    base, loras, inputs = flux
    chained = _chain(base, loras)
    copy = chained.deepclone_multigpu(new_load_device=CPU)
    sc.forward(copy, inputs)
    model, hooks = weakref.ref(copy.model), [weakref.ref(h) for h in _loaded_hooks(copy).values()]
    following = chained.injections["bypass_lora"][0].inject.__self__  # the injection's copies.FollowingInjection
    assert hooks and len(following.copies()) == 1
    del copy
    gc.collect()
    assert model() is None
    assert all(h() is None for h in hooks)
    assert following.copies() == []


@pytest.mark.parametrize("bypass_mode", [True, False], ids=["trainer_bypass", "trainer_weight_wrapper"])
def test_trainer_on_a_bypass_lora_matches_it_merged(flux, bypass_mode):
    """TrainLoraNode deep-copies the model (force_deepcopy) and adds its own adapters (in
    bypass mode through BypassInjectionManager): with a bypass LoRA on the model, two SGD
    steps give the losses and gradients of the same LoRA merged (before the fix: the base
    model's). Flux needs gradient checkpointing here: without it ComfyUI's single block
    (``x += ...``) fails in backward, merged or not."""
    _needs(deepcopy=True)
    try:
        from comfy_extras.nodes_train import TrainLoraNode
    except ImportError as err:
        pytest.skip("ComfyUI's trainer does not import here: %s" % err)
    if "bypass_mode" not in inspect.signature(TrainLoraNode.execute).parameters:
        pytest.skip("this ComfyUI's trainer has no bypass mode")
    from torch.optim.optimizer import register_optimizer_step_pre_hook

    base, _, _ = flux
    # milder than the other tests' LoRAs (0.2): with those the chain makes training diverge
    # (loss 15 -> 22), where fp32 gradients are ill-conditioned whatever path computes them
    loras = [sc.make_lora(base.model, "diffusers", rank=4, seed=s, alpha=4, scale=0.1) for s in (903, 904)]
    gen = torch.Generator().manual_seed(5)
    latent = torch.randn(1, 16, 8, 8, generator=gen)
    cond = [[torch.randn(1, TEXT, TEXT_DIM, generator=gen),
             {"pooled_output": torch.randn(1, VEC_DIM, generator=gen), "guidance": 3.5}]]

    def train(model):
        grads = []  # per step: every trainable tensor's gradient, in the optimizer's order
        handle = register_optimizer_step_pre_hook(lambda opt, args, kwargs: grads.append(
            [p.grad.detach().clone() for group in opt.param_groups for p in group["params"]]))
        torch.manual_seed(0)  # adapter init, sigmas and batch order come from the global generator
        try:
            result = TrainLoraNode.execute(
                model=[model], latents=[{"samples": latent}], positive=[cond], batch_size=[1], steps=[2],
                grad_accumulation_steps=[1], learning_rate=[1e-3], rank=[2], optimizer=["SGD"],
                loss_function=["MSE"], seed=[0], training_dtype=["fp32"], lora_dtype=["fp32"],
                quantized_backward=[False], algorithm=["LoRA"], gradient_checkpointing=[True], checkpoint_depth=[1],
                offloading=[False], existing_lora=["[None]"], bucket_mode=[False], bypass_mode=[bypass_mode]).result
        finally:
            handle.remove()
        return result[1]["loss"], [dict(zip(result[0], step)) for step in grads]

    bypass_loss, bypass_grads = train(_chain(base, loras))
    merged_loss, merged_grads = train(_chain(base, loras, comfy.sd.load_lora_for_models))
    base_loss, _ = train(base)
    assert len(bypass_loss) == len(merged_grads) == 2
    assert max(abs(a - b) / abs(b) for a, b in zip(bypass_loss, base_loss)) > 1e-2
    assert max(abs(a - b) / abs(b) for a, b in zip(bypass_loss, merged_loss)) <= LOSS_TOL
    for step, (ours, theirs) in enumerate(zip(bypass_grads, merged_grads)):
        assert ours.keys() == theirs.keys() and ours
        for name, grad in theirs.items():
            if grad.abs().max() == 0:  # the first step: a LoRA's up side (its down starts at zero)
                assert ours[name].abs().max() == 0, (step, name)
            else:
                assert sc.max_rel_diff(ours[name], grad) <= GRAD_TOL, (step, name)
