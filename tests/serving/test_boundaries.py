"""Package boundaries: the service never imports the trainer; schemas never import torch."""

from __future__ import annotations

import ast
import subprocess
import sys

from tests.serving.artifacts import REPO


def test_serving_never_imports_trainer():
    for path in sorted((REPO / "serving").rglob("*.py")):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names = (
                [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else ([node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            )
            assert not any(n == "trainer" or n.startswith("trainer.") for n in names), (
                f"{path} imports {names}"
            )
    code = (
        "import sys, serving.main, serving.__main__\n"
        "bad = sorted(m for m in sys.modules if m == 'trainer' or m.startswith(('trainer.', 'torchrec', 'fbgemm')))\n"
        "assert not bad, bad\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-2000:]


def test_schemas_never_import_torch():
    code = (
        "import sys, schemas, schemas.api, schemas.artifact, schemas.storage\n"
        "assert 'torch' not in sys.modules and 'numpy' in sys.modules\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-2000:]
