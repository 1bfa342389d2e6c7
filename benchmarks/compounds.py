"""Benchmark 3: compound matrices, qpeft's fast recursion vs the minors-determinant method.

The minors method is what QuIC's reference code does: gather every k x k submatrix
``a[I, J]`` (C(n,k)^2 of them) and take a batched ``torch.linalg.det``: O(C(n,k)^2 k^3) time
and O(C(n,k)^2 k^2) memory. qpeft's :func:`qpeft.circuits.compound.compound` uses closed-form
2x2 minors / Laplace recursion: O(C(n,k)^2 k). Both are timed forward and forward+backward
(gradient of <C_k(a), G> for a fixed random G) on a random orthogonal ``a`` in float32, the
reference code's dtype; their outputs are compared.

Run alone: ``python -m benchmarks.compounds [--quick]``.
"""

from __future__ import annotations

import argparse
import itertools
import math
from pathlib import Path
from typing import Any

import torch

from benchmarks import _common as C

NAME = "compounds"
CASES = ((13, 2), (22, 2), (44, 2), (90, 2), (18, 3), (29, 3))
QUICK_CASES = ((6, 2), (7, 3))


def minors_compound(a: torch.Tensor, k: int) -> torch.Tensor:
    """Order-k compound of ``a`` (n x n) as batched determinants of all k x k minors, rows and
    columns in lexicographic k-subset order. O(C(n,k)^2 k^3) time, O(C(n,k)^2 k^2) memory."""
    n = a.shape[-1]
    subsets = torch.tensor(list(itertools.combinations(range(n), k)), dtype=torch.long)
    rows = subsets[:, None, :, None]  # (C, 1, k, 1)
    cols = subsets[None, :, None, :]  # (1, C, 1, k)
    return torch.linalg.det(a[..., rows, cols])


def _random_orthogonal(n: int, seed: int, dtype: torch.dtype) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    return q.to(dtype)


def _fns(fn: Any, a: torch.Tensor, k: int, grad_out: torch.Tensor) -> tuple[Any, Any]:
    def forward() -> torch.Tensor:
        with torch.no_grad():
            return fn(a, k)

    def backward() -> None:
        x = a.detach().requires_grad_(True)
        (fn(x, k) * grad_out).sum().backward()

    return forward, backward


def bench_case(n: int, k: int, quick: bool) -> dict[str, Any]:
    """Times and agreement of the two methods at one (n, k)."""
    from qpeft.circuits.compound import compound

    a = _random_orthogonal(n, seed=n * 10 + k, dtype=torch.float32)
    dim = math.comb(n, k)
    grad_out = torch.randn(dim, dim, generator=torch.Generator().manual_seed(1))
    fast_f, fast_b = _fns(compound, a, k, grad_out)
    ref_f, ref_b = _fns(minors_compound, a, k, grad_out)
    big = dim * dim > 4_000_000
    ref_rep = 1 if quick else (2 if big else 5)
    fast_rep = 3 if quick else 25
    fast_warmup = 1 if quick else 5  # steady state: index tables cached, the heap grown
    row: dict[str, Any] = {"n": n, "k": k, "dim": dim}
    row["fast_fwd_s"] = C.median_time(fast_f, fast_warmup, fast_rep)
    row["fast_fwdbwd_s"] = C.median_time(fast_b, fast_warmup, fast_rep)
    row["minors_fwd_s"] = C.median_time(ref_f, 0 if big else 1, ref_rep)
    row["minors_fwdbwd_s"] = C.median_time(ref_b, 0 if big else 1, ref_rep)
    row["speedup_fwd"] = C.ratio(row["minors_fwd_s"], row["fast_fwd_s"])
    row["speedup_fwdbwd"] = C.ratio(row["minors_fwdbwd_s"], row["fast_fwdbwd_s"])
    row["max_abs_diff_fp32"] = float((fast_f() - ref_f()).abs().max())
    return row


def run(quick: bool = False, out_dir: Path = C.RESULTS_DIR) -> dict[str, Any]:
    """All cases; writes ``compounds.json`` / ``.md``."""
    C.setup_torch()
    rows = [bench_case(n, k, quick) for n, k in (QUICK_CASES if quick else CASES)]
    result = {"benchmark": NAME, "quick": quick, "machine": C.machine_facts(), "dtype": "float32",
              "cases": rows}
    C.write_result(NAME, result, render(result), out_dir)
    return result


def render(result: dict[str, Any]) -> str:
    rows = [[r["n"], r["k"], r["dim"], r["fast_fwd_s"] * 1e3, r["minors_fwd_s"] * 1e3,
             r["speedup_fwd"], r["fast_fwdbwd_s"] * 1e3, r["minors_fwdbwd_s"] * 1e3,
             r["speedup_fwdbwd"], f"{r['max_abs_diff_fp32']:.1e}"] for r in result["cases"]]
    return C.md_table(["n", "k", "C(n,k)", "qpeft fwd (ms)", "minors fwd (ms)", "speed-up fwd",
                       "qpeft fwd+bwd (ms)", "minors fwd+bwd (ms)", "speed-up fwd+bwd",
                       "max |diff|"], rows)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.compounds", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="toy sizes (smoke test)")
    p.add_argument("--out", type=Path, default=C.RESULTS_DIR)
    a = p.parse_args(argv)
    print(render(run(a.quick, a.out)))


if __name__ == "__main__":
    main()
