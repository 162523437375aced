"""benchmarks/adapter_overhead.py runs on the tree under test (tiny config): the tables, the
plugin's correctness column and the targets block are printed. No timing is asserted."""

import os
import re

import pytest

from support import HAS_BYPASS, REL_TOL, ROOT, TREE, run_python

KINDS = ("lokr", "oft")  # OFT: stock bypass crashes on 0.28.0, which the table must report, not fail on


def test_adapter_benchmark_smoke():
    if not HAS_BYPASS:
        pytest.skip("the benchmark compares bypass modes; this ComfyUI has none")
    script = os.path.join(ROOT, "benchmarks", "adapter_overhead.py")
    proc = run_python([script, "--comfyui", TREE, "--config", "tiny", "--adapter", ",".join(KINDS),
                       "--forwards", "1"], env={"PYTHONPATH": ""})
    out = proc.stdout
    assert proc.returncode == 0, out[-3000:] + proc.stderr[-3000:]
    for kind in KINDS:
        section = out.split("\n== %s:" % kind, 1)
        assert len(section) == 2, out
        table = section[1].split("\n\n", 1)[0]
        rows = {m.group(1): m.group(2).split() for m in re.finditer(r"^(merged|stock|plugin)\s+(.*)$", table, re.M)}
        assert set(rows) == {"merged", "stock", "plugin"}, table
        for mode in ("merged", "plugin"):  # ms/fwd, x merged, 1st fwd ms, load ms, extra MiB, rel diff
            cells = rows[mode]
            assert len(cells) == 8 and all(_is_number(cells[i]) for i in (0, 1, 3, 4, 5, 7)), table
        assert _is_number(rows["stock"][0]) or "crash: " in table, table
        assert float(rows["plugin"][7]) <= REL_TOL, table  # plugin == merged in fp32
    targets = out.split("\ntargets (issue 8, cpu", 1)
    assert len(targets) == 2, out
    for kind in KINDS:
        assert re.search(r"^  %s: plugin extra peak over stock.*(PASS|MISS)$" % kind, targets[1], re.M), targets[1]
    assert re.search(r"^  lokr: plugin forward / stock forward.*(PASS|MISS)$", targets[1], re.M), targets[1]


def _is_number(text):
    try:
        float(text)
    except ValueError:
        return False
    return True
