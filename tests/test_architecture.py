"""The house rules that keep the package one namespace with imports going one way and no circles
(docs/DESIGN.md, "Floors").

Floors, bottom to top: the spec's data (maskdsl.spec, plus the leaf modules maskdsl.cache and
maskdsl.version) -> the closed-form analysis (maskdsl.analysis) -> the language's front (maskdsl.lang)
-> the oracles and measurement harness (maskdsl.harness) -> simulator and codegen (peers, neither
imports the other) -> autotune -> bench, the CLIs and the front door (maskdsl.api, maskdsl.nn,
maskdsl.distributed, maskdsl.describe, maskdsl.show). A module may import its own floor or any below it,
never one above, and no set of modules may import each other in a circle (lazy imports count).
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FOLDERS = {"maskdsl": "maskdsl", "codegen": "maskdsl.codegen", "simulator": "maskdsl.simulator",
           "autotune": "maskdsl.autotune", "bench": "maskdsl.bench"}
FOLDER_NAMES = ("codegen", "simulator", "autotune", "bench")  # installed only as maskdsl.<name>
FRONT_DOOR = {"maskdsl", "maskdsl.api", "maskdsl.nn", "maskdsl.cli", "maskdsl.distributed", "maskdsl.describe",
              "maskdsl.show", "maskdsl.rank_agreement"}
LEAVES = {"maskdsl.cache", "maskdsl.version"}  # import nothing of maskdsl; any floor may use them
FLOORS = (("maskdsl.spec", 1), ("maskdsl.analysis", 2), ("maskdsl.lang", 3), ("maskdsl.harness", 4),
          ("maskdsl.codegen", 5), ("maskdsl.simulator", 5), ("maskdsl.autotune", 6))
PEERS = 5  # the floor whose families may not import each other
TOP = 7


def layer(module: str) -> tuple[int, str]:
    """(height, family) of a module; a family is a subpackage, peers share a height but not a family."""
    if module in LEAVES:
        return 0, module
    if module in FRONT_DOOR or module.endswith(".cli") or module.startswith("maskdsl.bench"):
        return TOP, "top"
    for family, height in FLOORS:
        if module == family or module.startswith(family + "."):
            return height, family
    raise AssertionError(f"{module} is on no floor: add it to a subpackage of maskdsl/ or to FRONT_DOOR/LEAVES")


def modules() -> dict[str, Path]:
    out = {}
    for folder, package in FOLDERS.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = path.relative_to(ROOT / folder).with_suffix("").parts
            parts = parts[:-1] if parts[-1] == "__init__" else parts
            out[".".join((package, *parts))] = path
    return out


def imports_of(path: Path, module: str) -> list[tuple[int, str]]:
    """Every `import x` / `from x import y` in the file, at any depth (lazy imports count too)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            if node.level:  # relative: resolve against this module's package
                base = module.split(".")[: -node.level] if not path.name == "__init__.py" else module.split(".")
                found.append((node.lineno, ".".join(base + [node.module])))
            else:
                found.append((node.lineno, node.module))
                # `from maskdsl import nn` names a module too
                found += [(node.lineno, f"{node.module}.{a.name}") for a in node.names
                          if f"{node.module}.{a.name}" in modules()]
    return found


def violations() -> list[str]:
    known = modules()
    bad = []
    for module, path in known.items():
        height, family = layer(module)
        for line, target in imports_of(path, module):
            top = target.split(".")[0]
            if top in FOLDER_NAMES:
                bad.append(f"{path.relative_to(ROOT)}:{line}: imports top-level {target!r}; write maskdsl.{target}")
                continue
            if top != "maskdsl" or target == "maskdsl":
                continue
            t_height, t_family = layer(target)
            if t_height > height or (t_height == height == PEERS and t_family != family):
                bad.append(f"{path.relative_to(ROOT)}:{line}: {module} (layer {height}) imports {target} "
                           f"(layer {t_height}, {t_family})")
    return bad


def test_imports_go_one_way():
    assert violations() == []


def test_layer_check_catches_an_upward_import(tmp_path, monkeypatch):
    """The check itself must be able to fail: a simulator module importing codegen is caught."""
    fake = tmp_path / "simulator"
    fake.mkdir()
    (fake / "leak.py").write_text("def f():\n    from maskdsl.codegen.config import KernelConfig\n")
    (fake / "top.py").write_text("import codegen.plan\n")
    monkeypatch.setitem(globals(), "ROOT", tmp_path)
    monkeypatch.setitem(globals(), "FOLDERS", {"simulator": "maskdsl.simulator"})
    found = violations()
    assert any("maskdsl.simulator.leak" in v and "maskdsl.codegen.config" in v for v in found)
    assert any("top-level 'codegen.plan'" in v for v in found)


def import_graph() -> dict[str, set[str]]:
    """module -> the modules of ours it imports (a `from package import name` counts as the package
    unless name is a module), at any depth."""
    known = modules()
    graph = {m: set() for m in known}
    for module, path in known.items():
        for _, target in imports_of(path, module):
            parts = target.split(".")
            while parts and ".".join(parts) not in known:
                parts.pop()
            name = ".".join(parts)
            if name and name != module and not module.startswith(name + "."):  # a package's own __init__ aside
                graph[module].add(name)
    return graph


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm, iterative)."""
    index, low, on_stack, stack, found, counter = {}, {}, set(), [], [], [0]
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter[0]
        counter[0] += 1
        stack.append(root), on_stack.add(root)
        while work:
            node, edges = work[-1]
            nxt = next(edges, None)
            if nxt is not None:
                if nxt not in graph:
                    continue
                if nxt not in index:
                    index[nxt] = low[nxt] = counter[0]
                    counter[0] += 1
                    stack.append(nxt), on_stack.add(nxt)
                    work.append((nxt, iter(sorted(graph[nxt]))))
                elif nxt in on_stack:
                    low[node] = min(low[node], index[nxt])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                comp = []
                while True:
                    m = stack.pop()
                    on_stack.discard(m)
                    comp.append(m)
                    if m == node:
                        break
                if len(comp) > 1:
                    found.append(sorted(comp))
    return found


def test_no_module_circles():
    assert circles(import_graph()) == []


def test_circle_check_catches_a_circle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": {"e"}}
    assert circles(graph) == [["a", "b", "c"]]


def test_every_module_is_on_a_floor():
    for module in modules():
        layer(module)  # raises for a module on no floor


def test_parse_does_not_import_torch():
    code = textwrap.dedent("""
        import sys, maskdsl
        maskdsl.parse("layout a = grid(16)\\nmask m = sliding_window(3) on a")
        heavy = sorted(m for m in ("torch", "triton", "optuna", "sympy") if m in sys.modules)
        print(",".join(heavy))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert "torch" not in out.stdout.strip().split(","), out.stdout


@pytest.mark.skipif(os.environ.get("MASKDSL_SKIP_WHEEL_TEST") == "1", reason="asked to skip by MASKDSL_SKIP_WHEEL_TEST")
def test_wheel_installs_one_namespace(tmp_path):
    """Build the wheel, install it into a fresh venv (no dependencies), and list top-level packages."""
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(wheels), str(ROOT)], check=True, capture_output=True, text=True)
    venv = tmp_path / "venv"
    # A bare venv, and a .pth naming the directories this interpreter imports its dependencies from. Not
    # --system-site-packages: inside a virtualenv that shows the base interpreter's packages, not this one's.
    # Lines of a .pth come after the venv's own site-packages, where the wheel's files go, so the imports
    # below resolve to what the wheel installed; the .pth files in those directories (an editable maskdsl)
    # are not processed.
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = str(venv / "bin" / "python")
    site = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          check=True, capture_output=True, text=True).stdout.strip()
    deps = [p for p in sys.path if p and Path(p).is_dir() and Path(p).resolve() != ROOT.resolve()]
    (Path(site) / "test_dependencies.pth").write_text("\n".join(deps) + "\n")
    wheel = next(wheels.glob("maskdsl-*.whl"))
    import zipfile

    with zipfile.ZipFile(wheel) as z:
        z.extractall(site)
        names = z.namelist()
    top = {n.split("/")[0] for n in names if not n.split("/")[0].endswith((".dist-info", ".data"))}
    assert top == {"maskdsl"}, top
    for sub in ("codegen/templates/attention_fwd.py.jinja", "simulator/gpu_costs.json", "lang/grammar.lark"):
        assert f"maskdsl/{sub}" in names, sub
    probe = textwrap.dedent("""
        import importlib, importlib.util, json, sys
        site = sys.argv[1]
        where = {}
        for name in ("maskdsl", "maskdsl.codegen.compiled", "maskdsl.simulator", "maskdsl.autotune.tuner",
                     "maskdsl.bench.run", "maskdsl.api"):
            where[name] = importlib.import_module(name).__file__.startswith(site)
        for name in ("codegen", "simulator", "autotune", "bench"):
            spec = importlib.util.find_spec(name)
            where[name] = spec is not None and (spec.origin or "").startswith(site)
        print(json.dumps(where))
    """)
    out = subprocess.run([python, "-c", probe, site], check=True, capture_output=True, text=True, cwd=tmp_path).stdout
    import json

    found = json.loads(out)
    assert all(found[n] for n in ("maskdsl", "maskdsl.codegen.compiled", "maskdsl.simulator", "maskdsl.autotune.tuner",
                                  "maskdsl.bench.run", "maskdsl.api")), found
    assert not any(found[n] for n in ("codegen", "simulator", "autotune", "bench")), found
