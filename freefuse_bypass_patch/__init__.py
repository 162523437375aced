"""freefuse_bypass_patch: ComfyUI bypass LoRA that gives the merged result on fused weights.

Importing this package patches ComfyUI (now, or when ``comfy.sd`` is imported), unless
``FREEFUSE_BYPASS_PATCH_DISABLE=1``. The same folder works as a ComfyUI custom node: it
registers no nodes. Import never raises.
"""

import logging as _logging

__version__ = "0.1.0"

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

_MASK_API = ("bypass_loras", "with_lora_masks", "set_lora_masks", "lora_masks", "lora_name", "LoraMaskError")


def __getattr__(name):
    """The mask API, imported on first use: importing the package (sitecustomize, .pth) stays light."""
    if name in _MASK_API:
        from . import masks

        return getattr(masks, name)
    raise AttributeError("module %r has no attribute %r" % (__name__, name))


__all__ = ["install", "uninstall", "is_patched", "capabilities", "bypass_loras", "with_lora_masks",
           "set_lora_masks", "lora_masks", "lora_name", "LoraMaskError", "NODE_CLASS_MAPPINGS", "__version__"]
