"""ComfyUI custom node: this repository, cloned into ``ComfyUI/custom_nodes/<any folder name>``.

ComfyUI's loader imports this file under a name of its own (the folder's path in upstream
ComfyUI, the folder's bare name in the pip-installable fork), never as the package beside
it. So this file imports that package under its real name, ``freefuse_bypass_patch``, once:
a copy already imported (pip install + ``enable``, or another custom node) is kept, else
the one in this folder is loaded. Importing it patches ComfyUI. No nodes; never raises.
"""

import importlib.util
import logging
import os
import sys

NODE_CLASS_MAPPINGS = {}
NODE_DISPLAY_NAME_MAPPINGS = {}

_PACKAGE = "freefuse_bypass_patch"


def _import_package():
    current = sys.modules.get(_PACKAGE)
    if current is not None and current is not sys.modules.get(__name__):
        return current
    # The fork registers this very file as ``freefuse_bypass_patch`` when the folder has that
    # name, replacing a copy imported before; that copy's modules (and its state) are still
    # loaded, so its package is rebuilt from its own folder, not from ours.
    earlier = sys.modules.get(_PACKAGE + ".patching")
    here = os.path.join(os.path.dirname(os.path.abspath(__file__)), _PACKAGE)
    folder = os.path.dirname(earlier.__file__) if earlier is not None else here
    spec = importlib.util.spec_from_file_location(_PACKAGE, os.path.join(folder, "__init__.py"),
                                                  submodule_search_locations=[folder])
    module = importlib.util.module_from_spec(spec)
    sys.modules[_PACKAGE] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        if current is None:
            del sys.modules[_PACKAGE]
        else:
            sys.modules[_PACKAGE] = current
        raise
    return module


try:
    _import_package()
except Exception as _err:  # the plugin must never stop ComfyUI from starting
    logging.getLogger(_PACKAGE).warning("[freefuse_bypass_patch] not loaded: %s: %s", type(_err).__name__, _err)
