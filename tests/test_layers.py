"""The package layers, read from the source with ``ast`` (nothing is imported):

    core       models/tasks.py, models/paths.py, models/das/, models/backbones/, models/runtime.py
    producer   models/producer/        -> core
    bench      models/bench/           -> core
    cli        models/cli/             -> producer, bench, core
    service    service/                -> core
    loadtests  loadtests/              -> service, bench, core

plus one exception: bench and loadtests may use the synthetic world's scenes and words
(models/producer/world/scenes.py, language.py) to make realistic inputs. No import cycles, every
project import names a module that exists here, imports inside functions in models/ say why in a
comment, and no test module imports another test module (shared helpers live in tests/helpers.py).
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("models", "service", "loadtests")
ALLOWED = {
    "core": {"core"},
    "producer": {"producer", "core"},
    "bench": {"bench", "core"},
    "cli": {"cli", "producer", "bench", "core"},
    "service": {"service", "core"},
    "loadtests": {"loadtests", "service", "bench", "core"},
}
WORLD_INPUTS = {"models.producer.world.scenes", "models.producer.world.language"}  # the one exception
EXCEPTIONS = {"bench": WORLD_INPUTS, "loadtests": WORLD_INPUTS}


@dataclass(frozen=True)
class Import:
    source: str  # importing module
    path: str  # its file, relative to the repository
    line: int
    target: str  # imported module
    local: bool  # inside a function (or class), not at module level


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_files() -> dict[str, Path]:
    return {module_name(p): p for package in PACKAGES for p in sorted((REPO / package).rglob("*.py"))}


def layer(module: str) -> str:
    top, _, rest = module.partition(".")
    if top != "models":
        return top
    group = rest.split(".")[0]
    return group if group in ("producer", "bench", "cli") else "core"


def imports_of(module: str, path: Path, known: set[str]) -> list[Import]:
    tree = ast.parse(path.read_text(), filename=str(path))
    module_level = set()
    stack = list(tree.body)
    while stack:  # module-level statements, also inside top-level if / try blocks
        node = stack.pop()
        module_level.add(id(node))
        if isinstance(node, (ast.If, ast.Try)):
            stack += node.body + node.orelse + getattr(node, "finalbody", [])
            stack += [s for handler in getattr(node, "handlers", []) for s in handler.body]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        targets = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            # `from models.producer import world` imports the module models.producer.world
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        for target in dict.fromkeys(targets):
            if target.split(".")[0] in PACKAGES:
                found.append(Import(module, str(path.relative_to(REPO)), node.lineno, target,
                                    id(node) not in module_level))
    return found


def all_imports() -> list[Import]:
    files = project_files()
    known = set(files)
    return [imp for module, path in files.items() for imp in imports_of(module, path, known)]


def test_every_project_import_names_a_module_of_this_repository():
    known = set(project_files())
    missing = [f"{i.path}:{i.line} imports {i.target}, which is no module here" for i in all_imports()
               if i.target not in known]
    assert not missing, "\n".join(missing)


def test_imports_follow_the_layers():
    wrong = []
    for i in all_imports():
        source, target = layer(i.source), layer(i.target)
        if target not in ALLOWED[source] and i.target not in EXCEPTIONS.get(source, ()):
            wrong.append(f"{i.path}:{i.line} imports {i.target}: {source} may import "
                         f"{', '.join(sorted(ALLOWED[source]))} (not {target})")
    assert not wrong, "\n".join(wrong)


def test_no_import_cycles():
    edges: dict[str, dict[str, Import]] = {}
    for i in all_imports():
        if i.target != i.source:
            edges.setdefault(i.source, {}).setdefault(i.target, i)
    cycles, state = [], {}  # state: 1 = on the current path, 2 = done

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for target in sorted(edges.get(module, {})):
            if state.get(target) == 1:
                loop = path[path.index(target):] + [target]
                cycles.append(" -> ".join(
                    f"{edges[a][b].target} ({edges[a][b].path}:{edges[a][b].line})" for a, b in zip(loop, loop[1:])))
            elif target not in state:
                visit(target, path + [target])
        state[module] = 2

    for module in sorted(edges):
        if module not in state:
            visit(module, [module])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_imports_inside_functions_in_models_say_why():
    """An import inside a function in models/ has a comment on its line, or the comment line just above it
    (or above the block of imports it belongs to) says why."""
    silent = []
    for module, path in project_files().items():
        if not module.startswith("models"):
            continue
        lines = path.read_text().splitlines()
        tree = ast.parse("\n".join(lines))
        for function in ast.walk(tree):
            if not isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(function):
                if not isinstance(node, (ast.Import, ast.ImportFrom)):
                    continue
                row = node.lineno - 1
                if "#" in lines[row]:
                    continue
                above = row - 1
                while above >= 0 and (lines[above].strip().startswith(("import ", "from ")) or not lines[above].strip()):
                    if "#" in lines[above]:
                        break
                    above -= 1
                if above < 0 or "#" not in lines[above]:
                    silent.append(f"{path.relative_to(REPO)}:{node.lineno}: {lines[row].strip()}")
    assert not silent, "imports inside functions without a comment saying why:\n" + "\n".join(silent)


def test_no_test_module_imports_another():
    tests = REPO / "tests"
    # test modules and conftest; helper modules (helpers.py, readme.py) are what they may share
    local = {p.stem for p in tests.glob("test_*.py")} | {"conftest"}
    wrong = []
    for path in sorted(tests.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            wrong += [f"tests/{path.name}:{node.lineno} imports {name} (shared helpers go in tests/helpers.py)"
                      for name in names if name.split(".")[0] in local or name.startswith("tests.")]
    assert not wrong, "\n".join(wrong)


def test_loadtests_and_service_import_only_public_names_of_other_modules():
    """loadtests/ drives the service and models/ through their public names only (and service/ uses
    models/ that way): a leading-underscore name imported from another module is an internal that
    may move, as the split of service/registry.py into store, policy and registry showed."""
    private = []
    files = project_files()
    for module, path in files.items():
        if layer(module) not in ("loadtests", "service"):
            continue
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.ImportFrom) and not node.level and (node.module or "").split(".")[0] in PACKAGES:
                private += [f"{path.relative_to(REPO)}:{node.lineno} imports {node.module}.{a.name}"
                            for a in node.names if a.name.startswith("_") and node.module != module]
    assert not private, "\n".join(private)
