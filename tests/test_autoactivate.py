"""``enable``/``disable``/``status`` on a temporary virtualenv, never on the one running the tests.

The virtualenv sees this environment's packages through a path file, and the checkout
through PYTHONPATH (as conftest.py sets it); ``enable`` run by its own interpreter must
write into its own site-packages, and a fresh interpreter there must get the patch when
it imports comfy.sd.
"""

import os
import site
import subprocess
import sys
import textwrap

import pytest

from support import HAS_BYPASS, TREE, run_python

PTH = "freefuse_bypass_patch-autoactivate.pth"

# what kit.use_comfyui does, without importing the kit: the fresh interpreter must not
# import the plugin except through the .pth file
FRESH = textwrap.dedent("""
    import os, sys, tempfile
    print("IMPORTED_AT_START", "freefuse_bypass_patch" in sys.modules)
    if len(sys.argv) < 2:
        sys.exit()
    sys.path.insert(0, sys.argv[1])
    sys.argv = sys.argv[:1]
    os.chdir(tempfile.mkdtemp())
    import comfy.cli_args
    comfy.cli_args.args.cpu = True
    import comfy.sd
    wrapped = getattr(comfy.sd, "load_bypass_lora_for_models", None)
    print("PATCHED", bool(getattr(wrapped, "_self_freefuse_bypass_patch", False)))
""")


@pytest.fixture(scope="module")
def venv(tmp_path_factory):
    """A bare virtualenv (no pip) whose interpreter also sees this environment's packages."""
    root = tmp_path_factory.mktemp("venv")
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(root)], check=True)
    python = str(root / "bin" / "python")
    purelib = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    with open(os.path.join(purelib, "00_parent_environment.pth"), "w") as f:
        f.write("\n".join(site.getsitepackages()) + "\n")
    return python, purelib


def _run(python, args, env=None):
    full_env = dict(os.environ, COMFYUI_CPU="true", **(env or {}))
    return subprocess.run([python] + args, capture_output=True, text=True, env=full_env, timeout=300)


def test_enable_status_disable_in_a_virtualenv(venv):
    python, purelib = venv
    pth = os.path.join(purelib, PTH)
    proc = _run(python, ["-m", "freefuse_bypass_patch", "enable"])
    assert proc.returncode == 0 and os.path.isfile(pth), proc.stdout + proc.stderr
    assert "enabled: " + pth in proc.stdout
    try:
        fresh = _run(python, ["-c", FRESH, TREE])
        assert fresh.returncode == 0, fresh.stderr[-3000:]
        assert "IMPORTED_AT_START True" in fresh.stdout  # the .pth line ran at start-up
        assert "PATCHED %s" % HAS_BYPASS in fresh.stdout

        status = _run(python, ["-m", "freefuse_bypass_patch", "status", "--comfyui", TREE])
        assert status.returncode == 0, status.stderr[-3000:]
        assert "autoactivate: enabled (%s)" % pth in status.stdout
        assert "ComfyUI: " in status.stdout and "at %s (--comfyui)" % os.path.abspath(TREE) in status.stdout
        assert ("patched: yes: comfy.sd.load_bypass_lora_for_models" if HAS_BYPASS
                else "patched: no: this ComfyUI has no bypass mode") in status.stdout, status.stdout
        assert "capabilities: bypass_module=%s" % HAS_BYPASS in status.stdout
    finally:
        proc = _run(python, ["-m", "freefuse_bypass_patch", "disable"])
    assert proc.returncode == 0 and "disabled: removed " + pth in proc.stdout, proc.stdout + proc.stderr
    assert not os.path.exists(pth)
    fresh = _run(python, ["-c", FRESH])  # nothing imported at start-up: nothing can patch comfy.sd
    assert "IMPORTED_AT_START False" in fresh.stdout, fresh.stderr[-3000:]
    status = _run(python, ["-m", "freefuse_bypass_patch", "status"])
    assert "autoactivate: not enabled (no %s)" % pth in status.stdout, status.stdout


def test_a_foreign_file_of_our_name_is_never_touched(tmp_path):
    foreign = tmp_path / PTH
    foreign.write_text("import something_else\n")
    for command in ("disable", "enable"):
        proc = run_python(["-m", "freefuse_bypass_patch", command, "--site-packages", str(tmp_path)])
        assert proc.returncode == 1, (command, proc.stdout, proc.stderr)
        assert "was not written by this plugin" in proc.stdout
        assert foreign.read_text() == "import something_else\n"
    proc = run_python(["-m", "freefuse_bypass_patch", "status", "--site-packages", str(tmp_path)])
    assert "not enabled (%s exists but was not written by this plugin)" % foreign in proc.stdout, proc.stdout


def test_enable_twice_and_disable_twice(tmp_path):
    for command, expected in (("enable", "enabled: "), ("enable", "enabled: "), ("disable", "disabled: removed "),
                              ("disable", "not enabled: no ")):
        proc = run_python(["-m", "freefuse_bypass_patch", command, "--site-packages", str(tmp_path)])
        assert proc.returncode == 0 and expected + str(tmp_path / PTH) in proc.stdout, (command, proc.stdout)
    assert os.listdir(tmp_path) == []


def test_status_finds_comfyui_from_the_environment(tmp_path):
    proc = run_python(["-m", "freefuse_bypass_patch", "status", "--site-packages", str(tmp_path)],
                      env={"COMFYUI_PATH": TREE, "COMFYUI_CPU": "true"})
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    assert "at %s ($COMFYUI_PATH)" % os.path.abspath(TREE) in proc.stdout, proc.stdout
    assert "capabilities: bypass_module=%s" % HAS_BYPASS in proc.stdout, proc.stdout
