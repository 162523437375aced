"""Upstream ComfyUI after 0.33, emulated in-process on the running tree (never by editing it).

What upstream added (COMFYUI_FACTS.md §10, read from its sources, version file 0.38.1):

* ``BypassInjectionManager.offload(model_patcher, unpatch_all)``: every hook the manager holds
  gets ``hook._move_adapter_weights_to_device(model_patcher.offload_device)``;
* ``comfy.sd.load_bypass_lora_for_models`` registers ``manager.offload`` as an ON_DETACH
  callback on the model's patcher (not the text encoder's) when it injected hooks.

``post_033_upstream()`` adds both for the duration of a ``with`` block, under the plugin (which
is reinstalled on top, as it would be on a real post-0.33 ComfyUI), and restores the tree after.
"""

from __future__ import annotations

import contextlib
import functools
import gc

import freefuse_bypass_patch as ffbp


def _offload(self, model_patcher, unpatch_all):
    for hook in self.hooks:
        hook._move_adapter_weights_to_device(model_patcher.offload_device)


def _with_offload_callback(stock_loader):
    """The stock loader plus upstream's registration of its model manager's ``offload``."""
    from comfy.patcher_extension import CallbacksMP
    from comfy.weight_adapter.bypass import BypassInjectionManager

    @functools.wraps(stock_loader)
    def load_bypass_lora_for_models(model, clip, lora, strength_model, strength_clip):
        made = []
        init = BypassInjectionManager.__init__

        def recording_init(self, *args, **kwargs):
            init(self, *args, **kwargs)
            made.append(self)

        BypassInjectionManager.__init__ = recording_init
        try:
            new_model, new_clip = stock_loader(model, clip, lora, strength_model, strength_clip)
        finally:
            BypassInjectionManager.__init__ = init
        if new_model is not None and made and made[0].get_hook_count() > 0:  # the model's manager comes first
            new_model.add_callback(CallbacksMP.ON_DETACH, made[0].offload)
        return new_model, new_clip

    return load_bypass_lora_for_models


@contextlib.contextmanager
def post_033_upstream():
    import comfy.sd
    from comfy.weight_adapter.bypass import BypassInjectionManager

    was_patched = ffbp.is_patched()
    ffbp.uninstall()
    stock_loader = comfy.sd.load_bypass_lora_for_models
    had_offload = "offload" in BypassInjectionManager.__dict__
    if not had_offload:
        BypassInjectionManager.offload = _offload
    comfy.sd.load_bypass_lora_for_models = _with_offload_callback(stock_loader)
    if was_patched:
        ffbp.install()
    try:
        yield
    finally:
        gc.collect()  # patchers made here run their ON_DETACH (upstream's offload) while it exists
        ffbp.uninstall()
        comfy.sd.load_bypass_lora_for_models = stock_loader
        if not had_offload:
            del BypassInjectionManager.offload
        if was_patched:
            ffbp.install()
