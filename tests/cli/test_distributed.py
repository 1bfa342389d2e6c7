"""Data-parallel runs: `torchrun --nproc_per_node 2` of `qpeft finetune` on CPU (gloo), on a
tiny BERT folder and a table file, ends with the same adapter on both ranks, equal to a
1-process run with the same global batch."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

WORKER = Path(__file__).with_name("ddp_worker.py")


def _args(assets: dict[str, Path]) -> list[str]:
    return ["finetune", "--method", "lora", "--model", str(assets["bert"]), "--train-file",
            str(assets["table"]), "--max-steps", "5", "--batch-size", "8", "--grad-accum", "2",
            "--checkpoint-every", "2", "--no-progress"]


def _env() -> dict[str, str]:
    root = str(Path(__file__).resolve().parents[2])
    path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH", "")) if p)
    return dict(os.environ, PYTHONPATH=path, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")


@pytest.mark.slow
def test_two_cpu_processes_match_one(tmp_path: Path, assets: dict[str, Path]) -> None:
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    assert torchrun, "torchrun is installed with torch"
    (tmp_path / "d1").mkdir()
    (tmp_path / "d2").mkdir()
    args = _args(assets)
    one = subprocess.run([sys.executable, str(WORKER), str(tmp_path / "d1"), *args,
                          "--output-dir", str(tmp_path / "one")], env=_env(),
                         capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run([torchrun, "--nproc_per_node", "2", str(WORKER), str(tmp_path / "d2"),
                          *args, "--output-dir", str(tmp_path / "two")], env=_env(),
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
