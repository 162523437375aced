"""Shared test helpers (the ComfyUI tree is already on sys.path, see conftest.py)."""

import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch

from freefuse_bypass_patch import kit

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


def adapter_factors(kind, rows, cols, gen, rank=4):
    r = lambda *shape: torch.randn(*shape, generator=gen) * 0.2  # noqa: E731
    if kind == "lora":
        return {"lora_up.weight": r(rows, rank), "lora_down.weight": r(rank, cols), "alpha": torch.tensor(2.0)}
    if kind == "dora":
        return {"lora_up.weight": r(rows, rank), "lora_down.weight": r(rank, cols), "alpha": torch.tensor(4.0),
                "dora_scale": 1.0 + r(rows, 1)}
    if kind == "dora_in":  # DoRA on the input axis: one magnitude per input column
        return {"lora_up.weight": r(rows, rank), "lora_down.weight": r(rank, cols), "alpha": torch.tensor(4.0),
                "dora_scale": 1.0 + r(1, cols)}
    if kind == "loha":
        return {"hada_w1_a": 3 * r(rows, rank), "hada_w1_b": 3 * r(rank, cols), "hada_w2_a": 3 * r(rows, rank),
                "hada_w2_b": 3 * r(rank, cols), "alpha": torch.tensor(4.0)}
    if kind == "lokr":
        return {"lokr_w1": r(4, 4), "lokr_w2": r(rows // 4, cols // 4), "alpha": torch.tensor(1.0)}
    if kind == "glora":
        return {"a1.weight": r(cols, rank), "a2.weight": r(rank, cols), "b1.weight": r(rows, rank),
                "b2.weight": r(rank, cols), "alpha": torch.tensor(4.0)}
    if kind == "boft":
        return {"oft_blocks": r(2, rows // 16, 16, 16), "alpha": torch.tensor(1.0)}
    if kind == "oft":
        return {"oft_blocks": r(rows // 16, 16, 16) * 2, "alpha": torch.tensor(1.0)}
    raise ValueError(kind)


def adapter_lora(model, kind, convention, seed, limit=6):
    """An adapter of ``kind`` on the first ``limit`` targets (fused slices for diffusers names)."""
    gen = torch.Generator().manual_seed(seed)
    sd = {}
    targets = kit.lora_targets(model, convention)
    if convention != "kohya":  # diffusers-style names: keep the fused slices
        targets = [t for t in targets if isinstance(t[1], tuple) and t[1][1] is not None]
    for name, _, (rows, cols) in targets[:limit]:
        for suffix, tensor in adapter_factors(kind, rows, cols, gen).items():
            sd["%s.%s" % (name, suffix)] = tensor
    return sd
