"""qpeft benchmarks: speed, memory and parameter counts side by side with peft.

``python -m benchmarks all`` runs every benchmark and writes ``docs/benchmarks.md``; each module
(``train_step``, ``generation``, ``compounds``, ``merged``, ``param_counts``) also runs alone with
``python -m benchmarks.<module> [--quick]``. Results land in ``benchmarks/results/*.json`` (+ a
markdown table each). Timings are ratios against a reference measured in the same process.
"""
