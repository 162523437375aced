"""Dry run for one LoRA file: how its keys map, what stock bypass would drop, what we apply.

Works without any model file: the key map comes from a tiny model of the named family built
by ComfyUI's own classes (Flux at its real depth of 19 + 38 blocks, so every block of a
real Flux LoRA finds its key; other families at the tiny depth of ``kit.models``, so keys of
deeper blocks show up as "not matched").
"""

from __future__ import annotations

import collections
from typing import Dict

import torch

from .kit import LogCapture, key_forms, tiny_flux, tiny_model
from .manager import FusedBypassManager

FLUX_DEV_DEPTH = dict(depth=19, depth_single_blocks=38)


def key_map_model(family: str):
    if family == "flux":
        return tiny_flux(**FLUX_DEV_DEPTH)
    return tiny_model(family)


def diagnose(model, lora: Dict[str, torch.Tensor], capabilities=None) -> dict:
    """Counts for ``lora`` on ``model`` (a BaseModel); see print_diagnosis for their meaning."""
    import comfy.lora
    import comfy.lora_convert
    from comfy.weight_adapter import WeightAdapterBase

    key_map = comfy.lora.model_lora_keys_unet(model, {})
    with LogCapture() as logs:
        loaded = comfy.lora.load_lora(comfy.lora_convert.convert_lora(dict(lora)), key_map)
    adapters = {k: v for k, v in loaded.items() if isinstance(v, WeightAdapterBase)}
    manager = FusedBypassManager()
    for key, adapter in adapters.items():
        try:
            manager.add_adapter(key, adapter)
        except ValueError:
            pass
    with LogCapture():
        hooks = manager.create_hooks(model)  # what the plugin would build; nothing is attached
    factored = collections.Counter(cls.__name__[: -len("Form")] for h in hooks for _, cls in h.form_slots)
    transient = sum(len(group) for h in hooks for group in h.transient_groups)
    tuple_keys = [k for k in adapters if isinstance(k, tuple)]
    function_keys = [k for k in tuple_keys if len(k) > 2 and k[2] is not None]
    native_offsets = bool(capabilities and capabilities.native_offsets)
    has_bypass = bool(capabilities and capabilities.bypass_module)
    return dict(
        tensors=len(lora),
        patches=len(loaded),
        forms=key_forms(loaded),
        not_matched=logs.count("lora key not loaded"),
        adapter_types=collections.Counter(type(a).__name__ for a in adapters.values()),
        regular=len(loaded) - len(adapters),
        stock_has_bypass=has_bypass,
        stock_drops=0 if native_offsets else len(tuple_keys),
        stock_ignores_function=len(function_keys) if native_offsets else 0,
        plugin_adapters=sum(factored.values()) + transient,
        plugin_modules=len(hooks),
        plugin_factored=factored,
        plugin_transient=transient,
    )


def print_diagnosis(name: str, family: str, d: dict, version: str) -> None:
    f = d["forms"]
    print("LoRA %s on a %s key map (ComfyUI %s): %d tensors -> %d patches" % (name, family, version, d["tensors"],
                                                                            d["patches"]))
    print("  whole weights %d, fused slices %d, diff functions %d; tensors not matched: %d"
          % (f["whole"], f["slice"], f["function"], d["not_matched"]))
    print("  adapter types: %s; regular patches (diff/set, merged as stock does): %d"
          % (", ".join("%s %d" % kv for kv in sorted(d["adapter_types"].items())) or "none", d["regular"]))
    if not d["stock_has_bypass"]:
        print("stock bypass: this ComfyUI has none (the plugin stays inert)")
    elif d["stock_ignores_function"]:
        print("stock bypass: applies the slices but ignores %d diff function(s)" % d["stock_ignores_function"])
    else:
        print("stock bypass: drops %d adapter(s) (every fused-slice or diff-function key)" % d["stock_drops"])
    factored = d["plugin_factored"]
    print("plugin: applies %d adapter(s) on %d module(s): %d in factored form (%s), %d as a transient delta "
          "from ComfyUI's merge code" % (d["plugin_adapters"], d["plugin_modules"], sum(factored.values()),
                                         ", ".join("%s %d" % kv for kv in sorted(factored.items())) or "none",
                                         d["plugin_transient"]))
