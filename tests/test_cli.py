"""The README's first command, run as a user would, on the tree under test."""

import os
import re

import comfy.sd  # noqa: F401  (the plugin decides what this tree can do on this import)
import pytest

import clone
import freefuse_bypass_patch as ffbp
from freefuse_bypass_patch import kit as sc
from freefuse_bypass_patch.kit.trees import is_install, tree_version
from support import HAS_BYPASS, PATH_WITHOUT_CHECKOUT, ROOT, TREE, run_python

README_VERSION = "0.28.0"  # the README shows check's output on this tree


def _readme_sample(after):
    """The first code block after ``after`` in README.md."""
    text = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    block = text.split(after, 1)[1].split("```", 2)[1]
    return block.split("\n", 1)[1].rstrip("\n").splitlines()


def _printed(stdout):
    """check's lines after the tree it found (the one line that names a local path)."""
    return [line for line in stdout.splitlines() if not line.startswith(("(no torchvision", "ComfyUI "))]


def test_check_shows_stock_vs_patched():
    proc = run_python(["-m", "freefuse_bypass_patch", "check", "--comfyui", TREE])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    if HAS_BYPASS:
        assert "RESULT: bypass == merged" in proc.stdout
        patched = re.search(r"^patched\s+(\d+)\s+<(\S+)", proc.stdout, re.M)
        assert patched and int(patched.group(1)) == 0 and float(patched.group(2)) <= 1e-5, proc.stdout
    else:
        assert "RESULT: hook == merged" in proc.stdout and "stays inert" in proc.stdout
    if tree_version(TREE) == README_VERSION:  # the README's sample is this output, as printed
        assert _readme_sample("checks that this block is what `check` prints):") == _printed(proc.stdout), proc.stdout


@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_dry_run_of_a_lora_file(family, tmp_path):
    if not sc.available(family):
        pytest.skip("this ComfyUI cannot build %s" % family)
    lora = sc.family_lora(sc.tiny_model(family).model, family, rank=2)
    path = sc.save_lora(lora, str(tmp_path / "my_lora.safetensors"))
    proc = run_python(["-m", "freefuse_bypass_patch", "check", "--comfyui", TREE, "--lora", path, "--model", family])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    assert "LoRA my_lora.safetensors on a %s model" % family in out
    forms = re.search(r"whole weights (\d+), fused slices (\d+), diff functions (\d+); tensors not matched: (\d+)", out)
    assert forms, out
    whole, sliced, funcs, unmatched = map(int, forms.groups())
    assert sliced > 0 and unmatched == 0 and whole + sliced + funcs == len(lora) // 2
    applied = re.search(r"plugin: applies (\d+) of (\d+) adapter.*; refused (\d+)$", out, re.M)
    assert applied and list(map(int, applied.groups())) == [len(lora) // 2, len(lora) // 2, 0], out
    if HAS_BYPASS:
        native = ffbp.capabilities().native_offsets  # the 0.14.1 fork applies slices itself
        expected = ("applies the slices but ignores %d diff function" % funcs if native
                    else "drops %d adapter" % (sliced + funcs))
        assert "stock bypass: " + expected in out, out


def test_benchmark_runs_as_documented():
    """The README's benchmark command runs on a bare environment (no torchvision on the path)
    and prints its table, the masked rows with their ratio and the forward-hook traffic floor,
    for Flux, SDXL and Z-Image in one process. One short round: no timing is asserted."""
    if not HAS_BYPASS:
        pytest.skip("the benchmark compares bypass modes; this ComfyUI has none")
    script = os.path.join(ROOT, "benchmarks", "bypass_overhead.py")
    proc = run_python([script, "--comfyui", TREE, "--rounds", "1", "--iters", "1", "--modes", "plugin,naive",
                       "--masks", "--model", "flux,sdxl,zimage"],
                      env={"PYTHONPATH": ""})
    out = proc.stdout
    assert proc.returncode == 0, out[-3000:] + proc.stderr[-3000:]
    for mode in ("merged, 1 LoRA", "plugin, 1 LoRA", "plugin, 3 LoRAs", "naive hook, 3 LoRAs", "merged, 2 LoRAs",
                 "plugin, 2 LoRAs, masked", "naive masked hook, 2 LoRAs"):
        assert re.search(r"^%s(\s+\d+\.\d+){5}" % re.escape(mode), out, re.M), out
    assert not re.search(r"^stock bypass, kohya\s+\d", out, re.M), out  # --modes filtered its row out
    for model in ("flux", "sdxl", "zimage"):
        assert re.search(r"^masked / merged with 2 LoRAs \(%s\): \d+\.\d+x \(target <= 1\.12x: (PASS|MISS)\); "
                         r"fastest forwards: \d+\.\d+x$" % model, out, re.M), out
    assert re.search(r"^masked / merged with 2 LoRAs \(target <= 1\.12x\), median \(fastest forwards\): "
                     r"flux [\d.]+x \([\d.]+x\), sdxl [\d.]+x \([\d.]+x\), zimage [\d.]+x \([\d.]+x\)$", out, re.M), out
    floors = re.findall(r"traffic floor \(1 LoRA\): (\d+\.\d+) GB per forward", out)
    assert len(floors) == 3 and all(float(f) > 0 for f in floors), out


def test_commands_find_the_comfyui_around_a_clone(tmp_path):
    """Run from ComfyUI/custom_nodes/<clone>, check and status use that ComfyUI (no --comfyui, no
    $COMFYUI_PATH); $COMFYUI_PATH still comes first."""
    if not is_install(TREE):
        pytest.skip("%s has no main.py or comfy/cmd: not a ComfyUI install to look for" % TREE)
    comfyui = clone.copy_comfyui(TREE, tmp_path / "ComfyUI")
    node = clone.copy_repository(os.path.join(comfyui, "custom_nodes", "ComfyUI-FreeFuse-Bypass-Patch"))
    env = {"COMFYUI_PATH": "", "PYTHONPATH": PATH_WITHOUT_CHECKOUT}  # the clone itself, as a user runs it
    status = run_python(["-m", "freefuse_bypass_patch", "status"], env=env, cwd=node)
    assert status.returncode == 0, status.stdout + status.stderr[-3000:]
    assert "package: freefuse_bypass_patch %s at %s" % (ffbp.__version__, os.path.join(node, "freefuse_bypass_patch")) \
        in status.stdout, status.stdout
    assert "at %s (around the current folder)" % comfyui in status.stdout, status.stdout
    assert "capabilities: bypass_module=%s" % HAS_BYPASS in status.stdout, status.stdout

    status = run_python(["-m", "freefuse_bypass_patch", "status"], env=dict(env, COMFYUI_PATH=TREE), cwd=node)
    assert "at %s ($COMFYUI_PATH)" % os.path.abspath(TREE) in status.stdout, status.stdout

    lora = sc.family_lora(sc.tiny_flux().model, "flux", rank=2)
    path = sc.save_lora(lora, str(tmp_path / "tiny.safetensors"))
    check = run_python(["-m", "freefuse_bypass_patch", "check", "--lora", path], env=env, cwd=node)
    assert check.returncode == 0, check.stdout + check.stderr[-3000:]
    assert re.search(r"^ComfyUI \S+ at %s \(around the current folder\)$" % re.escape(comfyui), check.stdout, re.M), \
        check.stdout
    assert "plugin: applies %d of %d adapter(s)" % (len(lora) // 2, len(lora) // 2) in check.stdout, check.stdout


def test_load_benchmark_runs_as_documented():
    """benchmarks/load_overhead.py prints one row per LoRA, stock and plugin side by side. One round:
    no timing is asserted; the allocation columns are (the plugin's stays within 0.1x the weight)."""
    if not HAS_BYPASS:
        pytest.skip("the benchmark compares bypass loaders; this ComfyUI has none")
    script = os.path.join(ROOT, "benchmarks", "load_overhead.py")
    proc = run_python([script, "--comfyui", TREE, "--rounds", "1"], env={"PYTHONPATH": ""})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = re.findall(r"^(diffusers LoRA|LyCORIS LoKr|OFT \(alpha 1\))\s+\d+(?:\s+\d+\.\d+){3}\s+(\d+\.\d+)\s+(\d+\.\d+)$",
                      proc.stdout, re.M)
    assert len(rows) == 3, proc.stdout
    assert all(float(plugin) <= 0.1 for _, _, plugin in rows), rows
