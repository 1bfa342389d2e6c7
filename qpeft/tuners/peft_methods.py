"""peft's own methods that qpeft compares against, registered as baselines.

They live in peft; here is only what the command line and the benchmarks need to know about them
(options, defaults, learning rate, the benchmark configuration). The low-parameter baselines
(VeRA, FourierFT, IA3) are benchmark-only: each is built from peft's config as documented.
"""

from __future__ import annotations

from typing import Any

import peft

from qpeft.tuners.registry import MethodOption, MethodSpec, register_method

_DROPOUT_HELP = "adapter dropout (default 0: deterministic runs)"
_LORA_LR_NOTE = "default for peft's methods (the CLI's learning rate before per-method defaults)"
_SWEEP_LR_NOTE = ("best rate of the learning-rate sweep on the quality suite's tuning task "
                  "(docs/results.md)")


def _oft_kwargs(kwargs: dict[str, Any], given: set[str]) -> dict[str, Any]:
    """peft's OFT takes either ``r`` (number of blocks) or ``oft_block_size``: a given
    ``--rank`` without ``--oft-block-size`` means blocks."""
    if "rank" in given and "oft_block_size" not in given:
        kwargs["oft_block_size"] = 0
    return kwargs


BASELINES: tuple[MethodSpec, ...] = (
    MethodSpec(
        name="lora", label="peft LoRA", config_cls=peft.LoraConfig,
        options=(
            MethodOption("rank", "r", int, "adapter rank (LoRA/HRA r, Quantum-PEFT K, QPA LoRA "
                         "rank, OFT number of blocks)"),
            MethodOption("alpha", "lora_alpha", float, "scaling alpha (LoRA, QPA, Quantum-PEFT)"),
            MethodOption("dropout", "lora_dropout", float, _DROPOUT_HELP),
        ),
        defaults={"rank": 8, "alpha": 16.0, "dropout": 0.0},
        learning_rate=2e-3, learning_rate_note=_LORA_LR_NOTE,
        benchmark_config=lambda targets, task_type: peft.LoraConfig(
            r=8, lora_alpha=16, lora_dropout=0.0, target_modules=targets, task_type=task_type),
        benchmark_label="peft LoRA r=8",
    ),
    MethodSpec(
        name="oft", label="peft OFT", config_cls=peft.OFTConfig,
        options=(
            MethodOption("rank", "r", int, "adapter rank"),
            MethodOption("oft_block_size", "oft_block_size", int, "OFT/BOFT block size"),
            MethodOption("dropout", "module_dropout", float, _DROPOUT_HELP),
        ),
        defaults={"oft_block_size": 32},
        learning_rate=2e-3, learning_rate_note=_LORA_LR_NOTE, build_config=_oft_kwargs,
        benchmark_config=lambda targets, task_type: peft.OFTConfig(
            oft_block_size=32, r=0, target_modules=targets, task_type=task_type),
        benchmark_label="peft OFT (block 32)",
    ),
    MethodSpec(
        name="boft", label="peft BOFT", config_cls=peft.BOFTConfig,
        options=(
            MethodOption("oft_block_size", "boft_block_size", int, "OFT/BOFT block size"),
            MethodOption("butterfly", "boft_n_butterfly_factor", int,
                         "BOFT number of butterfly factors"),
            MethodOption("dropout", "boft_dropout", float, _DROPOUT_HELP),
        ),
        defaults={"oft_block_size": 4, "butterfly": 1},
        learning_rate=2e-3, learning_rate_note=_LORA_LR_NOTE,
        benchmark_config=lambda targets, task_type: peft.BOFTConfig(
            boft_block_size=8, boft_n_butterfly_factor=1, boft_dropout=0.0,
            target_modules=targets, task_type=task_type),
        benchmark_label="peft BOFT (block 8, 1 factor: peft forces 1 on CPU)",
    ),
    MethodSpec(
        name="hra", label="peft HRA", config_cls=peft.HRAConfig,
        options=(MethodOption("rank", "r", int, "adapter rank"),),
        defaults={"rank": 8},
        learning_rate=2e-3, learning_rate_note=_LORA_LR_NOTE,
        benchmark_config=lambda targets, task_type: peft.HRAConfig(
            r=8, target_modules=targets, task_type=task_type),
        benchmark_label="peft HRA r=8",
    ),
    # peft's low-parameter methods (the quality suite's baselines, docs/results.md)
    MethodSpec(
        name="vera", label="peft VeRA", config_cls=peft.VeraConfig,
        options=(MethodOption("rank", "r", int, "adapter rank"),
                 MethodOption("dropout", "vera_dropout", float, _DROPOUT_HELP)),
        learning_rate=3e-2, learning_rate_note="default for vera: " + _SWEEP_LR_NOTE,
    ),
    MethodSpec(
        name="fourierft", label="peft FourierFT", config_cls=peft.FourierFTConfig,
        options=(MethodOption("n_frequency", "n_frequency", int,
                              "FourierFT: spectral coefficients per layer"),
                 MethodOption("fourier_scaling", "scaling", float, "FourierFT: scaling")),
        learning_rate=3e-2, learning_rate_note="default for fourierft: " + _SWEEP_LR_NOTE,
    ),
    MethodSpec(
        name="ia3", label="peft IA3", config_cls=peft.IA3Config,
        learning_rate=3e-2, learning_rate_note="default for ia3: " + _SWEEP_LR_NOTE,
    ),
)

for _spec in BASELINES:
    register_method(_spec)
