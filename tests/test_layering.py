"""The package's import layering: imports go down only, without circles between modules."""

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
}
# importable from every layer: leaf modules, and config (not a leaf: see ALLOWED["config"])
LEAVES = {"sample_spec", "param_rules", "errors", "tables", "plugins", "config"}
# config validates method options against the method registry (a lazy import inside build_config)
ALLOWED["config"] = {"objectives"}


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


def test_layers_import_only_downwards():
    bad = []
    for path in PACKAGE.rglob("*.py"):
        layer = module_name(path).split(".")[0]
        if layer not in ALLOWED or layer in LEAVES - {"config"}:
            continue
        for target in imported_modules(path):
            top = target.split(".")[0]
            if top not in ALLOWED[layer] and top not in LEAVES:
                bad.append(f"{module_name(path)} imports {target}")
    assert not bad, bad


def test_leaf_modules_import_nothing_from_the_package():
    for leaf in ("sample_spec", "param_rules", "errors", "plugins"):
        assert imported_modules(PACKAGE / f"{leaf}.py") == set(), leaf


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
