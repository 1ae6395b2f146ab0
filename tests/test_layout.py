"""The layout promises of docs/architecture.md §1, checked rather than hoped for."""

from __future__ import annotations

import ast
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
ROOMS = ("daemon", "connectors", "policies", "bench", "tests")


def _modules() -> list[Path]:
    return [p for room in ROOMS for p in (REPO / room).rglob("*.py") if p.name not in ("__init__.py", "conftest.py")]


def _imports(path: Path) -> set[str]:
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
    return out


def test_no_two_modules_share_a_base_name():
    by_name: dict[str, list[str]] = defaultdict(list)
    for p in _modules():
        by_name[p.stem].append(str(p.relative_to(REPO)))
    assert {k: v for k, v in by_name.items() if len(v) > 1} == {}


def test_no_module_is_named_like_a_top_level_package():
    """`python bench/x.py` puts bench/ first on sys.path, where a bench/policies.py would be imported as `policies`:
    no module or folder inside a room takes the name of a room (two modules sharing a name: the test above)."""
    files = [p for p in _modules() if p.stem in ROOMS]
    folders = [p for room in ROOMS for p in (REPO / room).rglob("*") if p.is_dir() and p.name in ROOMS]
    assert [str(p.relative_to(REPO)) for p in files + folders] == []


def test_modules_stay_small_enough_to_read():
    """issue 22: a module a newcomer can read. The round engine's modules stay under 400 lines, the state machine that
    drives the phases fits on a screen, and no module anywhere passes 800 lines."""
    lines = {str(p.relative_to(REPO)): len(p.read_text(encoding="utf-8").splitlines()) for p in _modules()}
    assert {k: n for k, n in lines.items() if n > 800} == {}
    assert {k: n for k, n in lines.items() if k.startswith("daemon/rounds/") and n > 400} == {}
    tree = ast.parse((REPO / "daemon" / "rounds" / "state_machine.py").read_text(encoding="utf-8"))
    drive = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "drive")
    assert drive.end_lineno is not None and drive.end_lineno - drive.lineno < 150


def test_import_arrows_point_one_way():
    def ours(mods: set[str], *rooms: str) -> set[str]:
        return {m for m in mods if m.split(".")[0] in rooms}

    for p in (REPO / "policies").glob("*.py"):
        assert ours(_imports(p), "daemon", "connectors", "bench", "tests") == set(), p.name
    for p in (REPO / "connectors").glob("*.py"):
        assert ours(_imports(p), "daemon", "bench", "tests") == set(), p.name
    for p in (REPO / "daemon" / "jobs").glob("*.py"):
        bad = {m for m in ours(_imports(p), "daemon", "connectors") if not m.startswith("daemon.jobs")}
        assert bad == set(), p.name
    for p in (REPO / "daemon").glob("*.py"):  # the process: jobs only through their torch-free specs, never dev tooling
        bad = {m for m in ours(_imports(p), "daemon") if m.startswith("daemon.jobs") and m != "daemon.jobs.specs"}
        bad |= {m for m in ours(_imports(p), "daemon") if m.startswith("daemon.dev") and p.name != "cli.py"}
        assert bad == set(), p.name


def test_the_process_imports_neither_torch_nor_dev_tooling():
    """Nor the mlflow package: experiment tracking speaks MLflow's REST API (connectors/mlflow_rest.py)."""
    heavy = ("torch", "transformers", "peft", "mlflow")
    code = (
        "import sys, daemon.app, daemon.cli, daemon.api, daemon.rounds.runner, daemon.ingest, connectors.vllm; "
        f"print(sorted(m for m in sys.modules if m.split('.')[0] in {heavy!r} or m.startswith('daemon.dev')))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]"


def test_nothing_points_outside_the_repository():
    outside = "../" + "shared"  # spelled in two parts so this file does not match itself
    files = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    hits = [f for f in files if (REPO / f).is_file() and outside in (REPO / f).read_text(encoding="utf-8", errors="replace")]
    assert hits == []
