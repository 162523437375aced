"""The matrix runner's verdict: under CI=true a pinned version that did not run is a failure."""

import json
import os

import pytest

import run_matrix
from support import HERE

PINS = list(json.load(open(os.path.join(HERE, "pins.json")))["pins"])


@pytest.fixture
def one_tree(monkeypatch):
    """The runner sees one tree, of the first pinned version, and its tests pass."""
    monkeypatch.setattr(run_matrix, "find_trees", lambda: ([("/trees/a", "COMFYUI_PATHS")], []))
    monkeypatch.setattr(run_matrix, "tree_version", lambda tree: PINS[0])
    counts = {"passed": 3, "failed": 0, "skipped": 1, "error": 0}
    monkeypatch.setattr(run_matrix, "run_tree", lambda tree, args: (True, counts, 1.0, 0, ""))


@pytest.mark.parametrize("ci", ["true", ""])
def test_absent_pins_fail_only_in_ci(one_tree, monkeypatch, capsys, ci):
    monkeypatch.setenv("CI", ci)
    status = run_matrix.main([])
    out = capsys.readouterr().out
    assert "pinned versions ran: %s; absent: %s" % (PINS[0], ", ".join(PINS[1:])) in out
    assert out.rstrip().splitlines()[-1] == "3 passed, 0 failed, 1 skipped"
    if ci:
        assert status == 1 and "CI=true: every pinned version must run; missing " + ", ".join(PINS[1:]) in out
        assert "ABSENT (CI: FAIL)" in out
    else:
        assert status == 0 and "CI=true" not in out


def test_all_pins_present_pass_in_ci(monkeypatch, capsys):
    monkeypatch.setenv("CI", "true")
    monkeypatch.setattr(run_matrix, "find_trees", lambda: ([("/trees/" + v, "COMFYUI_PATHS") for v in PINS], []))
    monkeypatch.setattr(run_matrix, "tree_version", lambda tree: os.path.basename(tree))
    counts = {"passed": 1, "failed": 0, "skipped": 0, "error": 0}
    monkeypatch.setattr(run_matrix, "run_tree", lambda tree, args: (True, counts, 1.0, 0, ""))
    assert run_matrix.main([]) == 0
    assert "absent: none" in capsys.readouterr().out


def test_relative_comfyui_paths_are_made_absolute(monkeypatch, tmp_path):
    (tmp_path / "tree" / "comfy").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("COMFYUI_PATHS", os.pathsep.join(["tree", "missing"]))
    monkeypatch.setattr(run_matrix, "cached_trees", lambda: [])
    monkeypatch.setattr(run_matrix, "horde_tree", lambda: None)
    assert run_matrix.find_trees() == ([(str(tmp_path / "tree"), "COMFYUI_PATHS")], [str(tmp_path / "missing")])
