"""Profile one method's training step: where the time goes (a diagnostic, not a benchmark).

Prints (1) cProfile cumulative times of qpeft functions and (2) torch.profiler's top operators
by self CPU time, over ``--steps`` optimizer steps after one warm-up step.

``python -m benchmarks.profile_step --model minilm --method quantum_peft [--quick]``
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats

import torch

from benchmarks import _common as C
from benchmarks import models as M


def profile(kind: str, method: str, quick: bool, steps: int, top: int) -> str:
    """The two reports as text. Cost: (1 + 2·steps) training steps."""
    C.setup_torch()
    spec = M.model_spec(kind, quick)
    base = M.load_base(kind, quick)
    model = M.wrap(method, base, spec)
    step = M.make_step(model, M.make_batch(spec, base.config.vocab_size))
    step()
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(steps):
        step()
    prof.disable()
    buf = io.StringIO()
    stats = pstats.Stats(prof, stream=buf).sort_stats("cumulative")
    stats.print_stats("qpeft|peft/tuners", top)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as tp:
        for _ in range(steps):
            step()
    table = tp.key_averages().table(sort_by="self_cpu_time_total", row_limit=top)
    return f"== cProfile ({steps} steps, cumulative)\n{buf.getvalue()}\n== torch.profiler\n{table}"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.profile_step", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="minilm", choices=M.MODEL_KINDS)
    p.add_argument("--method", default="quantum_peft", choices=M.METHODS)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--top", type=int, default=25)
    a = p.parse_args(argv)
    print(profile(a.model, a.method, a.quick, a.steps, a.top))


if __name__ == "__main__":
    main()
