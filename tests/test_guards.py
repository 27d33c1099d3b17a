"""scripts/check_guards.py: torch internals only in ops/_torch_compat.py, matplotlib.use only in
experiments/plotting.py. The tree passes, and each rule catches what it is for."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "check_guards.py"


@pytest.fixture(scope="module")
def guards():
    spec = importlib.util.spec_from_file_location("check_guards", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_tree_passes(guards, capsys):
    assert guards.main([]) == 0, capsys.readouterr().out


@pytest.mark.parametrize(
    "source",
    [
        "import torch\nx = torch._C._functorch.is_batchedtensor(t)\n",
        "import torch._functorch.pyfunctorch\n",
        "from torch._C import _functorch\n",
        "from torch import _C\n",
        "import torch\ntorch._int_mm(a, b)\n",
        "import torch\ntorch._foreach_add_(xs, 1.0)\n",
        "import matplotlib\nmatplotlib.use('Agg')\n",
    ],
)
def test_each_rule_catches_its_case(guards, tmp_path, source):
    path = tmp_path / "module.py"
    path.write_text(source)
    findings = guards.check_file(path)
    assert len(findings) == 1 and ":" in findings[0], findings


def test_names_in_docstrings_and_public_torch_are_fine(guards, tmp_path):
    path = tmp_path / "module.py"
    path.write_text('"""Uses torch._int_mm through the compat module."""\nimport torch\ny = torch.mm(a, b)\n')
    assert guards.check_file(path) == []
