"""Installed the ways ComfyUI users install: a clone in custom_nodes, the registry metadata, pip.

The clone is a copy of the repository as ``git clone`` lays it out (tests/clone.py), put in
a temporary ``custom_nodes/<folder>`` and loaded by the tree's own custom-node loader.
"""

import os
import re
import textwrap

import pytest

import clone
from support import HAS_BYPASS, REL_TOL, ROOT, run_python, scenario

tomllib = pytest.importorskip("tomllib")

PYPROJECT = os.path.join(ROOT, "pyproject.toml")


def _pyproject():
    with open(PYPROJECT, "rb") as f:
        return tomllib.load(f)


@pytest.mark.parametrize("folder, preloaded", [
    ("freefuse_bypass_patch", False),
    ("ComfyUI-FreeFuse-Bypass-Patch", False),
    # pip install + enable imported the package before ComfyUI loads custom nodes; the fork
    # then registers the clone's root under the package's own name
    ("freefuse_bypass_patch", True),
])
def test_clone_in_custom_nodes_is_a_working_custom_node(folder, preloaded):
    report, proc = scenario("custom_nodes", args=[folder] + (["preloaded"] if preloaded else []))
    assert report["loader_result"] is True, proc.stderr[-3000:]
    assert report["nodes_added"] == 0
    assert report["loader_warnings"] == []  # e.g. ComfyUI parses pyproject.toml and warns if it cannot
    assert "IMPORT FAILED" not in proc.stdout + proc.stderr
    # the public API is importable as freefuse_bypass_patch, one copy of it
    assert len(report["copies"]) == 1, report["copies"]
    if preloaded:
        assert report["imported_before_loader"] and report["package_dir"] == os.path.join(report["checkout"],
                                                                                          "freefuse_bypass_patch")
    else:
        assert report["imported_before_loader"] is False  # it really came through ComfyUI's loader
        assert report["package_dir"] == os.path.join(report["node_dir"], "freefuse_bypass_patch")
    assert report["copies"][0] == os.path.join(report["package_dir"], "patching.py")
    assert report["version"] == _pyproject()["project"]["version"]
    assert report["kit_loaded"] == []  # ComfyUI start-up never loads the test kit
    assert report["api_patched"] is report["patched"] is HAS_BYPASS
    if HAS_BYPASS:
        single = report["single"]
        assert single["dropped"] == 0 and single["lora_effect"] > 0.05 and single["rel_diff"] <= REL_TOL, single
        assert single["weights_unchanged"] and single["base_restored"], single


def _names(lines):
    """Distribution names of requirement lines (comments and blank lines skipped), normalised."""
    names = [re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", line.split("#", 1)[0]) for line in lines]
    return [re.sub(r"[-_.]+", "-", n.group(1)).lower() for n in names if n]


def test_requirements_leave_what_comfyui_brings_to_comfyui():
    """A clone's requirements.txt names wrapt only: not torch, nor anything the tree's own
    requirements.txt lists (pip install -U -r must not touch ComfyUI's packages); the pip
    package's dependencies state everything it imports."""
    clone_needs = _names(open(os.path.join(ROOT, "requirements.txt"), encoding="utf-8").read().splitlines())
    assert clone_needs == ["wrapt"]
    comfyui_requirements = os.path.join(os.environ["COMFYUI_PATH"], "requirements.txt")
    if os.path.isfile(comfyui_requirements):  # upstream layout (the fork states its own in pyproject)
        brought = set(_names(open(comfyui_requirements, encoding="utf-8").read().splitlines()))
        assert {"torch", "safetensors"} <= brought and not brought & set(clone_needs)
    dependencies = _pyproject()["project"]["dependencies"]
    assert sorted(_names(dependencies)) == ["safetensors", "torch", "wrapt"]
    assert "wrapt>=1.14" in dependencies and "wrapt>=1.14" in open(os.path.join(ROOT, "requirements.txt")).read()


def test_a_clone_without_wrapt_says_what_to_run():
    """requirements.txt never installed: one WARNING with the pip command and the file's path;
    nothing patched, ComfyUI's loader still succeeds."""
    report, proc = scenario("custom_nodes", args=["ComfyUI-FreeFuse-Bypass-Patch", "nowrapt"])
    if report.get("tree_needs_wrapt"):
        pytest.skip("this ComfyUI imports wrapt itself (the 0.12.1 fork lists it): a clone cannot lack it")
    assert report["loader_result"] is True and report["patched"] is False, report
    warnings = [w for w in report["loader_warnings"] if "freefuse_bypass_patch" in w]
    requirements = os.path.join(report["node_dir"], "requirements.txt")
    assert len(warnings) == 1, report["loader_warnings"]
    assert "wrapt not installed" in warnings[0] and "-m pip install -r %s" % requirements in warnings[0], warnings
    assert "ComfyUI-Manager" in warnings[0]
    assert not any(m.startswith("freefuse_bypass_patch.") for m in report["modules"]), report["modules"]


def test_registry_metadata():
    """pyproject.toml as the Comfy Registry documents it, and as the tree's own parser reads it."""
    data = _pyproject()
    project, comfy = data["project"], data["tool"]["comfy"]
    assert re.fullmatch(r"[A-Za-z][A-Za-z0-9]*([._-][A-Za-z0-9]+)*", project["name"]) and len(project["name"]) < 100
    assert "comfyui" not in project["name"].lower()
    assert re.fullmatch(r"\d+\.\d+\.\d+", project["version"])
    assert project["description"] and set(project["license"]) <= {"text", "file"}
    assert project["urls"]["Repository"].startswith("https://")
    for field in ("PublisherId", "DisplayName", "Icon"):
        assert comfy[field], field
    assert comfy["Icon"].endswith("/icon.svg") and os.path.isfile(os.path.join(ROOT, "icon.svg"))

    script = textwrap.dedent("""
        import sys
        sys.path.insert(0, sys.argv[1])
        from comfy_config import config_parser
        config = config_parser.extract_node_configuration(sys.argv[2])
        print("PARSED", config.project.name, config.project.version, config.tool_comfy.publisher_id)
    """)
    proc = run_python(["-c", script, os.environ["COMFYUI_PATH"], ROOT])
    if "No module named 'comfy_config'" in proc.stderr:
        pytest.skip("this ComfyUI has no pyproject parser")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "PARSED %s %s %s" % (project["name"], project["version"], comfy["PublisherId"]) in proc.stdout


def test_pip_install_builds_and_carries_the_version(tmp_path):
    """``pip install .`` (no dependencies, this environment's setuptools) on a copy of the repository."""
    source = clone.copy_repository(str(tmp_path / "source"))
    target = str(tmp_path / "site")
    proc = run_python(["-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--no-input",
                       "--target", target, source], timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    installed = sorted(os.listdir(target))
    assert "freefuse_bypass_patch" in installed and "__init__.py" not in installed and "tests" not in installed
    assert os.path.isdir(os.path.join(target, "freefuse_bypass_patch", "kit"))
    script = textwrap.dedent("""
        import sys
        sys.path.insert(0, sys.argv[1])  # PYTHONPATH is emptied: the checkout is not on the path
        import importlib.metadata
        import freefuse_bypass_patch as ffbp
        print("FROM", ffbp.__file__)
        print("VERSIONS", ffbp.__version__, importlib.metadata.version("freefuse_bypass_patch"))
        print("REQUIRES", sorted(importlib.metadata.requires("freefuse_bypass_patch")))
    """)
    proc = run_python(["-c", script, target], env={"PYTHONPATH": ""})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "FROM " + os.path.join(target, "freefuse_bypass_patch") in proc.stdout
    version = _pyproject()["project"]["version"]
    assert "VERSIONS %s %s" % (version, version) in proc.stdout
    assert "wrapt>=1.14" in proc.stdout
