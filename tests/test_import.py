"""Import hygiene (issue 2 §4): each case in a fresh interpreter (``sys.executable -c``).

The pytest process has already imported subriemann (which sets
``GEOMSTATS_BACKEND=pytorch`` in ``os.environ``), so every child gets an
environment with that variable removed or set explicitly.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from tests.helpers import REPO_ROOT

ROOT = str(REPO_ROOT)


def _run(code: str, backend: str | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "GEOMSTATS_BACKEND"}
    if backend is not None:
        env["GEOMSTATS_BACKEND"] = backend
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )


def _ok(code: str, backend: str | None = None) -> str:
    res = _run(code, backend)
    assert res.returncode == 0, res.stderr
    return res.stdout


def test_import_keeps_float32_default_dtype():
    out = _ok(
        """
        import torch
        assert torch.get_default_dtype() == torch.float32
        import subriemann, geomstats.backend as gs
        print(torch.get_default_dtype(), gs.__name__)
        """
    )
    assert out.split() == ["torch.float32", "geomstats.pytorch"]


def test_import_keeps_a_user_float64_default_dtype():
    out = _ok(
        """
        import torch
        torch.set_default_dtype(torch.float64)
        import subriemann
        print(torch.get_default_dtype())
        """
    )
    assert out.strip() == "torch.float64"


def test_default_dtype_unchanged_by_use():
    """Building a space, equipping metrics and taking gradients leaves float32 in place."""
    out = _ok(
        """
        import torch, subriemann as sr
        torch.manual_seed(0)
        net = torch.nn.Sequential(torch.nn.Linear(2, 6), torch.nn.Tanh(), torch.nn.Linear(6, 1))
        space = sr.ParameterSpace(net, torch.randn(4, 2), torch.randn(4, 1))
        theta = space.initial_point()
        space.equip_with_metric(sr.metrics.OutputPullbackMetric)
        space.metric.gradient(theta)
        assert sr.check_gradient(space, theta).passed
        print(torch.get_default_dtype(), torch.zeros(1).dtype)
        """
    )
    assert out.split() == ["torch.float32", "torch.float32"]


@pytest.mark.parametrize(
    "code, backend",
    [
        ("import geomstats\nimport subriemann", None),  # geomstats' default: numpy
        ("import geomstats\nimport subriemann", "numpy"),
        ("import subriemann", "numpy"),  # asked for numpy, not yet imported
        (  # imported with numpy, then the variable changed: still numpy
            "import geomstats, os\nos.environ['GEOMSTATS_BACKEND'] = 'pytorch'\nimport subriemann",
            None,
        ),
    ],
    ids=["geomstats-first", "geomstats-first-numpy", "env-numpy", "env-changed-too-late"],
)
def test_other_geomstats_backend_raises_a_helpful_import_error(code, backend):
    res = _run(code, backend)
    assert res.returncode != 0
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith("ImportError: subriemann needs geomstats' 'pytorch' backend")
    assert "'numpy' backend" in last
    assert "Set the environment variable GEOMSTATS_BACKEND=pytorch" in last
    assert "restart Python" in last


def test_geomstats_backend_pytorch_preset_works():
    out = _ok(
        """
        import os, torch
        assert os.environ["GEOMSTATS_BACKEND"] == "pytorch"
        import subriemann as sr
        net = torch.nn.Linear(2, 1)
        space = sr.ParameterSpace(net, torch.randn(3, 2), torch.randn(3, 1))
        print(torch.get_default_dtype(), space.dim)
        """,
        backend="pytorch",
    )
    assert out.split() == ["torch.float32", "3"]


def test_geomstats_imported_first_with_pytorch_works():
    """The user's own geomstats import (pytorch backend) is accepted as it is."""
    out = _ok(
        """
        import torch, geomstats.backend as gs
        dtype = torch.get_default_dtype()  # what geomstats left
        import subriemann
        print(gs.__name__, torch.get_default_dtype() == dtype)
        """,
        backend="pytorch",
    )
    assert out.split() == ["geomstats.pytorch", "True"]


def test_readme_quick_start_runs():
    """The README's Python quick start runs as written and prints what it says."""
    import re

    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as fh:
        blocks = re.findall(r"```python\n(.*?)```", fh.read(), re.S)
    assert blocks, "README.md has no python block"
    out = _ok(blocks[0])
    assert out.split() == ["True", "True", "torch.float32"]


def test_import_leaves_the_root_logger_alone():
    """geomstats configures the root logger at import; subriemann undoes it."""
    out = _ok(
        """
        import logging
        before = (logging.getLogger().level, len(logging.getLogger().handlers))
        import subriemann
        after = (logging.getLogger().level, len(logging.getLogger().handlers))
        print(before == after, after)
        """
    )
    assert out.startswith("True"), out


def test_readme_flow_block_runs(tmp_path):
    """The README's second Python block (a flow and its checks) runs after the first."""
    import re

    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as fh:
        blocks = re.findall(r"```python\n(.*?)```", fh.read(), re.S)
    env = {k: v for k, v in os.environ.items() if k != "GEOMSTATS_BACKEND"}
    env["PYTHONPATH"] = ROOT
    env["OMP_NUM_THREADS"] = "1"  # small problem: threads only contend with the test workers
    res = subprocess.run(
        [sys.executable, "-c", blocks[0] + blocks[1]],
        env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )
    assert res.returncode == 0, res.stderr
    lines = res.stdout.split("\n")
    assert lines[3].startswith("s_end_reached")
    assert float(lines[4]) < 1e-8  # straight line (Prop 2.4)
    assert abs(float(lines[5]) - 2.0) < 1e-6  # uniform rate 2
    assert (tmp_path / "flow.npz").exists()
