"""The package's imports form a DAG that follows the layer order of docs/design.md §2: every import of a
``dflash_jax`` module points to the same layer or one below, the module-level import graph has no cycle, and no
function-level import of the package is left (``cli`` aside, which imports its commands lazily to start fast)."""

import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "dflash_jax"

# Bottom to top: a module may import its own layer and the layers below it, never one above.
LAYERS = (
    ("dflash_jax.paths", "dflash_jax.sharding"),
    ("dflash_jax.config",),
    ("dflash_jax.data",),
    ("dflash_jax.blocks", "dflash_jax.losses"),
    ("dflash_jax.models",),
    ("dflash_jax.generate", "dflash_jax.export"),
    ("dflash_jax.eval", "dflash_jax.regenerate"),
    ("dflash_jax.train",),
    ("dflash_jax.cli", "dflash_jax.scripts"),
)
LAZY_ALLOWED = ("dflash_jax.cli",)


def _module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _rank(module: str) -> int:
    if module == "dflash_jax":  # the package's face re-exports the public API: above everything it names
        return len(LAYERS)
    for i, prefixes in enumerate(LAYERS):
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return i
    raise AssertionError(f"{module} is in no layer of LAYERS: add it where docs/design.md §2 puts it")


def _imports(path: pathlib.Path, module: str) -> list[tuple[str, bool]]:
    """``(imported dflash_jax module, at module level)`` for every import statement of ``path``."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    top = {id(node) for node in tree.body}
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(
                    package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else [])
                )
            # ``from pkg import mod`` imports the submodule when there is one
            names = [f"{base}.{a.name}" if _is_module(f"{base}.{a.name}") else base for a in node.names]
        else:
            continue
        out += [(n, id(node) in top) for n in names if n == "dflash_jax" or n.startswith("dflash_jax.")]
    return out


def _is_module(name: str) -> bool:
    rel = pathlib.Path(*name.split(".")[1:])
    return (PACKAGE / rel).with_suffix(".py").is_file() or (PACKAGE / rel / "__init__.py").is_file()


def _graph() -> dict[str, list[tuple[str, bool]]]:
    return {
        _module_name(p): _imports(p, _module_name(p))
        for p in sorted(PACKAGE.rglob("*.py"))
        if not p.is_symlink() and "scripts" not in p.relative_to(PACKAGE).parts
    }


def test_every_module_has_a_layer():
    for module in _graph():
        _rank(module)


def test_no_upward_import():
    upward = [
        f"{src} -> {dst}"
        for src, edges in _graph().items()
        for dst, _ in edges
        if dst != src and _rank(dst) > _rank(src)
    ]
    assert not upward, "imports that point up the layer order: " + ", ".join(upward)


def test_no_lazy_import_of_the_package():
    lazy = [
        f"{src} -> {dst}"
        for src, edges in _graph().items()
        if not src.startswith(LAZY_ALLOWED)
        for dst, top in edges
        if not top
    ]
    assert not lazy, "function-level imports of the package (import at module level): " + ", ".join(lazy)


def test_module_level_imports_have_no_cycle():
    graph = {src: sorted({dst for dst, top in edges if top and dst != src}) for src, edges in _graph().items()}
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in graph.get(node, ()):
            if state.get(nxt) == 1:
                cycle = path[path.index(nxt) :] + [nxt] if nxt in path else [node, nxt]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for node in graph:
        if node not in state:
            visit(node, [node])


def test_the_checks_catch_what_they_look_for(tmp_path):
    """The walker sees module-level and nested ``from``/``import`` statements, relative ones included."""
    p = PACKAGE / "models" / "target.py"
    edges = dict(_imports(p, "dflash_jax.models.target"))
    assert edges.get("dflash_jax.models.layers") is True and edges.get("dflash_jax.models.attention") is True
    fake = tmp_path / "x.py"
    fake.write_text("from . import losses\ndef f():\n    from dflash_jax.train import loop\n")
    got = _imports(fake, "dflash_jax.blocks")
    assert ("dflash_jax.losses", True) in got and ("dflash_jax.train.loop", False) in got
    assert _rank("dflash_jax.train.loop") > _rank("dflash_jax.blocks")
