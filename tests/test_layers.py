"""The package's layers point one way (docs/ARCHITECTURE.md): a module imports only modules of its own
layer or of a lower one, no two modules import each other (directly or through others), and a
function-level import says why it is not at the top (an optional dependency, or start-up time).

    base -> model -> tokenizer/data -> engine -> optim -> trainer -> formats -> api -> cli
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = "gguf_finetune"
SRC = Path(__file__).resolve().parent.parent / "src" / PKG

# lowest first; a module belongs to the first entry that names it or its package
LAYERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("base", ("errors", "config", "dist", "stdcpp", "gguf_io", "quants")),
    ("model", ("arch", "model", "lora")),
    ("tokenizer/data", ("tokenizer", "data")),
    ("engine", ("engine", "sampling")),
    ("optim", ("optim",)),
    ("trainer", ("trainer", "report", "evaluate", "perplexity", "warmup")),
    ("formats", ("formats", "synthetic", "plot")),
    ("api", ("api", "demo", "__init__")),
    ("cli", ("cli", "__main__")),
)


def layer_of(module: str) -> int:
    """'gguf_finetune.engine.kernels' -> the index of its layer."""
    rel = module[len(PKG) + 1:] if module != PKG else "__init__"
    first = rel.split(".")[0]
    for i, (_, names) in enumerate(LAYERS):
        if first in names:
            return i
    raise KeyError(f"{module} is in no layer: add it to LAYERS (and to docs/ARCHITECTURE.md)")


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join([PKG] + parts)


def internal_imports(module: str, source: str, is_package: bool = False) -> list[tuple[str, int, bool]]:
    """(imported gguf_finetune module, line, at function level) for every import of the package."""
    tree = ast.parse(source)
    package = module if is_package else module.rpartition(".")[0]
    out = []
    func_lines = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            func_lines.update(n.lineno for n in ast.walk(node) if isinstance(n, (ast.Import, ast.ImportFrom)))
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            # `from . import quants` imports a module; `from .x import name` imports from x
            names = [f"{mod}.{a.name}" if not node.module else mod for a in node.names]
        for name in names:
            if name == PKG or name.startswith(PKG + "."):
                out.append((name, node.lineno, node.lineno in func_lines))
    return out


def resolve(name: str, known: set[str]) -> str:
    """The longest known module that ``name`` is or lies in ('gguf_finetune.arch.weight' -> arch)."""
    while name not in known and "." in name:
        name = name.rpartition(".")[0]
    return name


def check(modules: dict[str, tuple[str, bool]]) -> list[str]:
    """Violations of the rules for {module: (source, is_package)}."""
    known = set(modules)
    problems = []
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for mod, (src, is_pkg) in modules.items():
        for name, line, _ in internal_imports(mod, src, is_pkg):
            target = resolve(name, known)
            if target == mod or target not in known:
                continue
            graph[mod].add(target)
            if layer_of(target) > layer_of(mod):
                problems.append(f"{mod}:{line} imports {target}: layer '{LAYERS[layer_of(target)][0]}' is above "
                                f"'{LAYERS[layer_of(mod)][0]}'")
    # cycles (a module's own package __init__ is imported by Python anyway: not an edge worth checking)
    state: dict[str, int] = {}

    def visit(m: str, stack: list[str]) -> None:
        state[m] = 1
        for t in sorted(graph[m]):
            if m.startswith(t + "."):
                continue
            if state.get(t) == 1:
                problems.append("import cycle: " + " -> ".join(stack[stack.index(t):] + [m, t]))
            elif t not in state:
                visit(t, stack + [m])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [])
    return problems


def package_modules() -> dict[str, tuple[str, bool]]:
    return {module_name(p, SRC): (p.read_text(encoding="utf-8"), p.name == "__init__.py")
            for p in sorted(SRC.rglob("*.py"))}


def test_every_module_has_a_layer():
    for mod in package_modules():
        layer_of(mod)


def test_imports_point_down_and_form_no_cycle():
    assert check(package_modules()) == []


def test_the_check_catches_an_upward_import_and_a_cycle():
    ok = {"gguf_finetune.model": ("from .errors import UserError\n", False),
          "gguf_finetune.errors": ("", False)}
    assert check(ok) == []
    upward = dict(ok, **{"gguf_finetune.model": ("def f():\n    from .cli.finetune import run\n", False),
                         "gguf_finetune.cli.finetune": ("", False)})
    assert check(upward) == ["gguf_finetune.model:2 imports gguf_finetune.cli.finetune: layer 'cli' is above 'model'"]
    cycle = {"gguf_finetune.formats.load": ("from .peft import read_peft\n", False),
             "gguf_finetune.formats.peft": ("def f():\n    from .load import x\n", False)}
    assert any(p.startswith("import cycle: ") for p in check(cycle))
    with pytest.raises(KeyError, match="in no layer"):
        layer_of("gguf_finetune.newthing")


def lazy_imports_without_reason(source: str) -> list[int]:
    """Lines of function-level imports with no comment saying why (on the import's line, or on the
    line just above the block of imports it belongs to)."""
    lines = source.splitlines()
    bad = []
    tree = ast.parse(source)
    for fn in ast.walk(tree):
        if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        for node in ast.walk(fn):
            if not isinstance(node, (ast.Import, ast.ImportFrom)):
                continue
            i = node.lineno - 1
            while i > 0 and lines[i - 1].lstrip().startswith(("import ", "from ")):  # the top of the block
                i -= 1
            block = lines[i:node.end_lineno]
            if not any("#" in ln for ln in block) and not (i > 0 and lines[i - 1].lstrip().startswith("#")):
                bad.append(node.lineno)
    return bad


def test_function_level_imports_say_why():
    bad = [f"{mod}:{ln}" for mod, (src, _) in package_modules().items() for ln in lazy_imports_without_reason(src)]
    assert bad == []
    assert lazy_imports_without_reason("def f():\n    import x\n") == [2]
    assert lazy_imports_without_reason("def f():\n    import x  # optional: x\n    import y\n") == []
