"""The house's rules, checked on the source (docs/design.md, "The house"): no import circle, no
import running back up the floors, no service importing another, no private name taken from
another room, no citation of a document outside the repository, rooms and functions of a size a
reader can hold. Every check reads the files with `ast`; nothing is imported."""

from __future__ import annotations

import ast
import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("deepeyes", "services", "trainer", "bench")
FLOOR = {"deepeyes": 0, "services": 1, "trainer": 2, "bench": 3}  # an import may only go down or sideways

# Files allowed over MAX_FILE_LINES, each with the reason it must stay whole.
MAX_FILE_LINES = 500
LARGE_FILES: dict[str, str] = {}
# Functions allowed over MAX_FUNCTION_LINES, each with its reason.
MAX_FUNCTION_LINES = 100
LONG_FUNCTIONS: dict[str, str] = {}


def _modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = path
    return out


MODULES = _modules()


def _imports(path: Path) -> list[tuple[str, list[str], int]]:
    """(module imported from, names taken, line) for every import in the file, at any depth."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(a.name, [], node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.append((node.module, [a.name for a in node.names], node.lineno))
    return out


def _targets(module: str, names: list[str]) -> set[str]:
    """The project modules an import statement loads (a name may be a submodule)."""
    found = set()
    if module in MODULES:
        found.add(module)
    for n in names:
        if f"{module}.{n}" in MODULES:
            found.add(f"{module}.{n}")
    return found


def _graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for name, path in MODULES.items():
        edges = set()
        for module, names, _ in _imports(path):
            edges |= _targets(module, names)
        edges.discard(name)
        graph[name] = edges
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_the_cycle_finder_finds_a_planted_circle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _cycles(graph) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_circle_between_project_modules():
    assert _cycles(_graph()) == []


def test_imports_go_down_the_floors_and_services_never_import_each_other():
    bad = []
    for name, path in MODULES.items():
        top = name.split(".")[0]
        for module, names, line in _imports(path):
            for target in _targets(module, names):
                ttop = target.split(".")[0]
                if FLOOR[ttop] > FLOOR[top]:
                    bad.append(f"{path.relative_to(ROOT)}:{line} imports {target} (a floor above)")
                if top == ttop == "services" and name.split(".")[1] != target.split(".")[1]:
                    bad.append(f"{path.relative_to(ROOT)}:{line} imports {target} (another service: "
                               f"put the shared type in deepeyes/contracts.py)")
    assert bad == []


def test_no_private_name_is_imported_from_another_module():
    bad = [f"{path.relative_to(ROOT)}:{line} takes {n} from {module}"
           for path in MODULES.values() for module, names, line in _imports(path)
           if module.split(".")[0] in PACKAGES for n in names if n.startswith("_") and not n.startswith("__")]
    assert bad == []


def _tracked_text_files() -> list[Path]:
    listed = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    return [ROOT / f for f in listed if f.endswith((".py", ".md", ".yaml", ".yml", ".sh", ".toml", ".js", ".txt"))
            and (ROOT / f).exists()]


def test_no_citation_of_a_document_outside_the_repository():
    pattern = re.compile(r"DESIGN section|DESIGN \d|DESIGN\.md|\.\./shared/")
    me = Path(__file__).resolve()
    bad = [f"{p.relative_to(ROOT)}:{i}" for p in _tracked_text_files() if p.resolve() != me
           for i, line in enumerate(p.read_text(errors="replace").splitlines(), 1) if pattern.search(line)]
    assert bad == []


def test_design_sections_cited_in_the_code_exist():
    titles = {m.group(1).strip() for m in re.finditer(r"^#{2,3} (.+)$", (ROOT / "docs/design.md").read_text(), re.M)}
    cited = re.compile(r'docs/design\.md, "([^"]+)"')
    missing = [f"{p.relative_to(ROOT)}:{i} cites {m.group(1)!r}" for p in _tracked_text_files()
               for i, line in enumerate(p.read_text(errors="replace").splitlines(), 1)
               for m in cited.finditer(line) if m.group(1) not in titles]
    assert missing == []


def test_files_and_functions_are_of_a_readable_size():
    too_big = []
    for p in _tracked_text_files():
        rel = str(p.relative_to(ROOT))
        if p.suffix == ".py" and rel.split("/")[0] in PACKAGES + ("tests",):
            n = len(p.read_text().splitlines())
            if n > MAX_FILE_LINES and rel not in LARGE_FILES:
                too_big.append(f"{rel}: {n} lines")
    too_long = []
    for name, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                key = f"{path.relative_to(ROOT)}::{node.name}"
                if n > MAX_FUNCTION_LINES and key not in LONG_FUNCTIONS:
                    too_long.append(f"{key}: {n} lines")
    assert too_big == [] and too_long == []


@pytest.mark.parametrize("name", ["deepeyes.contracts", "deepeyes.boxes"])
def test_the_ground_floor_contracts_import_no_service(name):
    assert not {t for m, n, _ in _imports(MODULES[name]) for t in _targets(m, n) if not t.startswith("deepeyes")}


def _commented(lines: list[str], lineno: int) -> bool:
    """A comment on the import's line, on an import of the same run just above, or on the line above the run."""
    j = lineno - 1
    if "#" in lines[j]:
        return True
    j -= 1
    while j >= 0 and (not lines[j].strip() or lines[j].strip().startswith(("import ", "from "))):
        if "#" in lines[j]:
            return True
        j -= 1
    return j >= 0 and "#" in lines[j] and not lines[j].lstrip().startswith(("def ", "async def "))


def test_every_import_inside_a_function_says_why():
    bad = []
    for path in MODULES.values():
        src = path.read_text()
        lines = src.splitlines()
        for fn in ast.walk(ast.parse(src)):
            if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                bad += [f"{path.relative_to(ROOT)}:{n.lineno}: {lines[n.lineno - 1].strip()}" for n in ast.walk(fn)
                        if isinstance(n, (ast.Import, ast.ImportFrom)) and not _commented(lines, n.lineno)]
    assert sorted(set(bad)) == []
