"""Fine-tuning runs for the ``qpeft`` CLI: methods, the Accelerate loop, results, comparisons.

- :mod:`qpeft.train.methods`: method names and options -> peft configs (the method registry).
- :mod:`qpeft.train.loop`: ``TrainConfig``, ``train``, ``evaluate`` (exact resume, data-parallel).
- :mod:`qpeft.train.finetune`: ``FinetuneSpec``, ``run_finetune`` (one run, results.json).
- :mod:`qpeft.train.compare`: ``run_compare`` (table, compare.json, Pareto plot).
- :mod:`qpeft.train.count`: ``count_for_cli`` (``qpeft count``).
"""

from qpeft.train.methods import build_peft_config, method_names

__all__ = ["build_peft_config", "method_names"]
