"""Data-parallel runs: `torchrun --nproc_per_node 2 -m qpeft finetune` on CPU (gloo) ends with
the same adapter on both ranks, equal to a 1-process run with the same global batch."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ARGS = ["finetune", "--method", "lora", "--model", "tiny-bert", "--task", "tiny-text",
        "--max-steps", "5", "--batch-size", "8", "--grad-accum", "2", "--checkpoint-every", "2",
        "--no-progress"]


def _env(dump: Path) -> dict[str, str]:
    env = dict(os.environ, QPEFT_TEST_ASSETS="1", QPEFT_TEST_RANK_DUMP=str(dump),
               HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    return env


@pytest.mark.slow
def test_two_cpu_processes_match_one(tmp_path: Path) -> None:
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    assert torchrun, "torchrun is installed with torch"
    (tmp_path / "d1").mkdir()
    (tmp_path / "d2").mkdir()
    one = subprocess.run([sys.executable, "-m", "qpeft", *ARGS, "--output-dir",
                          str(tmp_path / "one")], env=_env(tmp_path / "d1"),
                         capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run([torchrun, "--nproc_per_node", "2", "-m", "qpeft", *ARGS,
                          "--output-dir", str(tmp_path / "two")], env=_env(tmp_path / "d2"),
                         capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    r0 = torch.load(tmp_path / "d2/rank0.pt", weights_only=True)
    r1 = torch.load(tmp_path / "d2/rank1.pt", weights_only=True)
    single = torch.load(tmp_path / "d1/rank0.pt", weights_only=True)
    assert r0.keys() == r1.keys() == single.keys()
    for k in r0:
        assert torch.equal(r0[k], r1[k]), k
        torch.testing.assert_close(r0[k], single[k], atol=1e-6, rtol=1e-5, msg=k)
    import json

    res = json.loads((tmp_path / "two/results.json").read_text())
    ref = json.loads((tmp_path / "one/results.json").read_text())
    assert res["num_processes"] == 2 and ref["num_processes"] == 1
    assert res["metric_value"] == pytest.approx(ref["metric_value"], abs=1e-6)
    assert res["losses"] == pytest.approx(ref["losses"], rel=1e-5)
