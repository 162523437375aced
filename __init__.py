"""ComfyUI custom node: this repository, cloned into ``ComfyUI/custom_nodes/<any folder name>``.

ComfyUI's loader imports this file under a name of its own (the folder's path in upstream
ComfyUI, the folder's bare name in the pip-installable fork), never as the package beside
it. So this file imports that package under its real name, ``freefuse_bypass_patch``, once:
a copy already imported (pip install + ``enable``, or another custom node) is kept, else
the one in this folder is loaded. Importing it patches ComfyUI. No nodes; never raises. If
``pip install -r requirements.txt`` was never run here (wrapt missing), it says so once, at
WARNING, with the command that fixes it, and patches nothing.
"""

import importlib
import importlib.util
import logging
import os
import re
import sys

NODE_CLASS_MAPPINGS = {}
NODE_DISPLAY_NAME_MAPPINGS = {}

_PACKAGE = "freefuse_bypass_patch"
_HERE = os.path.dirname(os.path.abspath(__file__))
_log = logging.getLogger(_PACKAGE)


def _missing_requirements():
    """What requirements.txt names (wrapt) that this Python cannot import: a clone whose
    requirements were never installed. The names are import names too."""
    try:
        with open(os.path.join(_HERE, "requirements.txt"), encoding="utf-8") as f:
            lines = f.read().splitlines()
    except OSError:
        return []
    missing = []
    for line in lines:
        name = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", line.split("#", 1)[0])
        if name is None:
            continue
        try:
            importlib.import_module(name.group(1).lower().replace("-", "_"))
        except ImportError:
            missing.append(name.group(1))
    return missing


def _say_what_to_install(missing):
    """One WARNING per process (this file may be imported under two names) naming the fix."""
    if getattr(_log, "_freefuse_missing_reported", False):
        return
    _log._freefuse_missing_reported = True
    _log.warning("[freefuse_bypass_patch] not loaded: %s not installed in this Python (%s); bypass LoRAs stay "
                 "as stock ComfyUI applies them. To fix it, run: %s -m pip install -r %s (or let "
                 "ComfyUI-Manager install this node's requirements), then restart ComfyUI.",
                 " and ".join(missing), sys.executable, sys.executable, os.path.join(_HERE, "requirements.txt"))


def _import_package():
    current = sys.modules.get(_PACKAGE)
    if current is not None and current is not sys.modules.get(__name__):
        return current
    # The fork registers this very file as ``freefuse_bypass_patch`` when the folder has that
    # name, replacing a copy imported before; that copy's modules (and its state) are still
    # loaded, so its package is rebuilt from its own folder, not from ours.
    earlier = sys.modules.get(_PACKAGE + ".patching")
    here = os.path.join(_HERE, _PACKAGE)
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
    _missing = _missing_requirements()
    if _missing:
        _say_what_to_install(_missing)
    else:
        _import_package()
except Exception as _err:  # the plugin must never stop ComfyUI from starting
    _log.warning("[freefuse_bypass_patch] not loaded: %s: %s", type(_err).__name__, _err)
