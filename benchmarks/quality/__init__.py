"""The method-comparison suite: real tasks, every method at its defaults, seeds, one JSON per run.

``python -m benchmarks.quality`` (``make bench-quality``) runs :data:`tasks.TASKS` x
:data:`suite.ENTRIES` x seeds with the same budget per task, each run through
:func:`qpeft.train.finetune.run_finetune` (one ``results.json`` each under
``benchmarks/results/quality/<task>/<entry>/seed<s>/``), then renders the table, a Pareto plot
per task (trainable numbers vs metric, mean ± std over seeds, the untrained model as a point)
and, with ``--sweep``, learning-rate sensitivity curves into ``docs/results.md``.
``--quick`` runs tiny budgets (the smoke test).
"""
