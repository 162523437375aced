"""What code written for stock ComfyUI calls on the bypass classes and loader still works with
the plugin: on every pinned bypass tree and on upstream after 0.33, emulated in-process
(``upstream_emulation.py``: the manager's ``offload`` and the loader's ON_DETACH callback).

The name walks read the running tree's classes, so an upstream addition to
``BypassForwardHook``, ``BypassInjectionManager`` or to what the loader puts on a patcher turns
this file red instead of a user's ComfyUI.
"""

import gc
import inspect
import sys
import types

import comfy.lora
import comfy.model_management as mm
import comfy.sd
import pytest
import torch

import freefuse_bypass_patch as ffbp
from freefuse_bypass_patch import kit as sc
from freefuse_bypass_patch.hooks import FusedBypassHook
from freefuse_bypass_patch.loader import (FORK_MANAGER_ATTACHMENT, MANAGER_ATTACHMENT, REPORT_ATTACHMENT,
                                          SLOTS_ATTACHMENT)
from freefuse_bypass_patch.manager import FusedBypassManager
from freefuse_bypass_patch.names import NAMES_ATTACHMENT
from support import REL_TOL, bypass_era
from upstream_emulation import post_033_upstream

pytestmark = bypass_era

UPSTREAMS = ["tree", "post-0.33"]


def _upstream(which):
    if which == "tree":
        from contextlib import nullcontext

        return nullcontext()
    from comfy.weight_adapter.bypass import BypassForwardHook

    params = tuple(inspect.signature(BypassForwardHook._move_adapter_weights_to_device).parameters)
    if params[:2] != ("self", "device"):  # the 0.14.1 fork: a staticmethod (adapter, device, dtype)
        pytest.skip("upstream's offload calls hook._move_adapter_weights_to_device(device); this tree's stock "
                    "hook takes %s: upstream after 0.33 is emulated on upstream trees only" % (params,))
    return post_033_upstream()


def _code_names(cls) -> set:
    """Every attribute name the code of ``cls``'s functions reads, nested functions included."""
    names, todo = set(), [f.__code__ for f in vars(cls).values() if isinstance(f, types.FunctionType)]
    while todo:
        code = todo.pop()
        names.update(code.co_names)
        todo.extend(c for c in code.co_consts if isinstance(c, types.CodeType))
    return names


def _public(names) -> set:
    return {n for n in names if not n.startswith("_")}


def _stock_hook(module, adapter):
    """A stock BypassForwardHook of the running tree (0.14.1's takes a list of entries)."""
    from comfy.weight_adapter.bypass import BypassForwardHook

    if "adapter_entries" in inspect.signature(BypassForwardHook.__init__).parameters:
        return BypassForwardHook(module, [(adapter, 1.0, None)])
    return BypassForwardHook(module, adapter, multiplier=1.0)


def _loaded(base, convention="kohya", seed=1):
    lora = sc.make_lora(base.model, convention, rank=4, seed=seed)
    return lora, comfy.lora.load_lora(dict(lora), comfy.lora.model_lora_keys_unet(base.model, {}))


def _our_manager(patcher) -> FusedBypassManager:
    return patcher.attachments[MANAGER_ATTACHMENT]


@pytest.mark.parametrize("upstream", UPSTREAMS)
def test_our_hook_answers_every_name_of_the_stock_hook(upstream):
    """Public names of the stock hook (class and instance), and every name of it that the stock
    manager's code reads (``_move_adapter_weights_to_device`` in upstream's ``offload``)."""
    from comfy.weight_adapter.bypass import BypassForwardHook, BypassInjectionManager

    base = sc.tiny_flux()
    lora, loaded = _loaded(base)
    with _upstream(upstream):
        adapter = next(a for k, a in loaded.items() if isinstance(k, str))
        stock = _stock_hook(base.model.diffusion_model.img_in, adapter)
        hook_names = set(dir(BypassForwardHook)) | set(vars(stock))
        wanted = _public(hook_names) | (_code_names(BypassInjectionManager) & hook_names)
        ours = _our_manager(comfy.sd.load_bypass_lora_for_models(base, None, lora, 1.0, 0)[0]).hooks[0]
        missing = sorted(n for n in wanted if not hasattr(ours, n))
        assert not missing, "FusedBypassHook lacks %s of the stock BypassForwardHook" % missing
        if upstream != "tree":
            assert "_move_adapter_weights_to_device" in wanted  # the walk sees what offload calls


@pytest.mark.parametrize("upstream", UPSTREAMS)
def test_our_manager_answers_every_public_name_of_the_stock_manager(upstream):
    from comfy.weight_adapter.bypass import BypassInjectionManager

    base = sc.tiny_flux()
    lora, _ = _loaded(base)
    with _upstream(upstream):
        wanted = _public(set(dir(BypassInjectionManager)) | set(vars(BypassInjectionManager())))
        ours = _our_manager(comfy.sd.load_bypass_lora_for_models(base, None, lora, 1.0, 0)[0])
        missing = sorted(n for n in wanted if not hasattr(ours, n))
        assert not missing, "FusedBypassManager lacks %s of the stock BypassInjectionManager" % missing
        if upstream != "tree":
            assert "offload" in wanted
        assert ours.get_hook_count() == len(ours.hooks) > 0
        assert sum(len(v) for v in ours.adapters.values()) == len(ours.slots)


def _kinds(patcher) -> dict:
    """What a loader leaves on a patcher, by kind: the keys that hold something."""
    def filled(nested):
        return {k for k, v in (nested or {}).items() if (any(v.values()) if isinstance(v, dict) else v)}

    options = getattr(patcher, "model_options", {}) or {}
    return {
        "callbacks": filled(getattr(patcher, "callbacks", {})),
        "wrappers": filled(getattr(patcher, "wrappers", {})),
        "attachments": set(getattr(patcher, "attachments", {}) or {}),
        "injections": filled(getattr(patcher, "injections", {})),
        "additional_models": filled(getattr(patcher, "additional_models", {})),
        "object_patches": set(getattr(patcher, "object_patches", {}) or {}),
        "patches": set(getattr(patcher, "patches", {}) or {}),
        "model_options": set(options),
        "transformer_options": set(options.get("transformer_options", {})),
    }


def _plugin_own() -> dict:
    from comfy.patcher_extension import CallbacksMP

    return {"attachments": {SLOTS_ATTACHMENT, REPORT_ATTACHMENT, NAMES_ATTACHMENT, MANAGER_ATTACHMENT},
            "callbacks": {CallbacksMP.ON_DETACH}}


def _replaced() -> dict:
    """What stock leaves that the plugin replaces on purpose: the 0.14.1 fork's shared manager (its
    chaining; a chained load mutates it, so the parent patcher changes), carried over by ours."""
    return {"attachments": {FORK_MANAGER_ATTACHMENT}} if ffbp.capabilities().native_chaining else {}


@pytest.mark.parametrize("upstream", UPSTREAMS)
def test_patched_loader_gives_a_patcher_what_stock_gives(upstream):
    """On a LoRA stock handles fully (kohya names: whole weights), the patched loader leaves the
    same kinds of callbacks, attachments, wrappers, injections, patches and options as the stock
    loader of the running ComfyUI, plus the plugin's own (named in ``_plugin_own``)."""
    base = sc.tiny_flux()
    inputs = sc.flux_inputs()
    lora, _ = _loaded(base)
    with _upstream(upstream):
        ffbp.uninstall()
        try:
            stock = comfy.sd.load_bypass_lora_for_models(base, None, lora, 1.0, 0)[0]
        finally:
            ffbp.install()
        ours = comfy.sd.load_bypass_lora_for_models(base, None, lora, 1.0, 0)[0]
        stock_kinds, our_kinds, own, replaced = _kinds(stock), _kinds(ours), _plugin_own(), _replaced()
        for kind in stock_kinds:
            assert stock_kinds[kind] - replaced.get(kind, set()) <= our_kinds[kind], (
                kind, stock_kinds[kind] - our_kinds[kind])
            assert our_kinds[kind] - stock_kinds[kind] <= own.get(kind, set()), (
                kind, our_kinds[kind] - stock_kinds[kind])
        if upstream != "tree":
            assert stock_kinds["callbacks"]  # the emulation registered upstream's ON_DETACH offload
        # and both give the merged result on these plain keys
        merged = sc.forward(comfy.sd.load_lora_for_models(base, None, lora, 1.0, 0)[0], inputs)
        assert sc.max_rel_diff(sc.forward(ours, inputs), merged) <= REL_TOL
        assert sc.max_rel_diff(sc.forward(stock, inputs), merged) <= REL_TOL


class _Unraisable:
    """Exceptions raised where nobody can catch them (``__del__``, callbacks at collection)."""

    def __enter__(self):
        gc.collect()  # earlier tests' garbage is theirs
        self.seen, self._old = [], sys.unraisablehook
        sys.unraisablehook = lambda info: self.seen.append("%s: %r" % (info.exc_type.__name__, info.exc_value))
        return self

    def __exit__(self, *exc):
        gc.collect()
        sys.unraisablehook = self._old


def _trainable(base, key: str, seed: int):
    """A trainable LoRA (what ComfyUI's trainer makes) with non-zero factors, and its merged diff."""
    from comfy.weight_adapter import LoRAAdapter

    weight = comfy.utils.get_attr(base.model, key)
    adapter = LoRAAdapter.create_train(weight, rank=4, alpha=4.0)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        adapter.lora_down.weight.copy_(0.05 * torch.randn(adapter.lora_down.weight.shape, generator=gen))
    diff = (adapter.alpha / adapter.rank) * adapter.lora_up.weight.detach() @ adapter.lora_down.weight.detach()
    return adapter, ("diff", (diff.reshape(weight.shape),))


@pytest.mark.parametrize("upstream", UPSTREAMS)
@pytest.mark.parametrize("kind", ["inference", "trainable"])
def test_manager_used_directly_through_detach_and_unload(upstream, kind):
    """Stock manager by hand (as upstream's own code and other nodes use it), upstream's offload
    registered where it exists: patch, forward, detach (both ways), re-patch, forward, unload,
    collect: no exception anywhere, every output == merged."""
    import comfy.utils
    from comfy.patcher_extension import CallbacksMP
    from comfy.weight_adapter.bypass import BypassInjectionManager

    base = sc.tiny_flux()
    inputs = sc.flux_inputs()
    lora, loaded = _loaded(base, "diffusers", seed=21)  # fused slices: the plugin's hooks, not stock's
    merged_patcher = comfy.sd.load_lora_for_models(base, None, lora, 1.0, 0)[0]
    trainable = []
    if kind == "trainable":
        for n, key in enumerate(("diffusion_model.img_in.weight", "diffusion_model.double_blocks.0.img_mlp.0.weight")):
            adapter, diff = _trainable(base, key, seed=30 + n)
            trainable.append((key, adapter))
            merged_patcher.add_patches({key: diff}, 1.0)
    merged = sc.forward(merged_patcher, inputs)
    with _upstream(upstream), _Unraisable() as unraisable:
        manager = BypassInjectionManager()
        for key, adapter in list(loaded.items()) + trainable:
            manager.add_adapter(key, adapter, strength=1.0)
        patcher = base.clone()
        patcher.set_injections("bypass_lora", manager.create_injections(patcher.model))
        offload = getattr(manager, "offload", None)
        if offload is not None:
            patcher.add_callback(CallbacksMP.ON_DETACH, offload)
        hooks = [h for h in manager.hooks if isinstance(h, FusedBypassHook)]
        assert hooks and len(hooks) == manager.get_hook_count()

        mm.load_models_gpu([patcher])
        assert sc.max_rel_diff(sc.apply_model(patcher, inputs), merged) <= REL_TOL
        patcher.detach(unpatch_all=False)  # DynamicVRAM's way (and 0.33's __del__); ejects, runs ON_DETACH
        assert sum(h.held_bytes() for h in hooks) == 0  # nothing built is kept
        if offload is not None:
            assert all(p.device == patcher.offload_device for _, a in trainable for p in a.parameters())
        mm.unload_all_models()
        mm.load_models_gpu([patcher])  # re-patch
        assert sc.max_rel_diff(sc.apply_model(patcher, inputs), merged) <= REL_TOL
        patcher.detach()  # unpatch_all=True
        assert sum(h.held_bytes() for h in hooks) == 0
        mm.unload_all_models()
        assert sc.max_rel_diff(sc.forward(patcher, inputs), merged) <= REL_TOL
        assert sc.max_rel_diff(sc.forward(base, inputs), sc.forward(base.clone(), inputs)) == 0
        del patcher, manager, hooks
    assert not unraisable.seen, unraisable.seen


@pytest.mark.parametrize("upstream", UPSTREAMS)
def test_patched_loader_offloads_on_detach(upstream):
    """The patched loader's own ON_DETACH callback runs at a detach that keeps the weights
    (``unpatch_all=False``) without error; nothing built is kept; reloaded, == merged."""
    base = sc.tiny_flux()
    inputs = sc.flux_inputs()
    lora, _ = _loaded(base, "diffusers", seed=22)
    merged = sc.forward(comfy.sd.load_lora_for_models(base, None, lora, 1.0, 0)[0], inputs)
    with _upstream(upstream), _Unraisable() as unraisable:
        patcher = comfy.sd.load_bypass_lora_for_models(base, None, lora, 1.0, 0)[0]
        hooks = _our_manager(patcher).hooks
        mm.load_models_gpu([patcher])
        assert sc.max_rel_diff(sc.apply_model(patcher, inputs), merged) <= REL_TOL
        assert sum(h.held_bytes() for h in hooks) > 0
        patcher.detach(unpatch_all=False)
        assert sum(h.held_bytes() for h in hooks) == 0
        mm.unload_all_models()
        assert sc.max_rel_diff(sc.forward(patcher, inputs), merged) <= REL_TOL
        del patcher, hooks
    assert not unraisable.seen, unraisable.seen
