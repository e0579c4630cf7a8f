"""The layering flatlm keeps, checked: the import contracts of pyproject.toml ([tool.importlinter], run with
``lint-imports``) and one rule import-linter cannot state: no module but ``flatlm/parallel/collectives.py`` calls a
torch.distributed collective. Both checkers are shown to catch planted violations.
"""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
COLLECTIVES_MODULE = Path("flatlm/parallel/collectives.py")

# torch.distributed functions that communicate (or wait for every rank), by their public and private names.
COLLECTIVES = frozenset(
    {
        "all_reduce",
        "all_reduce_coalesced",
        "broadcast",
        "broadcast_object_list",
        "all_gather",
        "all_gather_into_tensor",
        "all_gather_object",
        "all_gather_coalesced",
        "_all_gather_base",
        "gather",
        "gather_object",
        "scatter",
        "scatter_object_list",
        "reduce",
        "reduce_scatter",
        "reduce_scatter_tensor",
        "_reduce_scatter_base",
        "all_to_all",
        "all_to_all_single",
        "barrier",
        "monitored_barrier",
        "send",
        "recv",
        "isend",
        "irecv",
        "batch_isend_irecv",
        "send_object_list",
        "recv_object_list",
    }
)
# Modules whose every function is a collective (torch's functional collectives) or that hold the raw ones.
COLLECTIVE_MODULES = ("torch.distributed._functional_collectives", "torch.distributed.distributed_c10d")


def _lint_imports(cwd: Path) -> subprocess.CompletedProcess[str]:
    """``lint-imports`` with the project's contracts, on the ``flatlm`` package found in ``cwd``."""
    command = "import sys; from importlinter.cli import lint_imports_command; sys.exit(lint_imports_command())"
    return subprocess.run(
        [sys.executable, "-c", command, "--no-logo", "--no-cache", str(ROOT / "pyproject.toml")],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
    )


def _broken(output: str) -> dict[str, str]:
    """The broken contracts in ``lint-imports`` output: {contract name: its report} (whitespace collapsed, since
    lint-imports wraps long lines)."""
    from importlinter.api import read_configuration

    names = [c["name"] for c in read_configuration(str(ROOT / "pyproject.toml"))["contracts_options"]]
    if "Broken contracts" not in output:
        return {}
    section = " ".join(output.split("Broken contracts", 1)[1].split())
    starts = sorted((section.find(" ".join(n.split())), n) for n in names if " ".join(n.split()) in section)
    ends = [s for s, _ in starts[1:]] + [len(section)]
    return {name: section[start:end] for (start, name), end in zip(starts, ends, strict=True)}


@pytest.mark.timeout(180)
def test_import_contracts_hold() -> None:
    r = _lint_imports(ROOT)
    assert r.returncode == 0, r.stdout[-6000:] + r.stderr[-2000:]


PLANTED = {
    # module -> (source, the contract it breaks, the import line lint-imports must name)
    "flatlm/models/_planted.py": (
        "import torch.distributed as dist\n",
        "models and optimizer math import nothing distributed",
        "flatlm.models._planted -> torch.distributed",
    ),
    "flatlm/optim/_planted.py": (
        "def f():\n    from flatlm.parallel import collectives\n    return collectives\n",  # a lazy import counts
        "models and optimizer math never import parallel, train, data or launch",
        "flatlm.optim._planted -> flatlm.parallel.collectives",
    ),
    "flatlm/data/_planted.py": (
        "from flatlm.optim import registry\n",
        "data never imports parallel, train or optim",
        "flatlm.data._planted -> flatlm.optim.registry",
    ),
    "flatlm/parallel/_planted.py": (
        "def f():\n    import flatlm.train.checkpoint\n",
        "parallel never imports train",
        "flatlm.parallel._planted -> flatlm.train.checkpoint",
    ),
}


@pytest.mark.timeout(180)
def test_import_contracts_catch_planted_violations(tmp_path: Path) -> None:
    shutil.copytree(ROOT / "flatlm", tmp_path / "flatlm", ignore=shutil.ignore_patterns("__pycache__"))
    for name, (source, _, _) in PLANTED.items():
        (tmp_path / name).write_text(source)
    r = _lint_imports(tmp_path)
    assert r.returncode != 0, r.stdout[-4000:]
    broken = _broken(r.stdout)
    for name, (_, contract, line) in PLANTED.items():
        report = next((text for c, text in broken.items() if c.startswith(contract)), "")
        assert line in report, (name, contract, r.stdout[-4000:])
    composition = next(text for c, text in broken.items() if c.startswith("train is the composition root"))
    assert PLANTED["flatlm/parallel/_planted.py"][2] in composition


def collective_calls(source: str, filename: str = "<module>") -> list[str]:
    """``file:line name`` for every reference to a torch.distributed collective in ``source``: ``dist.all_reduce``
    (any alias of torch.distributed), ``torch.distributed.barrier``, a collective imported by name, or anything of
    torch's functional-collectives / c10d modules. References count, not only calls (``f = dist.broadcast``)."""
    tree = ast.parse(source, filename)
    dist_aliases: set[str] = set()  # names bound to torch.distributed
    torch_aliases: set[str] = set()  # names bound to torch
    direct: dict[str, str] = {}  # local name -> collective imported from torch.distributed
    found: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name == "torch.distributed" and a.asname:
                    dist_aliases.add(a.asname)
                elif a.name.startswith("torch"):
                    torch_aliases.add(a.asname or "torch")
                if a.name.startswith(COLLECTIVE_MODULES):
                    found.append(f"{filename}:{node.lineno} import {a.name}")
        elif isinstance(node, ast.ImportFrom) and node.module:
            for a in node.names:
                if node.module == "torch" and a.name == "distributed":
                    dist_aliases.add(a.asname or a.name)
                elif node.module == "torch.distributed" and a.name in COLLECTIVES:
                    direct[a.asname or a.name] = a.name
                    found.append(f"{filename}:{node.lineno} from torch.distributed import {a.name}")
                elif node.module == "torch.distributed" and f"torch.distributed.{a.name}".startswith(
                    COLLECTIVE_MODULES
                ):
                    found.append(f"{filename}:{node.lineno} from torch.distributed import {a.name}")
            if node.module.startswith(COLLECTIVE_MODULES):
                found.append(f"{filename}:{node.lineno} from {node.module} import ...")

    def is_dist(expr: ast.expr) -> bool:
        if isinstance(expr, ast.Name):
            return expr.id in dist_aliases
        return (
            isinstance(expr, ast.Attribute)
            and expr.attr == "distributed"
            and isinstance(expr.value, ast.Name)
            and expr.value.id in torch_aliases
        )

    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr in COLLECTIVES and is_dist(node.value):
            found.append(f"{filename}:{node.lineno} {ast.unparse(node)}")
        elif isinstance(node, ast.Name) and node.id in direct and not isinstance(node.ctx, ast.Store):
            found.append(f"{filename}:{node.lineno} {node.id}")
    return sorted(set(found))


def test_only_the_collectives_module_calls_collectives() -> None:
    found = []
    for path in sorted((ROOT / "flatlm").rglob("*.py")):
        rel = path.relative_to(ROOT)
        if rel != COLLECTIVES_MODULE:
            found += collective_calls(path.read_text(), str(rel))
    assert not found, "torch.distributed collectives outside flatlm/parallel/collectives.py:\n" + "\n".join(found)


@pytest.mark.parametrize(
    "source",
    [
        "import torch.distributed as dist\ndef f(x):\n    dist.all_reduce(x)\n",
        "import torch\ndef f():\n    torch.distributed.barrier()\n",
        "from torch import distributed as d\nop = d.broadcast_object_list\n",
        "from torch.distributed import all_gather_object as g\ndef f(a, b):\n    g(a, b)\n",
        "import torch.distributed._functional_collectives as funcol\n",
        "import torch.distributed as dist\nclass A:\n    def f(self, x):\n        return dist.all_to_all_single(x)\n",
    ],
)
def test_collective_checker_catches_planted_calls(source: str) -> None:
    assert collective_calls(source), source


def test_collective_checker_allows_what_is_not_communication() -> None:
    source = (
        "import torch.distributed as dist\nimport torch\n"
        "def f():\n    return dist.is_initialized(), dist.get_rank(), dist.ReduceOp.SUM\n"
        "def g():\n    return torch.distributed.is_available()\n"
    )
    assert collective_calls(source) == []
