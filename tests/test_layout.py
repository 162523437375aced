"""The package's imports point one way, and ComfyUI start-up never loads the test kit.

Runtime: keys, weights -> forms -> hooks -> names, layouts -> masks, switch -> regional -> copies -> manager -> loader
-> wrappers -> patching -> __init__.
Self-check side: the kit/ package (trees, comfyui, models, loras, compare, gguf -> dryrun, maskview -> cli),
run by __main__.
"""

import ast
import os
import textwrap

from support import ROOT, TREE, run_python

PKG = os.path.join(ROOT, "freefuse_bypass_patch")
SELF_CHECK = ("kit",)  # the subpackage; every other module but __main__ (it runs kit.cli) is the runtime


def _module_name(path):
    rel = os.path.relpath(path, PKG)[:-3].replace(os.sep, ".")
    return rel[:-len(".__init__")] if rel.endswith(".__init__") else rel


def _package_imports():
    """{module: {package modules it imports}} from the source, relative imports resolved."""
    graph = {}
    for folder, _, files in os.walk(PKG):
        for name in files:
            if not name.endswith(".py"):
                continue
            path = os.path.join(folder, name)
            module = _module_name(path)
            package = module if name == "__init__.py" else module.rpartition(".")[0]
            deps = set()
            for node in ast.walk(ast.parse(open(path, encoding="utf-8").read())):
                if isinstance(node, ast.ImportFrom) and node.level:
                    base = package.split(".") if package else []
                    base = base[:len(base) - node.level + 1] if node.level > 1 else base
                    target = ".".join(base + ([node.module] if node.module else []))
                    for alias in node.names:
                        deps.add(target + "." + alias.name if target else alias.name)
                        deps.add(target)
            graph[module] = {d.strip(".") for d in deps if d.strip(".")}
    return {m: {d for d in deps if d in graph and d != m} for m, deps in graph.items()}


def test_runtime_modules_never_import_the_self_check_side():
    graph = _package_imports()
    assert {"kit", "kit.models", "kit.dryrun", "kit.cli", "kit.trees"} <= set(graph), sorted(graph)
    runtime = {m for m in graph if m.split(".")[0] not in SELF_CHECK and m != "__main__"}
    assert {"__init__", "keys", "forms", "hooks", "manager", "loader", "patching"} <= runtime, sorted(runtime)
    for module in runtime:
        wrong = {d for d in graph[module] if d.split(".")[0] in SELF_CHECK}
        assert not wrong, (module, wrong)


def test_no_import_cycles():
    graph = _package_imports()
    state = {}

    def visit(module, path):
        state[module] = "open"
        for dep in graph[module]:
            if state.get(dep) == "open":
                raise AssertionError("import cycle: " + " -> ".join(path + [module, dep]))
            if dep not in state:
                visit(dep, path + [module])
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [])


def test_comfyui_start_up_does_not_load_the_kit():
    """A fresh process imports the plugin and comfy.sd (the patch applied): no kit module loaded."""
    script = textwrap.dedent("""
        import os, sys, tempfile
        sys.path.insert(0, sys.argv[1])
        sys.argv = sys.argv[:1]  # the 0.12.1 fork parses the command line
        os.chdir(tempfile.mkdtemp())  # ... and writes its user folders here
        import freefuse_bypass_patch as ffbp
        import comfy.cli_args
        comfy.cli_args.args.cpu = True  # what kit.use_comfyui does, without the kit
        import comfy.sd
        loaded = sorted(m for m in sys.modules if m.startswith("freefuse_bypass_patch"))
        print("LOADED", " ".join(loaded))
        print("PATCHED", ffbp.is_patched())
    """)
    proc = run_python(["-c", script, TREE], env={"COMFYUI_CPU": "true"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    loaded = proc.stdout.split("LOADED ")[1].splitlines()[0].split()
    assert "freefuse_bypass_patch.patching" in loaded, loaded
    assert not [m for m in loaded if m.split(".")[1:2] and m.split(".")[1] in SELF_CHECK], loaded


def test_the_test_runner_and_the_kit_package_load_neither_torch_nor_comfyui():
    """run_matrix.py imports kit.trees: the kit's names load on first use, not with the package."""
    script = textwrap.dedent("""
        import sys
        sys.path.insert(0, sys.argv[1])
        import run_matrix
        from freefuse_bypass_patch import kit
        heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "comfy"))
        print("HEAVY", " ".join(heavy))
        kit.tiny_flux, kit.compare  # on first use: now torch is loaded, and compare is the function
        print("LAZY", "torch" in sys.modules, callable(kit.compare) and kit.compare.__module__)
    """)
    proc = run_python(["-c", script, os.path.join(ROOT, "tests")])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split("HEAVY")[1].splitlines()[0].split() == [], proc.stdout
    assert "LAZY True freefuse_bypass_patch.kit.compare" in proc.stdout, proc.stdout
