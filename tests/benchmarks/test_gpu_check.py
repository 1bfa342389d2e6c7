"""The prepared GPU check (``benchmarks/gpu_check.py``) on CPU: its profile part runs every
method and summarises what the profiler saw; the GPU-only parts are left out without CUDA."""

from __future__ import annotations

import json

import torch

from benchmarks import gpu_check


def test_quick_check_profiles_every_method(tmp_path) -> None:
    result = gpu_check.run(tmp_path, quick=True)
    assert result["device"] == "cpu" and "sync_test" not in result and "scale_cuda" not in result
    profile = result["profile"]
    assert list(profile) == list(gpu_check.METHODS)
    for method, row in profile.items():
        assert "error" not in row, (method, row)
        assert row["kernels_per_step"] > 0 and row["top"]
        # host value reads: AdamW's one per trainable tensor (its CPU step counters, `.item()`
        # from Python) and, for QuIC's Cayley map, the ones torch.linalg.lu_solve makes inside
        # its CPU kernel (invisible to benchmarks/dispatch.py's Python-level count; whether
        # CUDA's makes them is what the GPU check's sync test answers). Any other read fails.
        reads = row["host_reads_per_step"]
        assert reads.pop("python .item()") == row["trainable_tensors"], (method, row)
        assert reads == ({"aten::linalg_lu_solve": reads.get("aten::linalg_lu_solve")}
                         if method == "quic" else {}), (method, row)
        assert row["syncs_per_step"] == {}, method  # no CUDA calls on CPU
    assert profile["lora"]["kernels_over_lora"] == 1.0
    written = json.loads((tmp_path / "gpu_check.json").read_text())
    assert written["profile"].keys() == profile.keys()
    assert "SmolLM2-shaped training step" in (tmp_path / "gpu_check.md").read_text()


def test_summary_counts_host_reads_per_step() -> None:
    """A read-back in the profiled region is counted (the check can fail)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(2):
            (torch.randn(4) * 2).sum().item()
    summary = gpu_check.profile_summary(prof, 2, on_gpu=False)
    assert summary["host_reads_per_step"] == {"python .item()": 1.0}
    assert summary["syncs_per_step"] == {}
    assert summary["kernels_per_step"] >= 3
