"""Test setup: one real ComfyUI tree per pytest process, named by COMFYUI_PATH.

tests/run_matrix.py runs this suite once per pinned tree. The tree is put first on
sys.path and into CPU mode before anything imports ``comfy``.
"""

import importlib.util
import os
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
PLACEHOLDERS = os.path.join(HERE, "placeholders")

TREE = os.environ.get("COMFYUI_PATH")


def pytest_configure(config):
    if not TREE or not os.path.isdir(os.path.join(TREE, "comfy")):
        pytest.exit("COMFYUI_PATH must name a ComfyUI tree (use: python tests/run_matrix.py)", returncode=4)


def _python_path():
    """The repo, plus the torchvision placeholder where no real torchvision imports."""
    parts = [ROOT]
    if importlib.util.find_spec("torchvision") is None:
        parts.append(PLACEHOLDERS)
    return parts


os.environ.setdefault("PYTHONDONTWRITEBYTECODE", "1")  # never write into the ComfyUI tree
sys.dont_write_bytecode = True
if TREE:
    extra = _python_path()
    for p in reversed(extra):
        if p not in sys.path:
            sys.path.insert(0, p)
    os.environ["PYTHONPATH"] = os.pathsep.join(extra + [os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)

    from freefuse_bypass_patch import kit

    kit.use_comfyui(TREE)
