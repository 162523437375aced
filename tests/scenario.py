"""One bypass-vs-merged scenario in a fresh process, activated one of three ways.

Run by tests/test_activation.py and tests/test_install.py: ``python tests/scenario.py
ACTIVATION COMFYUI_TREE [FOLDER_NAME [preloaded|nowrapt]]`` with ACTIVATION in {explicit,
sitecustomize, custom_nodes}; prints one JSON line. custom_nodes copies the repository, as
a clone lays it out, into ``custom_nodes/FOLDER_NAME`` of a temporary folder and loads it
with the tree's own loader (``preloaded``: after importing the package, as ``enable`` does;
``nowrapt``: in a Python where ``import wrapt`` fails, as before ``pip install -r
requirements.txt``; then only the load is reported). The plugin's
test kit is loaded from its folder under a name of its own, not as part of the package, so
that importing it does not activate the plugin (custom_nodes must be activated by ComfyUI's
own loader).
"""

import atexit
import importlib.abc
import importlib.machinery
import importlib.util
import json
import logging
import os
import shutil
import sys
import tempfile

import clone

HERE = os.path.dirname(os.path.abspath(__file__))
PKG = os.path.join(os.path.dirname(HERE), "freefuse_bypass_patch")
MARK = "_self_freefuse_bypass_patch"


def _scratch(prefix):
    path = tempfile.mkdtemp(prefix=prefix)
    atexit.register(shutil.rmtree, path, True)
    return path


class _NoWrapt(importlib.abc.MetaPathFinder):
    """``import wrapt`` fails as it does where wrapt is not installed."""

    def find_spec(self, name, path=None, target=None):
        if name == "wrapt" or name.startswith("wrapt."):
            raise ModuleNotFoundError("No module named %r" % name, name=name)
        return None


def _load_kit():
    """The kit as ``ffbp_scenario.kit``: its parent package stands for the plugin's folder but
    is never executed (the plugin's ``__init__`` would activate it); the runtime modules the
    kit imports relatively (``..loader``) load under that name, and activate nothing."""
    parent = importlib.util.module_from_spec(importlib.machinery.ModuleSpec("ffbp_scenario", None, is_package=True))
    parent.__path__ = [PKG]
    sys.modules[parent.__name__] = parent
    kit = os.path.join(PKG, "kit")
    spec = importlib.util.spec_from_file_location("ffbp_scenario.kit", os.path.join(kit, "__init__.py"),
                                                  submodule_search_locations=[kit])
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its modules import each other relatively
    spec.loader.exec_module(module)
    return module


def _activate(how, tree, extra):
    report = {"imported_before_comfy": "freefuse_bypass_patch" in sys.modules and "comfy.sd" not in sys.modules}
    sc = _load_kit()
    sc.use_comfyui(tree)
    import comfy.sd

    if how == "explicit":
        sys.path.insert(0, os.path.dirname(PKG))
        os.environ["FREEFUSE_BYPASS_PATCH_DISABLE"] = "1"
        import freefuse_bypass_patch as ffbp

        report["patched_when_disabled"] = ffbp.is_patched()
        report["install_when_disabled"] = ffbp.install()
        del os.environ["FREEFUSE_BYPASS_PATCH_DISABLE"]
        report["install"] = [ffbp.install(), ffbp.install()]
        wrapper = comfy.sd.load_bypass_lora_for_models
        ffbp.uninstall()
        report["unpatched_after_uninstall"] = not getattr(comfy.sd.load_bypass_lora_for_models, MARK, False)
        ffbp.uninstall()
        ffbp.install()
        report["single_wrapper"] = getattr(comfy.sd.load_bypass_lora_for_models.__wrapped__, MARK, False) is False
        report["rewrapped"] = comfy.sd.load_bypass_lora_for_models is not wrapper
    elif how == "custom_nodes":
        # the repository as `git clone` lays it out, in a custom_nodes folder of our own
        name, preloaded = extra[0], "preloaded" in extra[1:]
        node_dir = clone.copy_repository(os.path.join(_scratch("ffbp_cn_"), "custom_nodes", name))
        if preloaded:  # pip install + enable: the package is imported before ComfyUI loads custom nodes
            sys.path.insert(0, os.path.dirname(PKG))
            import freefuse_bypass_patch  # noqa: F401
        report["imported_before_loader"] = "freefuse_bypass_patch" in sys.modules
        with sc.LogCapture() as logs:
            report["nodes_added"], report["loader_result"] = sc.load_custom_node(node_dir)
        report["loader_warnings"] = [r.getMessage() for r in logs.records if r.levelno >= logging.WARNING]
        report["node_dir"] = node_dir
        if "nowrapt" in extra:
            report["modules"] = sorted(m for m in sys.modules if m.startswith("freefuse_bypass_patch"))
            report["patched"] = bool(getattr(getattr(comfy.sd, "load_bypass_lora_for_models", None), MARK, False))
            return sc, report
        import freefuse_bypass_patch as ffbp

        report["package_dir"] = os.path.dirname(ffbp.__file__)
        report["node_dir"], report["checkout"] = node_dir, os.path.dirname(PKG)
        report["copies"] = _loaded_copies()
        report["kit_loaded"] = sorted(m for m in sys.modules if m.startswith("freefuse_bypass_patch.kit"))
        report["api_patched"] = ffbp.is_patched()
        report["version"] = ffbp.__version__
    report["patched"] = bool(getattr(getattr(comfy.sd, "load_bypass_lora_for_models", None), MARK, False))
    return sc, report


def _loaded_copies():
    """The files of every loaded ``patching`` module of this plugin, under whatever module name."""
    suffix = os.path.join("freefuse_bypass_patch", "patching.py")
    files = [getattr(m, "__file__", None) or "" for m in list(sys.modules.values())]
    return sorted(f for f in files if f.endswith(suffix))


def main(how, tree, *extra):
    if "nowrapt" in extra:
        sys.meta_path.insert(0, _NoWrapt())
        try:
            sc, report = _activate(how, tree, extra)
        except ModuleNotFoundError as err:  # the tree itself imports wrapt (the 0.12.1 fork)
            if err.name != "wrapt":
                raise
            report = {"tree_needs_wrapt": True}
        print("SCENARIO " + json.dumps(report))
        return
    sc, report = _activate(how, tree, extra)
    import comfy.sd

    if not hasattr(comfy.sd, "load_bypass_lora_for_models"):  # before bypass mode: nothing to compare
        print("SCENARIO " + json.dumps(report))
        return
    probe = sc.tiny_flux().model
    diffusers1 = sc.make_lora(probe, "diffusers", rank=4, seed=1, alpha=4)
    diffusers2 = sc.make_lora(probe, "diffusers", rank=8, seed=2, alpha=4)
    kohya = sc.make_lora(probe, "kohya", rank=4, seed=3)
    path = os.path.join(_scratch("ffbp_lora_"), "character.safetensors")
    diffusers1 = sc.load_lora_file(sc.save_lora(diffusers1, path))

    report["single"] = sc.compare([(diffusers1, 1.0)])
    if how == "custom_nodes":  # how it was loaded is the point; chains are covered by the other two
        print("SCENARIO " + json.dumps(report))
        return
    report["chained"] = sc.compare([(diffusers1, 0.8), (diffusers2, 0.6), (kohya, 1.0)])
    report["zero"] = sc.compare([(diffusers1, 0.0)])

    # the first patcher of a chain keeps computing its own LoRA only
    base = sc.tiny_flux()
    inputs = sc.flux_inputs()
    first = comfy.sd.load_bypass_lora_for_models(base, None, diffusers1, 1.0, 0)[0]
    comfy.sd.load_bypass_lora_for_models(first, None, diffusers2, 1.0, 0)
    merged_first = sc.forward(comfy.sd.load_lora_for_models(base, None, diffusers1, 1.0, 0)[0], inputs)
    report["first_after_chain"] = sc.max_rel_diff(sc.forward(first, inputs), merged_first)
    report["hooks_left"] = sum(1 for m in base.model.modules() if "_freefuse_bypass_hook" in m.__dict__
                               or "forward" in m.__dict__)
    print("SCENARIO " + json.dumps(report))


if __name__ == "__main__":
    main(*sys.argv[1:])
