"""Shared test helpers (the ComfyUI tree is already on sys.path, see conftest.py)."""

import importlib.util
import json
import os
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
# The test environment's PYTHONPATH (conftest.py) without the checkout: what a process that must
# import the plugin from elsewhere (a clone in custom_nodes) gets (e.g. the torchvision stand-in).
PATH_WITHOUT_CHECKOUT = os.pathsep.join(p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep)
                                        if p and os.path.abspath(p) != ROOT)
TREE = os.environ.get("COMFYUI_PATH", "")
HAS_BYPASS = importlib.util.find_spec("comfy.weight_adapter.bypass") is not None

bypass_era = pytest.mark.skipif(not HAS_BYPASS, reason="ComfyUI before 0.11 has no bypass mode (see test_inert.py)")
pre_bypass = pytest.mark.skipif(HAS_BYPASS, reason="only for ComfyUI without bypass mode")

# fp32 tolerance: bypass computes W x + s*B(A x), merged computes (W + s*B A) x; the two
# differ only by fp32 rounding of a few accumulations (~1e-7 relative measured).
REL_TOL = 1e-5


def run_python(args, env=None, timeout=600, cwd=HERE):
    """Run ``python ARGS`` in a fresh process with the test environment; return CompletedProcess."""
    full_env = dict(os.environ)
    full_env.update(env or {})
    return subprocess.run([sys.executable] + list(args), capture_output=True, text=True, env=full_env,
                          timeout=timeout, cwd=cwd)


def scenario(activation, env=None, pre_args=(), args=()):
    proc = run_python(list(pre_args) + [os.path.join(HERE, "scenario.py"), activation, TREE] + list(args), env=env)
    for line in proc.stdout.splitlines():
        if line.startswith("SCENARIO "):
            return json.loads(line[len("SCENARIO "):]), proc
    raise AssertionError("scenario %s failed (rc=%s):\n%s\n%s" % (activation, proc.returncode,
                                                                  proc.stdout[-3000:], proc.stderr[-6000:]))
