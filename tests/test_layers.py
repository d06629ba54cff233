"""Imports go one way: every module of `clinalign` and `harmony` sits in one layer, imports only its own
layer or lower ones (function-level imports included), and no two modules import each other, even
through others. Entry scripts import the packages, never each other.

The layers, lowest first. A new module must be placed here; the test names any that is not.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from conftest import REPO

LAYERS: list[tuple[str, list[str]]] = [
    ("errors, I/O and upstream glue", [
        "clinalign", "clinalign.errors", "clinalign.json_io", "clinalign.compat", "clinalign.devices",
        "clinalign.run_dir", "clinalign.sampling", "clinalign.stats", "clinalign.plots", "clinalign.tracking",
        "clinalign.tables", "harmony",
    ]),
    ("records and prompts", ["clinalign.records", "clinalign.prompts"]),
    ("data", ["clinalign.data", "clinalign.data.*"]),
    ("judgments, tasks and configs", [
        "clinalign.safety", "clinalign.factuality", "clinalign.tasks", "clinalign.config",
    ]),
    ("model checkpoints and adapters", ["clinalign.tiny_models", "clinalign.model_store", "clinalign.adapters"]),
    ("the GPT-OSS path", ["harmony.*"]),
    ("loaders and training paths", ["clinalign.*"]),  # models, sft, dpo, ppo, rewards, mc_eval, evaluation, ...
]
GPT_OSS_LAYER = 5
ENTRY_FOLDERS = ("sft", "reward", "rl", "eval")


def _module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _layer(module: str) -> int:
    exact = [index for index, (_, members) in enumerate(LAYERS) if module in members]
    if exact:
        return exact[0]
    # Otherwise the most specific wildcard: clinalign.data.* before clinalign.*.
    matches = [
        (len(member), index)
        for index, (_, members) in enumerate(LAYERS)
        for member in members
        if member.endswith(".*") and module.startswith(member[:-1])
    ]
    if not matches:
        raise KeyError(module)
    return max(matches)[1]


def _imports(path: Path, known: set[str], importer: str = "") -> set[str]:
    """The project modules a file imports, at any depth (a `from pkg import mod` counts as pkg.mod).

    Importing `a.b.c` runs the package `a.b`'s __init__ first, so that counts as an import of `a.b`
    too (except from inside `a.b` itself): a low module kept inside a package that imports high ones
    is not low.
    """
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    packages = {name.rsplit(".", i)[0] for name in found for i in range(1, name.count(".") + 1)}
    own = {importer.rsplit(".", i)[0] for i in range(0, importer.count(".") + 1)} if importer else set()
    return {name for name in found | (packages - own) if name in known}


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    files = {_module_name(p): p for package in ("clinalign", "harmony") for p in (REPO / package).rglob("*.py")}
    return {module: _imports(path, set(files), module) - {module} for module, path in files.items()}


def test_every_module_has_a_layer(graph):
    unplaced = []
    for module in graph:
        try:
            _layer(module)
        except KeyError:
            unplaced.append(module)
    assert not unplaced, f"place these modules in a layer of tests/test_layers.py: {unplaced}"
    assert _layer("clinalign.models") == len(LAYERS) - 1 and _layer("harmony.gpt_oss") == GPT_OSS_LAYER
    assert _layer("clinalign.data.medqa") == 2 and _layer("clinalign.records") == 1


def test_imports_only_go_down(graph):
    upward = [
        f"{module} ({LAYERS[_layer(module)][0]}) imports {target} ({LAYERS[_layer(target)][0]})"
        for module, targets in graph.items()
        for target in targets
        if _layer(target) > _layer(module)
    ]
    assert not upward, "\n".join(upward)


def test_clinalign_core_never_imports_harmony(graph):
    core = [m for m in graph if m.startswith("clinalign") and _layer(m) < GPT_OSS_LAYER]
    assert {"clinalign.model_store", "clinalign.data", "clinalign.config", "clinalign.safety"} <= set(core)
    offenders = {m: sorted(t for t in graph[m] if t.startswith("harmony")) for m in core}
    assert not {m: t for m, t in offenders.items() if t}


def test_no_import_cycles(graph):
    # Tarjan's strongly connected components: any component of two or more modules is a cycle.
    index, low, stack, on_stack, cycles, counter = {}, {}, [], set(), [], [0]

    def visit(node):
        index[node] = low[node] = counter[0]
        counter[0] += 1
        stack.append(node)
        on_stack.add(node)
        for target in graph[node]:
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    assert not cycles, f"import cycles: {cycles}"


def test_the_cycle_check_finds_a_cycle(graph):
    # The check itself: adding one back edge (the old clinalign.models <-> harmony.vocab) is caught.
    broken = {m: set(t) for m, t in graph.items()}
    broken["harmony.vocab"].add("clinalign.models")
    with pytest.raises(AssertionError, match="import cycles"):
        test_no_import_cycles(broken)


def test_entry_scripts_import_no_other_script():
    scripts = [p for folder in ENTRY_FOLDERS for p in (REPO / folder).glob("*.py")]
    assert len(scripts) >= 8
    for script in scripts:
        roots = {name.split(".")[0] for name in _imports(script, _all_names(script))}
        assert not roots & set(ENTRY_FOLDERS), f"{script.relative_to(REPO)} imports another entry script"


def _all_names(script: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(script.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
    return names
