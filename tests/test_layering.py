"""The package's import layering: imports go down only (directly and through any chain of imports), without
circles between modules."""

import ast
from pathlib import Path

import finegrain

PACKAGE = Path(finegrain.__file__).parent
# a layer may import only from the layers listed for it (and from itself)
ALLOWED = {
    "models": {"models"},
    "objectives": {"objectives", "models"},
    "data": {"data"},
    "eval": {"eval", "data", "models"},
    "viz": {"viz", "train", "eval", "models"},  # plots read run folders (train.metrics_log's format)
    "annotate": {"annotate", "data", "eval", "models"},  # the template captioner scores crops with a CLIP
    "train": {"train", "data", "eval", "objectives", "models", "viz"},
    "finetune": {"finetune", "objectives", "eval", "data", "models"},  # fine-tuning tasks are methods with data-aware evaluations
    "predict": {"predict", "finetune", "objectives", "eval", "data", "models"},  # never the trainer
    # the command line, on top: every layer, and the jobs its commands run (the demos, the linear probe)
    "cli": {"cli", "train", "predict", "finetune", "annotate", "viz", "eval", "objectives", "data", "models", "demo",
            "linear_probe", "recipe_sources"},
}
# importable from every layer; a leaf imports only other leaves (config: errors and param_rules; sample_spec:
# errors)
LEAVES = {"sample_spec", "param_rules", "errors", "tables", "plugins", "config", "devices"}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    return ".".join(p for p in parts if p != "__init__")


def imported_modules(path: Path) -> set[str]:
    """finegrain modules imported by the file (relative imports resolved), top-level and inside functions."""
    name = module_name(path)
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[:len(package) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            elif node.module and node.module.startswith("finegrain"):
                target = node.module.removeprefix("finegrain").lstrip(".")
            else:
                continue
            found.add(target)
        elif isinstance(node, ast.Import):
            found.update(a.name.removeprefix("finegrain").lstrip(".") for a in node.names
                         if a.name.startswith("finegrain"))
    return {f for f in found if f}


def import_graph() -> dict[str, set[str]]:
    """``{module: modules importing it runs}``: its imports (``from package import module`` included) and the
    packages above them, whose ``__init__`` runs first."""
    files = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {}
    for module, path in files.items():
        targets = set()
        for target in imported_modules(path):
            parts = target.split(".")
            targets.update(".".join(parts[:i]) for i in range(1, len(parts) + 1))
        for node in ast.walk(ast.parse(path.read_text())):  # `from . import clip` imports objectives.clip
            if isinstance(node, ast.ImportFrom) and node.level:
                package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
                base = ".".join(package[:len(package) - node.level + 1] + ([node.module] if node.module else []))
                targets.update(f"{base}.{a.name}".lstrip(".") for a in node.names)
        graph[module] = {t for t in targets if t in files and t != module}
    return graph


def reachable(graph: dict[str, set[str]], start: str) -> dict[str, list[str]]:
    """``{module: the chain of imports from start to it}`` for every module importing ``start`` runs."""
    chains, todo = {start: [start]}, [start]
    while todo:
        module = todo.pop()
        for nxt in sorted(graph[module]):
            if nxt not in chains:
                chains[nxt] = chains[module] + [nxt]
                todo.append(nxt)
    return chains


def allowed_below(layer: str) -> set[str]:
    """The layers a layer may reach through any chain of imports: ALLOWED's closure, and the leaves."""
    found, todo = {layer}, [layer]
    while todo:
        for nxt in ALLOWED.get(todo.pop(), ()):
            if nxt not in found:
                found.add(nxt)
                todo.append(nxt)
    return found | LEAVES


def test_layers_import_only_downwards():
    bad = []
    for path in PACKAGE.rglob("*.py"):
        layer = module_name(path).split(".")[0]
        if layer not in ALLOWED:
            continue
        for target in imported_modules(path):
            top = target.split(".")[0]
            if top not in ALLOWED[layer] and top not in LEAVES:
                bad.append(f"{module_name(path)} imports {target}")
    assert not bad, bad


def test_no_chain_of_imports_reaches_a_layer_above():
    """e.g. data -> config -> objectives would break the rule that data and objectives never meet."""
    graph = import_graph()
    bad = []
    for module in graph:
        layer = module.split(".")[0]
        if layer not in ALLOWED and layer not in LEAVES:
            continue
        allowed = {layer} | LEAVES if layer in LEAVES else allowed_below(layer)
        bad += [" -> ".join(chain) for target, chain in reachable(graph, module).items()
                if target.split(".")[0] not in allowed]
    assert not bad, bad


def test_leaf_modules_import_only_leaves():
    for leaf in LEAVES:
        assert {t.split(".")[0] for t in imported_modules(PACKAGE / f"{leaf}.py")} <= LEAVES, leaf
    for leaf in ("param_rules", "errors", "plugins", "tables", "devices"):
        assert imported_modules(PACKAGE / f"{leaf}.py") == set(), leaf
    assert imported_modules(PACKAGE / "sample_spec.py") == {"errors"}  # its settings' errors are DataErrors


def test_no_import_cycles_between_modules():
    graph = {module_name(p): {t for t in imported_modules(p)} for p in PACKAGE.rglob("*.py")}
    modules = set(graph)

    def resolve(target):  # "models" (a package) or "models.clip"
        return target if target in modules else None

    edges = {m: {resolve(t) for t in ts} - {None, m} for m, ts in graph.items()}
    # a package's __init__ re-exporting its own modules is not a cycle
    edges = {m: {t for t in ts if not (m and t.startswith(m + "."))} for m, ts in edges.items()}
    state: dict[str, int] = {}

    def visit(node, stack):
        state[node] = 1
        for nxt in edges.get(node, ()):
            if state.get(nxt) == 1:
                raise AssertionError("import cycle: " + " -> ".join(stack + [node, nxt]))
            if nxt not in state:
                visit(nxt, stack + [node])
        state[node] = 2

    for module in sorted(modules):
        if module not in state:
            visit(module, [])
