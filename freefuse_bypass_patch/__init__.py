"""freefuse_bypass_patch: ComfyUI bypass LoRA that gives the merged result on fused weights.

Importing this package patches ComfyUI (now, or when ``comfy.sd`` is imported), unless
``FREEFUSE_BYPASS_PATCH_DISABLE=1``. The repository root is the ComfyUI custom node (its
``__init__.py`` imports this package); no nodes are registered. Import never raises.
"""

import logging as _logging
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # what __getattr__ gives, for type checkers and editors
    from .masks import LoraMaskError, lora_masks, lora_text_masks, set_lora_masks, with_lora_masks
    from .names import bypass_loras, lora_name
    from .switch import loras_enabled, set_loras_enabled, with_loras_enabled

NODE_CLASS_MAPPINGS: dict = {}
NODE_DISPLAY_NAME_MAPPINGS: dict = {}

try:
    from .patching import capabilities, install, is_patched, uninstall
except Exception as _err:  # a broken environment must not stop ComfyUI from starting
    _logging.getLogger(__name__).warning("[freefuse_bypass_patch] not loaded: %s: %s", type(_err).__name__, _err)
else:
    try:
        install()
    except Exception as _err:
        _logging.getLogger(__name__).warning("[freefuse_bypass_patch] not installed: %s: %s", type(_err).__name__, _err)

# The regional-LoRA API (see README "Regional LoRAs"): name -> the module that defines it.
_MASK_API = {
    "bypass_loras": "names", "lora_name": "names",
    "with_lora_masks": "masks", "set_lora_masks": "masks", "lora_masks": "masks", "lora_text_masks": "masks",
    "LoraMaskError": "masks",
    "with_loras_enabled": "switch", "set_loras_enabled": "switch", "loras_enabled": "switch",
}


def __getattr__(name):
    """``__version__`` and the regional-LoRA API, on first use: importing the package
    (sitecustomize, the ``enable`` .pth) stays light."""
    if name == "__version__":  # from pyproject.toml (see _version.py)
        from ._version import version

        return version()
    if name in _MASK_API:
        import importlib

        return getattr(importlib.import_module("." + _MASK_API[name], __name__), name)
    raise AttributeError("module %r has no attribute %r" % (__name__, name))


__all__ = ["install", "uninstall", "is_patched", "capabilities", *_MASK_API, "NODE_CLASS_MAPPINGS", "__version__"]
