"""The version is written once, in pyproject.toml, where the Comfy Registry reads it.

A source tree or a clone in ``custom_nodes`` has that file beside the package; a pip
install carries it in its metadata. Read only when ``__version__`` is asked for, so that
importing the plugin (in every interpreter, once ``enable`` has run) costs no file access.
"""

import functools
import os
import re

DIST = "freefuse_bypass_patch"


@functools.lru_cache(maxsize=None)
def version() -> str:
    pyproject = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "pyproject.toml")
    try:
        with open(pyproject, encoding="utf-8") as f:
            project = project_table(f.read())
        if project.get("name") == DIST and project.get("version"):
            return project["version"]
    except OSError:
        pass
    try:
        from importlib.metadata import version as installed

        return installed(DIST)
    except Exception:  # neither a source tree nor installed (a copied package folder)
        return "unknown"


def project_table(text: str) -> dict:
    """``name`` and ``version`` of the ``[project]`` table (our own file; Python 3.10 has no TOML parser)."""
    body = re.search(r"^\[project\][ \t]*\n(.*?)(?=^\[|\Z)", text, re.M | re.S)
    return dict(re.findall(r'^(name|version)\s*=\s*"([^"]*)"', body.group(1) if body else "", re.M))
