"""``enable``/``disable``: one .pth file that activates the plugin in every interpreter of an environment.

At start-up Python runs the ``import`` lines of the .pth files in site-packages. Ours
imports the package, which only registers a post-import hook on ``comfy.sd`` (no torch, no
comfy, never raises; ``FREEFUSE_BYPASS_PATCH_DISABLE`` still switches it off): the patch is
applied when ComfyUI imports ``comfy.sd``, as OpenTelemetry's auto-instrumentation does. The
line does nothing once the package is uninstalled. A file without our marker is never
changed.
"""

from __future__ import annotations

import os
import sysconfig
from typing import Optional

PTH_NAME = "freefuse_bypass_patch-autoactivate.pth"
MARKER = "# freefuse_bypass_patch autoactivate: written by `python -m freefuse_bypass_patch enable`"
CONTENT = (MARKER + ", removed by `disable`\n"
           'import importlib.util as _u; _u.find_spec("freefuse_bypass_patch") and __import__("freefuse_bypass_patch")\n')


class ForeignFile(Exception):
    """A file of our name that this plugin did not write."""


def site_packages(override: Optional[str] = None) -> str:
    """The running environment's site-packages (``override`` for tests and unusual layouts)."""
    return os.path.abspath(override or sysconfig.get_paths()["purelib"])


def pth_path(site: Optional[str] = None) -> str:
    return os.path.join(site_packages(site), PTH_NAME)


def state(site: Optional[str] = None) -> str:
    """"enabled", "disabled" or "foreign" (a file of our name that we did not write)."""
    path = pth_path(site)
    if not os.path.lexists(path):
        return "disabled"
    return "enabled" if _ours(path) else "foreign"


def enable(site: Optional[str] = None) -> str:
    """Write the .pth file (again, if it is ours); returns its path."""
    path = pth_path(site)
    if os.path.lexists(path) and not _ours(path):
        raise ForeignFile(path)
    with open(path, "w", encoding="utf-8") as f:
        f.write(CONTENT)
    return path


def disable(site: Optional[str] = None) -> Optional[str]:
    """Remove the .pth file if it is ours; returns its path, or None if there was none."""
    path = pth_path(site)
    if not os.path.lexists(path):
        return None
    if not _ours(path):
        raise ForeignFile(path)
    os.remove(path)
    return path


def _ours(path: str) -> bool:
    try:
        with open(path, encoding="utf-8") as f:
            return f.readline().startswith(MARKER)
    except (OSError, UnicodeDecodeError):
        return False
