"""The package's shape: one importable `fusionrec`, no import cycles, no lazy imports of its
own modules, the public API in `__all__`, and no deep-learning library loaded by the
serving and evaluation imports."""

from __future__ import annotations

import ast
import os
import pydoc
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

import fusionrec

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "fusionrec"
NOT_PACKAGE = {"tests", "bench", "data", "docs", "build", "artifacts"}  # top-level folders outside the package

# Files still allowed a function-level import of a fusionrec module, each with its reason.
# Empty when the package is clean; `test_allowlist_is_not_stale` fails once a file is fixed,
# so an entry cannot outlive its reason.
LAZY_IMPORT_ALLOWLIST: dict[str, str] = {}

HEAVY = ("torch", "transformers", "timm", "librosa")


def package_files() -> dict[str, Path]:
    """Module name -> file, for every module of the installed package (the repository root)."""
    out: dict[str, Path] = {}
    for path in sorted(ROOT.rglob("*.py")):
        rel = path.relative_to(ROOT)
        if rel.parts[0] in NOT_PACKAGE or any(p.startswith(".") for p in rel.parts):
            continue
        parts = list(rel.with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join([PACKAGE, *parts])] = path
    return out


MODULES = package_files()


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _targets(node: ast.Import | ast.ImportFrom, module: str) -> list[str]:
    """The fusionrec modules an import statement loads (the deepest module each name resolves to)."""
    if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
    else:
        base = node.module or ""
        if node.level:  # relative import: resolve against this module's package
            pkg = module.split(".")
            if module not in {m for m, p in MODULES.items() if p.name == "__init__.py"}:
                pkg = pkg[:-1]
            pkg = pkg[:len(pkg) - node.level + 1]
            base = ".".join([*pkg, base] if base else pkg)
        names = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]
    return sorted({n for n in names if n == PACKAGE or n.startswith(PACKAGE + ".")})


def import_graph() -> tuple[dict[str, set[str]], dict[str, list[str]]]:
    """(module -> modules it imports when it is imported, file -> function-level fusionrec imports).

    Imports under `if TYPE_CHECKING:` run only for the type checker and are left out.
    """
    graph: dict[str, set[str]] = {m: set() for m in MODULES}
    lazy: dict[str, list[str]] = {}

    def visit(node: ast.AST, module: str, rel: str, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child.test):
                for sub in child.orelse:
                    visit(sub, module, rel, in_function)
                continue
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                targets = _targets(child, module)
                if targets and in_function:
                    lazy.setdefault(rel, []).append(f"{rel}:{child.lineno} imports {', '.join(targets)}")
                elif not in_function:
                    graph[module].update(t for t in targets if t != module)
                continue
            visit(child, module, rel, in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef,
                                                                         ast.Lambda)))

    for module, path in MODULES.items():
        visit(ast.parse(path.read_text(encoding="utf-8"), str(path)), module, path.relative_to(ROOT).as_posix(),
              False)
    return graph, lazy


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as [a, b, ..., a], or None."""
    state: dict[str, int] = {}  # 1: on the stack, 2: done
    stack: list[str] = []

    def dfs(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*stack[stack.index(nxt):], nxt]
            if nxt not in state and (found := dfs(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := dfs(node)):
            return found
    return None


def test_the_package_modules_are_found() -> None:
    assert {"fusionrec", "fusionrec.cli", "fusionrec.jobs", "fusionrec.pipeline.embedding.job",
            "fusionrec.ranker.serving.recommender", "fusionrec.evaluation.offline"} <= set(MODULES)
    assert not any(m.startswith(("fusionrec.tests", "fusionrec.bench")) for m in MODULES)


def test_no_import_cycle() -> None:
    graph, _ = import_graph()
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_find_cycle_names_the_cycle() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_function_level_import_of_the_package() -> None:
    _, lazy = import_graph()
    offending = [line for rel, lines in sorted(lazy.items()) if rel not in LAZY_IMPORT_ALLOWLIST for line in lines]
    assert not offending, "function-level imports of fusionrec modules (import them at module level):\n" + \
        "\n".join(offending)


def test_allowlist_is_not_stale() -> None:
    _, lazy = import_graph()
    stale = sorted(set(LAZY_IMPORT_ALLOWLIST) - set(lazy))
    assert not stale, f"no longer has function-level imports, remove from LAZY_IMPORT_ALLOWLIST: {stale}"


def test_public_api_imports_and_is_documented() -> None:
    assert fusionrec.__all__, "fusionrec.__all__ is empty"
    assert len(set(fusionrec.__all__)) == len(fusionrec.__all__)
    text = pydoc.render_doc(fusionrec, renderer=pydoc.plaintext)
    for name in fusionrec.__all__:
        assert getattr(fusionrec, name) is not None, name
        assert name in text, f"help(fusionrec) does not list {name}"
    namespace: dict[str, object] = {}
    exec("from fusionrec import *", namespace)  # noqa: S102 - the star import is what is under test
    assert set(fusionrec.__all__) <= set(namespace)


def _run(code: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONSTARTUP", "PYTHONHOME")}
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300, check=False)


@pytest.mark.parametrize("name", ["cli", "pipeline", "ranker", "evaluation", "jobs"])
def test_only_fusionrec_is_importable_outside_the_checkout(tmp_path: Path, name: str) -> None:
    code = (f"try:\n    import {name}\nexcept ModuleNotFoundError:\n    print('absent')\n"
            f"else:\n    print('present', {name}.__file__)\n")
    result = _run(code, tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "absent", f"`import {name}` works outside the checkout: {result.stdout}"


def test_fusionrec_imports_outside_the_checkout(tmp_path: Path) -> None:
    result = _run("import fusionrec, fusionrec.cli; print(fusionrec.__file__)", tmp_path)
    assert result.returncode == 0, result.stderr
    assert Path(result.stdout.strip()).resolve() == ROOT / "__init__.py"


def test_serving_and_evaluation_imports_load_no_deep_learning_library(tmp_path: Path) -> None:
    code = ("import sys\n"
            "import fusionrec, fusionrec.ranker.serving.recommender, fusionrec.evaluation.offline\n"
            f"print(' '.join(m for m in {HEAVY!r} if m in sys.modules))\n")
    result = _run(code, tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "", f"importing fusionrec loads {result.stdout.strip()}"


# Libraries serving (`recommend`, `score`, `evaluate`) must not load: deep learning, and what
# only other commands need (Ray, implicit, MLflow; matplotlib and Jinja2 draw `--report`).
NOT_SERVING = (*HEAVY, "ray", "implicit", "mlflow", "matplotlib", "jinja2")


def test_the_command_line_and_its_serving_commands_load_no_deep_learning_library(tmp_path: Path) -> None:
    """`fusionrec recommend|score|evaluate` as the entry point runs them (here on an empty
    artifacts directory: they stop at the first artifact, after loading what they need);
    tests/test_cli.py checks the same on trained artifacts."""
    code = ("import sys\n"
            "from fusionrec.cli import main\n"
            f"out = {str(tmp_path / 'art')!r}\n"
            "for args in (['recommend', '--out', out, '-q'],\n"
            "             ['score', '--out', out, '--candidates', out + '.csv', '--export', out + '.parquet', '-q'],\n"
            "             ['evaluate', '--out', out, '--test', out + '.csv', '-q']):\n"
            "    try:\n"
            "        main(args)\n"
            "    except SystemExit as exc:\n"
            "        assert exc.code not in (0, None), args\n"
            f"print(' '.join(m for m in {NOT_SERVING!r} if m in sys.modules))\n")
    (tmp_path / "art.csv").write_text("user_id,item_id,timestamp\nu1,i1,1\n")
    result = _run(code, tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "", f"the serving commands load {result.stdout.strip()}"


def test_every_subpackage_is_in_the_distribution() -> None:
    """pyproject's explicit package list is what a wheel (a non-editable install) holds; the
    editable install serves every folder, so a missing entry only fails for users. Before,
    `fusionrec.pipeline.batch` (the streamed nightly path) was left out."""
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {PACKAGE} | {
        ".".join((PACKAGE, *init.parent.relative_to(ROOT).parts)) for init in ROOT.rglob("__init__.py")
        if init.parent != ROOT and init.relative_to(ROOT).parts[0] not in NOT_PACKAGE | {".venv"}}
    assert listed == found
