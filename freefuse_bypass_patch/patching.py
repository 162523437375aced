"""Installing and removing the wrappers, guarded by what the running ComfyUI can do.

Guards test capabilities, never version strings:

* no ``comfy.weight_adapter.bypass`` (ComfyUI before 0.11)      -> inert, one INFO line;
* ``load_bypass_lora_for_models`` or ``BypassInjectionManager`` missing, or with a
  signature we do not know                                     -> inert, one WARNING;
* the running ComfyUI already takes slice offsets / stacks adapters (the 0.14.1 fork)
  -> still one implementation runs (ours replaces the stock body; nothing is applied twice)
  and adapters the fork put on a patcher are carried over;
* ``comfy.ops.linear_input_act`` (0.30+), which runs an INT8 Linear without calling it, is
  wrapped only where it exists with the signature we know.

Activation goes through wrapt's post-import hooks, so ``install()`` works before or after
``comfy`` is imported. Nothing here raises into the importer.
"""

from __future__ import annotations

import importlib
import inspect
import logging
import os
import sys
from dataclasses import dataclass, field
from typing import List, Optional

import wrapt

log = logging.getLogger(__name__)

DISABLE_ENV = "FREEFUSE_BYPASS_PATCH_DISABLE"
MARK = "_self_freefuse_bypass_patch"  # wrapt keeps ``_self_*`` attributes on the wrapper itself
LOADER_PARAMS = ("model", "clip", "lora", "strength_model", "strength_clip")
MANAGER_METHODS = ("add_adapter", "create_injections", "clear_adapters")
OPTIONAL_MANAGER_METHODS = ("offload",)  # wrapped where the running ComfyUI has them (upstream after 0.33)
INPUT_ACT_PARAMS = ("linear", "x", "input_act")


@dataclass
class Capabilities:
    """What the running ComfyUI offers, as far as this plugin cares."""

    comfyui_version: str = "unknown"
    bypass_module: bool = False
    loader_known: bool = False
    manager_known: bool = False
    native_offsets: bool = False  # add_adapter(..., offset=) exists (0.14.1 fork)
    native_stacking: bool = False  # one hook holds several adapters (0.14.1 fork)
    native_chaining: bool = False  # loader shares a manager through an attachment (0.14.1 fork)
    input_act_linear: bool = False  # comfy.ops.linear_input_act computes without calling the module (0.30+)
    problems: List[str] = field(default_factory=list)

    @property
    def patchable(self) -> bool:
        return self.bypass_module and self.loader_known and self.manager_known


@dataclass
class _State:
    wanted: bool = False
    hook_registered: bool = False
    capabilities: Optional[Capabilities] = None
    reported: bool = False


_state = _State()


def disabled_by_env() -> bool:
    return os.environ.get(DISABLE_ENV, "").strip().lower() not in ("", "0", "false", "no", "off")


def comfyui_version() -> str:
    """The running ComfyUI's version: upstream's ``comfyui_version`` module, or the pip fork's
    ``comfy.__version__`` (0.12.1 keeps it there), or the installed distribution's."""
    for name in ("comfyui_version", "comfy.comfyui_version", "comfy.cmd.comfyui_version", "comfy"):
        mod = sys.modules.get(name)
        if mod is None:
            try:
                mod = importlib.import_module(name)
            except Exception:
                continue
        version = getattr(mod, "__version__", None)
        if version:
            return str(version)
    try:
        from importlib.metadata import version

        return version("comfyui")
    except Exception:
        return "unknown"


def _original(obj):
    """The function under our wrapper, if it is ours."""
    return obj.__wrapped__ if getattr(obj, MARK, False) else obj


def detect(sd_module) -> Capabilities:
    caps = Capabilities(comfyui_version=comfyui_version())
    try:
        bypass = importlib.import_module("comfy.weight_adapter.bypass")
    except ImportError:
        return caps
    caps.bypass_module = True

    loader = getattr(sd_module, "load_bypass_lora_for_models", None)
    if loader is None:
        caps.problems.append("comfy.sd.load_bypass_lora_for_models is missing")
    else:
        params = tuple(inspect.signature(_original(loader)).parameters)
        if params[: len(LOADER_PARAMS)] != LOADER_PARAMS:
            caps.problems.append("comfy.sd.load_bypass_lora_for_models%s is not a signature we know"
                                 % (params,))
        else:
            caps.loader_known = True
            caps.native_chaining = "bypass_lora_manager" in _original(loader).__code__.co_consts

    manager = getattr(bypass, "BypassInjectionManager", None)
    if manager is None or not all(callable(getattr(manager, m, None)) for m in MANAGER_METHODS):
        caps.problems.append("comfy.weight_adapter.bypass.BypassInjectionManager (add_adapter, "
                             "create_injections, clear_adapters) is missing")
    else:
        add_params = inspect.signature(_original(manager.add_adapter)).parameters
        if tuple(add_params)[:3] != ("self", "key", "adapter"):
            caps.problems.append("BypassInjectionManager.add_adapter%s is not a signature we know"
                                 % (tuple(add_params),))
        else:
            caps.manager_known = True
            caps.native_offsets = "offset" in add_params
    hook = getattr(bypass, "BypassForwardHook", None)
    if hook is not None:
        caps.native_stacking = "adapter_entries" in inspect.signature(hook.__init__).parameters
    caps.input_act_linear = _input_act_linear(caps)
    return caps


def _input_act_linear(caps: Capabilities) -> bool:
    """Is there a ``comfy.ops.linear_input_act(linear, x, input_act)`` to wrap? Absent is normal (before
    0.30); present with another signature is a problem: INT8 layers it runs would lose their adapters."""
    try:
        ops = importlib.import_module("comfy.ops")
    except Exception:
        return False
    function = getattr(ops, "linear_input_act", None)
    if function is None:
        return False
    try:
        params = tuple(inspect.signature(_original(function)).parameters)
    except (TypeError, ValueError):
        params = ()
    if params[:len(INPUT_ACT_PARAMS)] != INPUT_ACT_PARAMS:
        caps.problems.append("comfy.ops.linear_input_act%s is not a signature we know: adapters on the layers "
                             "it runs without calling them (INT8) are not applied" % (params,))
        return False
    return True


def _wrap(owner, name: str, wrapper) -> None:
    current = getattr(owner, name)
    if getattr(current, MARK, False):
        return  # already ours (maybe from another copy of this package)
    wrapped = wrapt.FunctionWrapper(current, wrapper)
    setattr(wrapped, MARK, True)
    setattr(owner, name, wrapped)


def _unwrap(owner, name: str) -> None:
    current = owner.__dict__.get(name) if isinstance(owner, type) else getattr(owner, name, None)
    if current is not None and getattr(current, MARK, False):
        setattr(owner, name, current.__wrapped__)


def _apply(sd_module) -> None:
    """Wrap what the running ComfyUI has; called when comfy.sd is imported (or at once)."""
    caps = _state.capabilities = detect(sd_module)
    if not caps.bypass_module:
        _report_once(logging.INFO, "ComfyUI %s has no bypass mode (comfy.weight_adapter.bypass): "
                     "freefuse_bypass_patch stays inert" % caps.comfyui_version)
        return
    if not caps.patchable:
        _report_once(logging.WARNING, "freefuse_bypass_patch stays inert on ComfyUI %s: %s"
                     % (caps.comfyui_version, "; ".join(caps.problems)))
        return
    from . import wrappers

    bypass = importlib.import_module("comfy.weight_adapter.bypass")
    _wrap(sd_module, "load_bypass_lora_for_models", wrappers.load_bypass_lora_for_models)
    for method in MANAGER_METHODS + OPTIONAL_MANAGER_METHODS:
        if callable(getattr(bypass.BypassInjectionManager, method, None)):
            _wrap(bypass.BypassInjectionManager, method, getattr(wrappers, "manager_" + method))
    if caps.input_act_linear:
        _wrap(importlib.import_module("comfy.ops"), "linear_input_act", wrappers.linear_input_act)
    patcher_class = getattr(sys.modules.get("comfy.model_patcher"), "ModelPatcher", None)
    if callable(getattr(patcher_class, "get_key_patches", None)):  # model merges read a model through it
        _wrap(patcher_class, "get_key_patches", wrappers.get_key_patches)
    for problem in caps.problems:  # patchable: only what is left out (linear_input_act) can be here
        log.warning("[freefuse_bypass_patch] %s", problem)
    native = [n for n, v in (("slice offsets", caps.native_offsets), ("stacked adapters", caps.native_stacking),
                             ("shared-manager chaining", caps.native_chaining)) if v]
    _report_once(logging.INFO, "freefuse_bypass_patch active on ComfyUI %s%s" % (
        caps.comfyui_version,
        " (its own %s replaced by ours, not doubled)" % ", ".join(native) if native else ""))


def _report_once(level: int, message: str) -> None:
    if not _state.reported:
        _state.reported = True
        log.log(level, "[freefuse_bypass_patch] %s", message)


def _on_comfy_sd_import(module) -> None:
    if not _state.wanted:
        return
    try:
        _apply(module)
    except Exception as err:  # never break ComfyUI's start
        _report_once(logging.WARNING, "freefuse_bypass_patch stays inert: %s: %s" % (type(err).__name__, err))


def install() -> bool:
    """Patch ComfyUI now, or as soon as ``comfy.sd`` is imported. Idempotent.

    Returns False when the environment variable ``FREEFUSE_BYPASS_PATCH_DISABLE`` turns the
    plugin off; True otherwise (whether or not this ComfyUI needed the fix; see ``status()``).
    """
    if disabled_by_env():
        log.info("[freefuse_bypass_patch] disabled by %s", DISABLE_ENV)
        return False
    _state.wanted = True
    if not _state.hook_registered:
        _state.hook_registered = True
        wrapt.register_post_import_hook(_on_comfy_sd_import, "comfy.sd")  # fires now if imported
    elif "comfy.sd" in sys.modules:
        _on_comfy_sd_import(sys.modules["comfy.sd"])
    return True


def uninstall() -> None:
    """Restore the stock functions. Models already loaded keep the hooks they were given."""
    _state.wanted = False
    _state.reported = False
    sd_module = sys.modules.get("comfy.sd")
    if sd_module is not None:
        _unwrap(sd_module, "load_bypass_lora_for_models")
    bypass = sys.modules.get("comfy.weight_adapter.bypass")
    manager = getattr(bypass, "BypassInjectionManager", None)
    if manager is not None:
        for method in MANAGER_METHODS + OPTIONAL_MANAGER_METHODS:
            _unwrap(manager, method)
    ops = sys.modules.get("comfy.ops")
    if ops is not None:
        _unwrap(ops, "linear_input_act")
    patcher_class = getattr(sys.modules.get("comfy.model_patcher"), "ModelPatcher", None)
    if patcher_class is not None:
        _unwrap(patcher_class, "get_key_patches")


def is_patched() -> bool:
    """True when comfy.sd's loader is wrapped by this plugin (any copy of it)."""
    sd_module = sys.modules.get("comfy.sd")
    return bool(sd_module is not None and getattr(getattr(sd_module, "load_bypass_lora_for_models", None), MARK, False))


def capabilities() -> Optional[Capabilities]:
    return _state.capabilities
