"""The layers of the project and the direction of their imports (README, "Project layout").

    pipelines/     recipes: imports mmcl and shards_tools
    mmcl/          training, models, losses, weighting, eval: imports shards_tools
    shards_tools/  sharding, the shard-set contract, readers of untrusted data: imports neither, nor torch

Inside mmcl the subpackages are layered too (ALLOWED below). The one module that may look upward is the
`mmcl` command's entry point, mmcl/cli.py, which registers `mmcl demo` from pipelines/, inside a function.
Every import statement counts, at module level or inside a function. tests/ and bench/ are apart the same
way: bench/ may import the tests' helper modules, tests/ never imports bench/ (the files of RUN_BENCH_SCRIPTS
run bench scripts as commands, by path, to check that they still run: no import).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("shards_tools", "mmcl", "pipelines")
# mmcl's parts, and which other parts each may import (besides itself and shards_tools)
ALLOWED = {
    "mmcl.errors": set(),
    "mmcl.checkpoint_folder": {"mmcl.errors"},
    "mmcl.host_memory": set(),
    "mmcl.losses": set(),
    "mmcl.data": {"mmcl.errors", "mmcl.host_memory"},
    "mmcl.models": {"mmcl.errors"},
    "mmcl.noise": {"mmcl.errors", "mmcl.losses"},
    "mmcl.eval": {"mmcl.errors", "mmcl.checkpoint_folder", "mmcl.data", "mmcl.host_memory", "mmcl.models"},
    "mmcl.config": {"mmcl.errors", "mmcl.data", "mmcl.eval", "mmcl.models", "mmcl.noise"},
    "mmcl.export": {"mmcl.errors", "mmcl.checkpoint_folder", "mmcl.eval", "mmcl.models"},
    "mmcl.convert": {"mmcl.errors", "mmcl.models"},
    "mmcl.curate": {"mmcl.errors", "mmcl.data", "mmcl.eval", "mmcl.host_memory", "mmcl.models", "mmcl.noise"},
    "mmcl.train": {
        "mmcl.errors",
        "mmcl.checkpoint_folder",
        "mmcl.config",
        "mmcl.data",
        "mmcl.eval",
        "mmcl.host_memory",
        "mmcl.losses",
        "mmcl.models",
        "mmcl.noise",
    },  # fmt: skip
}
ENTRY_POINTS = {"mmcl", "mmcl.__main__", "mmcl.cli"}  # the package itself re-exports only __version__
RUN_BENCH_SCRIPTS = {"test_gpu_bench_smoke.py"}  # tests that run a bench script in a subprocess (--smoke)


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports() -> list[tuple[str, str, bool]]:
    """(importing module, imported module, whether the import sits inside a function) for every import of a
    project module in the three packages."""
    found = []
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            tree = ast.parse(path.read_text("utf-8"))
            importer = module_name(path)
            lazy = {id(n) for f in ast.walk(tree) if isinstance(f, ast.FunctionDef | ast.AsyncFunctionDef)
                    for n in ast.walk(f)}  # fmt: skip
            for node in ast.walk(tree):
                if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module]
                elif isinstance(node, ast.Import):
                    names = [alias.name for alias in node.names]
                else:
                    continue
                found += [(importer, n, id(node) in lazy) for n in names if n.split(".")[0] in PACKAGES]
    return found


def part(module: str) -> str:
    """The layer a module of mmcl belongs to: its subpackage, or the top-level module itself."""
    return ".".join(module.split(".")[:2])


def test_packages_import_downward_only() -> None:
    ranks = {name: rank for rank, name in enumerate(PACKAGES)}
    upward = [
        (importer, imported, lazy)
        for importer, imported, lazy in imports()
        if ranks[imported.split(".")[0]] > ranks[importer.split(".")[0]]
    ]
    assert all(importer == "mmcl.cli" and lazy for importer, _, lazy in upward), upward
    assert any(imported.startswith("pipelines") for _, imported, _ in upward)  # the one allowed: `mmcl demo`


def test_mmcl_parts_import_only_the_layers_below() -> None:
    wrong = []
    for importer, imported, _ in imports():
        if not (importer.startswith("mmcl") and imported.startswith("mmcl")) or part(importer) == part(
            imported
        ):
            continue
        if part(importer) in ENTRY_POINTS:
            continue
        assert part(importer) in ALLOWED, f"{importer}: a new part of mmcl; give it a layer in ALLOWED"
        if part(imported) not in ALLOWED[part(importer)] and imported != "mmcl":
            wrong.append(f"{importer} imports {imported}")
    assert not wrong, wrong


def test_tests_never_import_the_benchmarks() -> None:
    """bench/ may build on the tests' helpers (media files, corpora, process tools), never the reverse, and
    nothing imports conftest.py, which holds fixtures only."""
    offenders = []
    for path in sorted(p for p in (REPO / "tests").glob("*.py") if p.name != Path(__file__).name):
        runs_scripts = path.name in RUN_BENCH_SCRIPTS
        for node in ast.walk(ast.parse(path.read_text("utf-8"))):
            names = [node.module] if isinstance(node, ast.ImportFrom) and node.module else []
            names += [alias.name for alias in node.names] if isinstance(node, ast.Import) else []
            offenders += [f"{path.name}: {n}" for n in names if n.split(".")[0] in ("bench", "conftest")]
            if (
                isinstance(node, ast.Constant) and node.value == "bench" and not runs_scripts
            ):  # REPO / "bench" / ...: loading by path
                offenders.append(f"{path.name}: builds a path into bench/")
    for path in sorted((REPO / "bench").glob("*.py")):
        text = path.read_text("utf-8")
        if "from conftest import" in text or "import conftest" in text:
            offenders.append(f"{path.name}: imports conftest")
    assert not offenders, offenders


def test_the_sharding_tools_never_import_torch() -> None:
    """Every shards_tools module imports without torch (sharding workers start fast on CPU-only nodes; the
    audio resampler imports torch inside the function that needs it)."""
    modules = sorted(module_name(p) for p in (REPO / "shards_tools").rglob("*.py"))
    code = (
        f"import importlib, sys; [importlib.import_module(m) for m in {modules!r}]; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'mmcl', 'pipelines')))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True
    )
    assert result.stdout.strip() == "[]"
