"""Making a ComfyUI tree importable as ``comfy`` in this process (CPU mode by default).

Each tree owns the top-level ``comfy`` package, so one process can use one tree; the
tests, the check and the benchmarks all start here.
"""

from __future__ import annotations

import logging
import os
import sys
import tempfile
from typing import Optional, Tuple


def use_comfyui(path: Optional[str], cpu: bool = True) -> None:
    """Make the ComfyUI tree at ``path`` importable as ``comfy`` (in CPU mode unless ``cpu=False``).

    The pip-installable fork (0.12.1) parses ``sys.argv`` and ``COMFYUI_*`` variables when
    it is first imported and writes its user folders under the working directory, so for
    it the command line is cleared and the process moves to a temporary directory.
    """
    _placeholder_torchvision()
    if path:
        path = os.path.abspath(path)
        if path not in sys.path:
            sys.path.insert(0, path)
        if os.path.isdir(os.path.join(path, "comfy", "cmd")):
            sys.argv = sys.argv[:1]
            scratch = tempfile.mkdtemp(prefix="ffbp_comfyui_")
            os.chdir(scratch)
            os.environ.setdefault("XDG_DATA_HOME", os.path.join(scratch, "data"))
            os.environ.setdefault("XDG_CACHE_HOME", os.path.join(scratch, "cache"))
    if cpu:
        os.environ.setdefault("COMFYUI_CPU", "true")
    import comfy.cli_args

    args = getattr(comfy.cli_args, "args", None)
    if cpu and args is not None and hasattr(args, "cpu"):
        args.cpu = True


def load_custom_node(folder: str) -> Tuple[int, bool]:
    """(nodes registered, loaded without error): ``folder`` loaded by the running tree's own
    custom-node loader, as ComfyUI loads ``custom_nodes/*`` at start-up."""
    import asyncio

    import comfy

    if os.path.isdir(os.path.join(list(comfy.__path__)[0], "cmd")):
        # the pip-installable fork: its vanilla importer logs an import error instead of returning one
        from comfy.nodes import vanilla_node_importing
        from comfy_compatibility.vanilla import prepare_vanilla_environment

        from .compare import LogCapture

        prepare_vanilla_environment()
        with LogCapture() as logs:
            exported = vanilla_node_importing._vanilla_load_custom_nodes_1(folder)
        return len(exported.NODE_CLASS_MAPPINGS), not any(r.levelno >= logging.ERROR for r in logs.records)
    import nodes

    before = len(nodes.NODE_CLASS_MAPPINGS)
    loaded = nodes.load_custom_node(folder)
    if asyncio.iscoroutine(loaded):
        loaded = asyncio.run(loaded)
    return len(nodes.NODE_CLASS_MAPPINGS) - before, bool(loaded)


def default_comfyui() -> Optional[str]:
    """The tree the commands use without ``--comfyui`` (order: :func:`.trees.find_comfyui`)."""
    from .trees import find_comfyui

    return find_comfyui()[0]


def start_quietly(path: Optional[str]) -> Optional[str]:
    """For the commands: use ``path`` (or the default tree) with ComfyUI's logging down to errors.

    Returns the tree, or None after saying that none was found.
    """
    path = path or default_comfyui()
    if path is None:
        print("no ComfyUI found: pass --comfyui PATH (or set COMFYUI_PATH)")
        return None
    use_comfyui(path)
    quiet_logging()
    return path


def quiet_logging() -> None:
    """Log handlers down to errors: ComfyUI is chatty; the commands count what matters."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    for handler in logging.getLogger().handlers:
        handler.setLevel(logging.ERROR)


def _placeholder_torchvision() -> None:
    """Beside CPU torch no torchvision loads; use the repo's test placeholder if there is one."""
    import importlib.util

    if importlib.util.find_spec("torchvision") is not None:
        return
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    here = os.path.join(repo, "tests", "placeholders")
    if os.path.isdir(here):
        sys.path.insert(1, here)
        print("(no torchvision installed: using the placeholder in %s)" % here)
