"""The self-check side: tiny real ComfyUI models, random LoRAs, bypass-vs-merged comparisons,
and the commands built on them.

Used by ``check``, the tests and the benchmarks; never by the runtime path (nothing that
ComfyUI loads at start-up imports it). One module per job, imports pointing one way:

* ``trees``: where ComfyUI trees are found (no torch, no comfy: the test runner uses it);
* ``comfyui``: make a ComfyUI tree importable as ``comfy`` (CPU mode);
* ``models``: tiny models of every family, built by ComfyUI's own classes, and their inputs;
* ``loras``: random LoRAs in every naming convention, from ComfyUI's own key map, and random
  adapters of every type (LoRA, DoRA, LoHa, LoKr, GLoRA, OFT, BOFT);
* ``compare``: run a model as ComfyUI does, bypass vs merged (uses ``models``);
* ``gguf``: tiny GGUF models loaded by ComfyUI-GGUF (imported on its own: it needs ``gguf``);
* ``dryrun`` (``check --lora``), ``maskview`` (``check --masks``) -> ``cli`` (the commands,
  run by ``python -m freefuse_bypass_patch``).

``from freefuse_bypass_patch import kit`` gives the names below under one name. They are
imported on first use, so ``import freefuse_bypass_patch.kit.trees`` loads neither torch
nor ComfyUI.
"""

import importlib
import sys
import types
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # what __getattr__ gives, for type checkers and editors
    from .comfyui import default_comfyui, load_custom_node, quiet_logging, start_quietly, use_comfyui
    from .compare import (LargestNewCpuTensor, LogCapture, apply_model, chain, compare, direct_hook_vs_merged,
                          forward, manager_bypass, max_rel_diff, time_interleaved, weights_snapshot, with_layout)
    from .loras import (ADAPTER_KINDS, CONVENTIONS, adapter_factors, adapter_lora, adapter_targets, family_lora,
                        key_forms, load_lora_file, lora_targets, make_lora, named_targets, random_lora, save_lora)
    from .models import (FAMILIES, FLUX_1, MODELS, RELEASED, SLICED, TINY_FLUX, TINY_SDXL, available, build_model,
                         detectable_flux_state_dict, flux_config, flux_inputs, random_patcher, randomize_,
                         released_config, sdxl_inputs, tiny_config, tiny_flux, tiny_inputs, tiny_model, tiny_sdxl)

# name -> the kit module that defines it
_EXPORTS = {
    "comfyui": ("use_comfyui", "default_comfyui", "start_quietly", "quiet_logging", "load_custom_node"),
    "models": ("TINY_FLUX", "FAMILIES", "SLICED", "tiny_flux", "random_patcher", "randomize_", "flux_inputs",
               "available", "tiny_model", "tiny_inputs", "tiny_config", "FLUX_1", "RELEASED", "flux_config",
               "released_config", "build_model", "detectable_flux_state_dict", "MODELS", "TINY_SDXL", "tiny_sdxl",
               "sdxl_inputs"),
    "loras": ("CONVENTIONS", "lora_targets", "named_targets", "make_lora", "random_lora", "family_lora", "save_lora",
              "load_lora_file", "key_forms", "ADAPTER_KINDS", "adapter_factors", "adapter_targets", "adapter_lora"),
    "compare": ("forward", "apply_model", "manager_bypass", "LogCapture", "weights_snapshot", "max_rel_diff", "chain",
                "compare", "direct_hook_vs_merged", "with_layout", "time_interleaved", "LargestNewCpuTensor"),
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}


def __getattr__(name):
    """A kit name, from its module on first use (PEP 562)."""
    if name in _MODULE_OF:
        value = getattr(importlib.import_module("." + _MODULE_OF[name], __name__), name)
        globals()[name] = value  # later look-ups skip this function
        return value
    raise AttributeError("module %r has no attribute %r" % (__name__, name))


def __dir__():
    return sorted(set(globals()) | set(_MODULE_OF))


class _Kit(types.ModuleType):
    """The kit package, keeping ``kit.compare`` the function: importing the module ``kit.compare``
    (by anyone, the first time) binds it on its package under the same name."""

    def __setattr__(self, name, value):
        if isinstance(value, types.ModuleType) and value.__name__ == self.__name__ + "." + name and name in _MODULE_OF:
            value = getattr(value, name)
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Kit
__all__ = [name for names in _EXPORTS.values() for name in names]
