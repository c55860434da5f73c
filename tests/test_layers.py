"""Dependencies point one way: `slm_jax` <- `quant` <- `checkpoints` <- `train`, command-line modules on top.

Every project module is parsed with `ast` (nothing is imported, so this is fast), imports inside functions included.
Entry modules are those run as `python -m ...`: a package's `__main__.py` or a file with an `if __name__ ==
"__main__"` guard. They may import anything; no other module may import them.
"""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LAYERS = ("slm_jax", "quant", "checkpoints", "train")  # each may import only itself and those before it


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_modules() -> dict[str, ast.Module]:
    return {module_name(path): ast.parse(path.read_text(encoding="utf-8"), str(path))
            for package in LAYERS for path in sorted((ROOT / package).rglob("*.py"))}


def is_entry(name: str, tree: ast.Module) -> bool:
    guard = [node for node in tree.body if isinstance(node, ast.If) and "__main__" in ast.unparse(node.test)]
    return name.endswith(".__main__") or bool(guard)


def imports(name: str, tree: ast.Module, modules) -> list[tuple[str, int, bool]]:
    """(imported project module, line, whether the import sits inside a function or class) for every import."""
    inside = {id(node) for outer in ast.walk(tree) if isinstance(outer, (ast.FunctionDef, ast.AsyncFunctionDef,
                                                                         ast.ClassDef, ast.Lambda))
              for node in ast.walk(outer) if node is not outer}
    package = name if (ROOT / name.replace(".", "/") / "__init__.py").exists() else name.rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the package, one level up per extra dot
                parts = package.split(".")[:len(package.split(".")) - (node.level - 1)]
                base = ".".join(parts + ([base] if base else []))
            # `from pkg import mod` imports the module pkg.mod; `from mod import name` imports mod
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
        else:
            continue
        for target in dict.fromkeys(targets):
            while target and target not in modules:  # `import a.b.c` of a non-module attribute: its module
                target = target.rpartition(".")[0]
            if target and target != name:
                found.append((target, node.lineno, id(node) in inside))
    return found


def graph():
    modules = project_modules()
    entries = {name for name, tree in modules.items() if is_entry(name, tree)}
    edges = {name: imports(name, tree, modules) for name, tree in modules.items()}
    return modules, entries, edges


def test_the_import_graph_sees_every_package_entry_point_and_kind_of_import():
    modules, entries, edges = graph()
    assert {"slm_jax.model", "quant.provider", "checkpoints.manager", "train.loop", "train.bench.common"} <= set(modules)
    assert {"train.main", "train.generate", "train.evaluate", "train.bench.__main__", "quant.convert",
            "quant.report", "quant.merge", "checkpoints.inspect", "checkpoints.make_fixture"} <= entries
    assert "train.run" not in entries and "train.cli" not in entries
    assert "train.bench.quality" in {target for target, _, _ in edges["train.bench.main"]}  # from pkg import module
    probe = ast.parse("import quant.plan\nfrom train.run import load_run\n"
                      "def f():\n    from slm_jax import model\n    import os\n")
    assert sorted(imports("checkpoints.probe", probe, modules)) == [
        ("quant.plan", 1, False), ("slm_jax.model", 4, True), ("train.run", 2, False)]


def test_no_project_import_hides_inside_a_function():
    _, _, edges = graph()
    hidden = [f"{name}:{line} imports {target}" for name, found in edges.items() for target, line, inside in found
              if inside]
    assert not hidden, "project imports inside functions or classes:\n" + "\n".join(hidden)


def test_no_import_cycle():
    _, _, edges = graph()
    adjacency = {name: sorted({target for target, _, _ in found}) for name, found in edges.items()}
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(name: str, path: list[str]) -> list[str] | None:
        state[name] = 1
        for target in adjacency.get(name, ()):
            if state.get(target) == 1:
                return path + [name, target]
            if target not in state:
                cycle = visit(target, path + [name])
                if cycle:
                    return cycle
        state[name] = 2
        return None

    for name in sorted(adjacency):
        if name not in state:
            cycle = visit(name, [])
            assert cycle is None, "import cycle: " + " -> ".join(cycle[cycle.index(cycle[-1]):])


def test_library_modules_import_only_their_own_layer_and_those_below_and_never_an_entry_module():
    _, entries, edges = graph()
    wrong = []
    for name, found in edges.items():
        if name in entries:
            continue
        layer = LAYERS.index(name.split(".")[0])
        for target, line, _ in found:
            if target in entries:
                wrong.append(f"{name}:{line} imports the command-line module {target}")
            elif LAYERS.index(target.split(".")[0]) > layer:
                wrong.append(f"{name}:{line} imports {target}, a layer above it ({' <- '.join(LAYERS)})")
    assert not wrong, "\n".join(wrong)


BENCH_HELPERS = ("train.bench.common", "train.bench.profiles", "train.bench.trust",  # shared by every section
                 "train.bench.serve_speed",  # timing and models of the serving section and serve_ab
                 "train.bench.floor")  # the matmul floor of section 2 and of `python -m train.bench.matmul_floor`


def test_bench_sections_import_shared_helpers_never_each_other():
    modules, _, edges = graph()
    sections = [m for m in modules if m.startswith("train.bench.") and m not in BENCH_HELPERS
                and m.rsplit(".", 1)[1] not in ("main", "__main__", "serve_ab", "matmul_floor")]  # entry modules
    assert {"train.bench.speed", "train.bench.serving", "train.bench.report"} <= set(sections)
    wrong = [f"{s}:{line} imports {target}" for s in sections for target, line, _ in edges[s]
             if target.startswith("train.bench") and target not in BENCH_HELPERS]
    assert not wrong, "\n".join(wrong)
    helpers = [f"{h}:{line} imports {target}" for h in BENCH_HELPERS for target, line, _ in edges[h]
               if target.startswith("train.bench") and target not in BENCH_HELPERS]
    assert not helpers, "\n".join(helpers)
    assert not wrong, "\n".join(wrong)
