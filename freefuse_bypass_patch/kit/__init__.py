"""Test kit: tiny real ComfyUI models, random LoRAs and bypass-vs-merged comparisons.

Used by ``check``, the tests and the benchmarks; never by the runtime path (nothing that
ComfyUI loads at start-up imports it). One module per job, imports pointing one way:

* ``comfyui``: make a ComfyUI tree importable as ``comfy`` (CPU mode);
* ``models``: tiny models of every family, built by ComfyUI's own classes, and their inputs;
* ``loras``: random LoRAs in every naming convention, from ComfyUI's own key map;
* ``compare``: run a model as ComfyUI does, bypass vs merged (uses ``models``);
* ``gguf``: tiny GGUF models loaded by ComfyUI-GGUF (imported on its own: it needs ``gguf``).

``from freefuse_bypass_patch import kit`` gives all of it under one name.
"""

from .comfyui import default_comfyui, load_custom_node, quiet_logging, start_quietly, use_comfyui
from .compare import (LogCapture, chain, compare, direct_hook_vs_merged, forward, manager_bypass, max_rel_diff,
                      weights_snapshot, with_layout)
from .loras import (CONVENTIONS, family_lora, key_forms, load_lora_file, lora_targets, make_lora, named_targets,
                    random_lora, save_lora)
from .models import (FAMILIES, FLUX_1, MODELS, RELEASED, SLICED, TINY_FLUX, TINY_SDXL, available, build_model,
                     detectable_flux_state_dict, flux_config, flux_inputs, random_patcher, randomize_, released_config,
                     sdxl_inputs, tiny_config, tiny_flux, tiny_inputs, tiny_model, tiny_sdxl)

__all__ = [
    "use_comfyui", "default_comfyui", "start_quietly", "quiet_logging", "load_custom_node",
    "TINY_FLUX", "FAMILIES", "SLICED", "tiny_flux", "random_patcher", "randomize_", "flux_inputs", "available",
    "tiny_model", "tiny_inputs", "tiny_config", "FLUX_1", "RELEASED", "flux_config", "released_config", "build_model",
    "detectable_flux_state_dict", "MODELS", "TINY_SDXL", "tiny_sdxl", "sdxl_inputs",
    "CONVENTIONS", "lora_targets", "named_targets", "make_lora", "random_lora", "family_lora", "save_lora",
    "load_lora_file", "key_forms",
    "forward", "manager_bypass", "LogCapture", "weights_snapshot", "max_rel_diff", "chain", "compare",
    "direct_hook_vs_merged", "with_layout",
]
