"""Copies for tests that need to write: the repository as ``git clone`` lays it out, a ComfyUI tree.

The ComfyUI trees and the checkout are read-only to the tests: loading the repository as a
custom node, building it with pip, or starting a ComfyUI server happens on such a copy in a
temporary folder.
"""

import os
import shutil
import subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SKIP = {".git", ".venv", "__pycache__", "build", "dist"}


def repository_files():
    """What a clone holds: the tracked files, plus new files git does not ignore."""
    try:
        out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"], cwd=ROOT,
                             capture_output=True, text=True, check=True).stdout
        names = [n for n in out.split("\0") if n]
    except (OSError, subprocess.CalledProcessError):  # not a git checkout: the tree minus build output
        names = []
        for folder, dirs, files in os.walk(ROOT):
            dirs[:] = [d for d in dirs if d not in SKIP and not d.endswith(".egg-info")]
            names += [os.path.relpath(os.path.join(folder, f), ROOT) for f in files if not f.endswith(".pyc")]
    return sorted(n for n in names if os.path.isfile(os.path.join(ROOT, n)))


def copy_repository(dest):
    for name in repository_files():
        target = os.path.join(dest, name)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        shutil.copy2(os.path.join(ROOT, name), target)
    return dest


def copy_comfyui(tree, dest):
    """A writable copy of the ComfyUI tree ``tree`` at ``dest`` (its tests and caches left out)."""
    skip = shutil.ignore_patterns(".git", "__pycache__", "*.pyc", "tests", "tests-unit")
    shutil.copytree(tree, dest, ignore=skip, copy_function=shutil.copyfile)
    for folder, _, _ in os.walk(dest):  # copytree keeps the read-only folders' modes
        os.chmod(folder, 0o755)
    return str(dest)
