"""wrapt wrappers for ComfyUI's bypass entry points.

``comfy.sd.load_bypass_lora_for_models`` gets our body (:mod:`.loader`). The methods of
``BypassInjectionManager`` (used directly by ComfyUI's trainer and by other plugins) keep
the stock bookkeeping for plain keys and also record every adapter, in any key form, in a
:class:`~.manager.FusedBypassManager` that builds the hooks. The only case left to the
stock hook is the one it gets right and ours would change: trainable adapters, one per
module, on whole weights (ComfyUI's trainer).
"""

from __future__ import annotations

from . import unhooked
from .slots import is_trainable
from .loader import load_bypass_lora_for_models as _load_bypass_lora
from .loader import name_bypass_left_out
from .manager import FusedBypassManager

_OURS = "_freefuse_bypass_manager"


def _ours(instance) -> FusedBypassManager:
    manager = instance.__dict__.get(_OURS)
    if manager is None:
        manager = instance.__dict__[_OURS] = FusedBypassManager()
    return manager


def load_bypass_lora_for_models(wrapped, instance, args, kwargs):
    return _load_bypass_lora(*args, **kwargs)


def _add_args(key, adapter, strength=1.0, offset=None):
    return key, adapter, strength, offset


def manager_add_adapter(wrapped, instance, args, kwargs):
    key, adapter, strength, offset = _add_args(*args, **kwargs)
    _ours(instance).add_adapter(key, adapter, strength, offset)
    if isinstance(key, str) and offset is None:
        return wrapped(*args, **kwargs)  # stock bookkeeping (``adapters``) for plain keys
    return None


def _stock_handles(manager: FusedBypassManager) -> bool:
    slots = manager.slots
    plain = all(s.target.offset is None and s.target.function is None for s in slots)
    one_each = len({s.target.module_path for s in slots}) == len(slots)
    return bool(slots) and plain and one_each and all(is_trainable(s.adapter) for s in slots)


def manager_create_injections(wrapped, instance, args, kwargs):
    manager = _ours(instance)
    if _stock_handles(manager):
        return wrapped(*args, **kwargs)
    model = args[0] if args else kwargs["model"]
    injections = manager.create_injections(model)
    instance.hooks = list(manager.hooks)  # stock get_hook_count() and offload() read this
    return injections


def manager_offload(wrapped, instance, args, kwargs):
    """Upstream's ON_DETACH callback (after 0.33): ours when our hooks serve this manager."""
    manager = instance.__dict__.get(_OURS)
    if manager is not None and manager.hooks and instance.hooks == manager.hooks:
        return manager.offload(*args, **kwargs)
    return wrapped(*args, **kwargs)


def manager_clear_adapters(wrapped, instance, args, kwargs):
    _ours(instance).clear_adapters()
    return wrapped(*args, **kwargs)


def linear_input_act(wrapped, instance, args, kwargs):
    return unhooked.linear_input_act(wrapped, *args, **kwargs)


def get_key_patches(wrapped, instance, args, kwargs):
    """A model's weights and patches (what model merges add to another model): its bypass LoRAs
    are hooks, not among them; named once per patcher."""
    result = wrapped(*args, **kwargs)
    name_bypass_left_out(instance)
    return result
