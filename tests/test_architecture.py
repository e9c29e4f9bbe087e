"""The picture in docs/ARCHITECTURE.md stays true: every import of the project, at every depth, read with `ast`
(nothing is imported), follows the one-way layers, makes no circle, and names a file a reader can open.

Layers (lowest first): core (the torch-free base) <- torch side <- runtime (torch-free; `engines/torch.py` is the one
declared bridge to the torch side) <- export <- app (the CLI, the demo, the reports).
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = {"mae": "mae", "export": "mae.export", "runtime": "mae.runtime"}  # folder -> import name
TORCH_SIDE = {"mae.model", "mae.pos_embed", "mae.weights", "mae.checkpoint", "mae.train", "mae.train_options",
              "mae.data", "mae.distributed", "mae.plots"}  # fmt: skip
APP = {"mae.cli", "mae.demo", "mae.benchmark", "mae.weights_info"}
MAY_IMPORT = {
    "core": {"core"},
    "torch": {"core", "torch"},
    "runtime": {"core", "runtime"},
    "export": {"core", "torch", "runtime", "export"},
    "app": {"core", "torch", "runtime", "export", "app"},
}
BRIDGE = "mae.runtime.engines.torch"  # the runtime's one way to the torch side, lazily
# Optional heavy packages: a lazy import of these (or of a project module that imports them at its top) is expected.
HEAVY = {"torch", "onnx", "onnxruntime", "openvino", "tensorrt", "transformers", "matplotlib", "nncf", "onnxscript",
         "cuda", "rich", "typer", "pyarrow", "safetensors", "skimage", "sklearn", "faiss"}  # fmt: skip


@dataclass(frozen=True)
class Edge:
    source: str
    target: str
    path: Path
    line: int
    lazy: bool  # inside a function (or a class body), not at module top
    relative: bool
    reason: bool  # a comment on the import's line or the line above


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    name = [PACKAGES[parts[0]], *parts[1:]]
    if name[-1] == "__init__":
        name.pop()
    return ".".join(name)


def project_modules() -> dict[str, Path]:
    return {module_name(path): path for folder in PACKAGES for path in sorted((ROOT / folder).rglob("*.py"))}


MODULES = project_modules()


def layer(module: str) -> str:
    if module == "mae" or module.startswith("mae.core"):
        return "core"
    if module in TORCH_SIDE:
        return "torch"
    if module in APP or module.startswith("mae.reports"):
        return "app"
    if module.startswith("mae.runtime"):
        return "runtime"
    if module.startswith("mae.export"):
        return "export"
    raise AssertionError(f"{module} belongs to no layer: add it to one in tests/test_architecture.py and the docs")


def _targets(module: str, node: ast.Import | ast.ImportFrom) -> list[str]:
    if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
    else:
        if node.level:
            package = module.split(".") if MODULES[module].name == "__init__.py" else module.split(".")[:-1]
            base = ".".join(package[: len(package) - node.level + 1] + ([node.module] if node.module else []))
        else:
            base = node.module or ""
        names = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base for alias in node.names]
    found = []
    for name in names:
        while name and name not in MODULES:
            name = name.rpartition(".")[0]
        if name:
            found.append(name)
    return found


def _type_checking_nodes(tree: ast.Module) -> set[int]:
    skipped: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skipped |= {id(child) for child in ast.walk(node)}
    return skipped


def edges() -> list[Edge]:
    found = []
    for module, path in MODULES.items():
        text = path.read_text()
        lines = text.splitlines()
        tree = ast.parse(text)
        top = {id(node) for node in tree.body}
        skipped = _type_checking_nodes(tree)
        for node in ast.walk(tree):
            if not isinstance(node, ast.Import | ast.ImportFrom) or id(node) in skipped:
                continue
            reason = "#" in lines[node.end_lineno - 1] or lines[node.lineno - 2].strip().startswith("#")
            relative = isinstance(node, ast.ImportFrom) and node.level > 0
            for target in _targets(module, node):
                if target != module:
                    found.append(Edge(module, target, path, node.lineno, id(node) not in top, relative, reason))
    return found


EDGES = edges()


def _where(edge: Edge) -> str:
    return f"{edge.path.relative_to(ROOT)}:{edge.line} {edge.source} -> {edge.target}"


def test_every_import_follows_the_layers():
    wrong = [
        _where(edge)
        for edge in EDGES
        if layer(edge.target) not in MAY_IMPORT[layer(edge.source)]
        and not (edge.source == BRIDGE and layer(edge.target) == "torch" and edge.lazy)
    ]
    assert not wrong, "imports against the layers of docs/ARCHITECTURE.md:\n  " + "\n  ".join(wrong)


def test_no_circle_between_modules():
    graph: dict[str, set[str]] = {}
    for edge in EDGES:
        graph.setdefault(edge.source, set()).add(edge.target)
    circles = []
    state: dict[str, int] = {}  # 1 on the path, 2 done

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for target in sorted(graph.get(module, ())):
            if state.get(target) == 1:
                circles.append(" -> ".join([*path[path.index(target) :], target]))
            elif target not in state:
                visit(target, [*path, target])
        state[module] = 2

    for module in sorted(MODULES):
        if module not in state:
            visit(module, [module])
    assert not circles, "circles:\n  " + "\n  ".join(circles)


def _top_folder(module: str) -> str:
    return MODULES[module].relative_to(ROOT).parts[0]


def test_siblings_are_imported_relatively():
    """Inside each folder (mae/, export/, runtime/) the project's modules are imported relatively (`.bundle`,
    `..bench_cache`), so that every import names a file a reader, or an editor without the package installed, can
    open; a module of another folder is imported absolutely (`mae.runtime.x` lives in runtime/, not mae/runtime/)."""
    wrong = []
    for edge in EDGES:
        same = _top_folder(edge.target) == _top_folder(edge.source)
        if same and not edge.relative:
            wrong.append(_where(edge) + " (same folder: import it relatively)")
        if not same and edge.relative:
            wrong.append(_where(edge) + " (another folder: import it absolutely)")
    assert not wrong, "\n  ".join(wrong)


def _heavy_at_top(module: str, seen: set[str] | None = None) -> set[str]:
    """The optional heavy packages importing `module` loads (its top-level imports, transitively)."""
    seen = set() if seen is None else seen
    if module in seen:
        return set()
    seen.add(module)
    tree = ast.parse(MODULES[module].read_text())
    heavy: set[str] = set()
    for node in tree.body:
        if isinstance(node, ast.Import):
            heavy |= {alias.name.split(".")[0] for alias in node.names} & HEAVY
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            heavy |= {node.module.split(".")[0]} & HEAVY
    for edge in EDGES:
        if edge.source == module and not edge.lazy:
            heavy |= _heavy_at_top(edge.target, seen)
    return heavy


def test_lazy_project_imports_have_a_reason():
    """The project's own modules are imported at module top. A lazy one must keep an optional heavy dependency
    (torch, onnxruntime, ...) out of a module that does not need it at import, or say its reason in a comment; the
    CLI imports lazily throughout, for start-up time."""
    wrong = [
        _where(edge)
        for edge in EDGES
        if edge.lazy
        and edge.source != "mae.cli"
        and not edge.reason
        and not (_heavy_at_top(edge.target) - _heavy_at_top(edge.source))
    ]
    assert not wrong, "lazy imports without a reason:\n  " + "\n  ".join(wrong)


@pytest.mark.parametrize("module", ["mae.core", "mae.runtime"])
def test_the_torch_free_parts_never_import_torch_at_their_top(module):
    """Importing the base or the runtime (any of their modules) loads no torch, transformers or onnx exporter."""
    loaded = {name: _heavy_at_top(name) & {"torch", "transformers", "onnxscript"} for name in MODULES}
    wrong = {name: sorted(heavy) for name, heavy in loaded.items() if name.startswith(module) and heavy}
    assert not wrong, wrong


def test_the_layout_section_and_the_architecture_notes_name_every_part():
    text = (ROOT / "docs" / "ARCHITECTURE.md").read_text()
    for module in sorted(MODULES):
        if module.count(".") <= 2 and not module.endswith("__init__"):
            relative = MODULES[module].relative_to(ROOT).as_posix()
            if MODULES[module].name == "__init__.py":
                continue
            assert relative in text, f"docs/ARCHITECTURE.md does not place {relative}"


def test_no_library_function_is_over_80_lines():
    """Functions of the library (mae/, export/, runtime/; the CLI's commands are declarations) split along their
    stages: from the def line to the last line, docstring included, at most 80 lines."""
    long = []
    for module, path in MODULES.items():
        if module == "mae.cli":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.end_lineno - node.lineno + 1 > 80:
                long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1})")
    assert not long, "functions over 80 lines:\n  " + "\n  ".join(long)
