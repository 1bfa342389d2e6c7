"""The ``qpeft`` command: ``finetune``, ``compare``, ``count``, ``demo``, ``export-lora``,
``export-merged``, ``export-circuits``.

``--model`` is a bundled name, a local transformers folder, a ``.gguf`` file or a hub id
(:mod:`qpeft.assets.sources`); ``--train-file`` a classification table or causal-LM instruction
JSONL (:mod:`qpeft.assets.sft`, :mod:`qpeft.train.sft`).

Every bad input (unknown method/model/task, a table without the named columns, an empty or
one-class data set, an unwritable output folder, an output folder holding another run) ends
with one ``qpeft: error: ...`` line on stderr and exit status 2, before anything is written.
Subcommands are registered in :data:`SUBCOMMANDS` (name -> function adding the subparser), so
new ones (e.g. ``export-circuits``) plug in with one line.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from qpeft._quiet import quiet_cli
from qpeft.train.methods import default_learning_rate, method_names
from qpeft.tuners.registry import all_options

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

MODEL_CHOICES = ("minilm", "smollm2", "efficientnet-lite0")
MODEL_HELP = (f"one of: {', '.join(MODEL_CHOICES)}; or a local transformers folder "
              "(config.json + weights), a .gguf file, or a hub id (needs HF_HUB_OFFLINE=0 and "
              "a reachable hub, or the model in the local hub cache)")
TASK_CHOICES = ("bbc-news", "tweets", "shakespeare", "fashion-mnist")

# `qpeft demo`: MiniLM on BBC News, Quantum-PEFT vs LoRA and QuIC, a few minutes on 2 cores,
# every method at its own default learning rate (what a user gets without --lr).
DEMO = {
    "model": "minilm", "task": "bbc-news", "methods": ("quantum-peft", "lora", "quic"),
    "max_train": 480, "max_eval": 200, "max_length": 96, "batch_size": 16, "max_steps": 30,
    "output_dir": "runs/demo",
}


class CLIError(ValueError):
    """A user error found by the CLI itself (exit status 2)."""


# ----------------------------------------------------------------------------- arguments


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {value}")
    return value


def _csv_list(text: str) -> list[str]:
    return [p.strip() for p in text.split(",") if p.strip()]


def _lr_map(text: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for item in _csv_list(text):
        method, sep, value = item.partition("=")
        try:
            out[method.strip()] = float(value)
        except ValueError:
            sep = ""
        if not sep:
            raise argparse.ArgumentTypeError(f"expected METHOD=LR, got {item!r}")
    return out


def add_method_options(parser: argparse.ArgumentParser) -> None:
    """``--rank``, ``--depth``, ``--orders``, ... (default: the method's own default)."""
    group = parser.add_argument_group("method options (each applies to some methods only)")
    for option in all_options().values():
        # parsed per method by the option's own parser (qpeft.train.methods.resolve_options)
        typ = option.parse if option.parse in (int, float, str) else str
        group.add_argument(option.flag, dest=f"opt_{option.name}", type=typ, default=None,
                           metavar=option.metavar or option.name.upper(), help=option.help)
    group.add_argument("--target-modules", type=_csv_list, default=None, metavar="A,B",
                       help="modules to adapt (default: the bundled model's, else peft's default "
                            "for the architecture, e.g. q_proj,v_proj for LLaMA, c_attn for GPT-2)")


def add_train_options(parser: argparse.ArgumentParser) -> None:
    """Budget, optimiser and data-size options shared by finetune/compare."""
    g = parser.add_argument_group("budget and optimisation")
    g.add_argument("--max-steps", type=_positive_int, default=None,
                   help="optimizer steps (overrides --epochs)")
    g.add_argument("--epochs", type=float, default=1.0, help="passes over the training set")
    g.add_argument("--batch-size", type=_positive_int, default=16,
                   help="global batch per micro-step (split across processes)")
    g.add_argument("--grad-accum", type=_positive_int, default=1,
                   help="micro-batches per optimizer step")
    g.add_argument("--lr", type=float, default=None,
                   help="peak learning rate (AdamW); default: each method's own (see "
                        "docs/results.md), recorded in results.json")
    g.add_argument("--weight-decay", type=float, default=0.0)
    g.add_argument("--warmup-ratio", type=float, default=0.06,
                   help="fraction of steps of linear warm-up (then linear decay to 0)")
    g.add_argument("--max-grad-norm", type=float, default=1.0)
    g.add_argument("--eval-batch-size", type=_positive_int, default=32)
    g.add_argument("--checkpoint-every", type=int, default=50, metavar="N",
                   help="write checkpoint.pt every N steps and at the end (0: never), "
                        "for --resume")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--no-progress", action="store_true", help="no tqdm bars")
    g.add_argument("--gradient-checkpointing", action="store_true",
                   help="recompute activations in the backward (transformers models; "
                        "non-reentrant): less memory, more compute")
    q = g.add_mutually_exclusive_group()
    q.add_argument("--load-in-4bit", dest="load_in_bits", action="store_const", const=4,
                   help="quantize the base model's linear layers to 4-bit nf4 (bitsandbytes, "
                        "QLoRA-style; heads stay in full precision); needs qpeft[bnb]")
    q.add_argument("--load-in-8bit", dest="load_in_bits", action="store_const", const=8,
                   help="quantize the base model's linear layers to 8-bit (LLM.int8())")
    add_data_options(parser)


def add_data_options(parser: argparse.ArgumentParser) -> None:
    """Data-size and data-format options shared by finetune/compare."""
    d = parser.add_argument_group("data")
    d.add_argument("--max-train", type=_positive_int, default=None,
                   help="subsample the training set (stratified, seeded)")
    d.add_argument("--max-eval", type=_positive_int, default=None,
                   help="subsample the evaluation set")
    d.add_argument("--eval-fraction", type=float, default=0.2,
                   help="held-out fraction when a split is made")
    d.add_argument("--max-length", type=_positive_int, default=128,
                   help="text and instruction data: tokens per example (prompt + completion)")
    d.add_argument("--block-size", type=_positive_int, default=128, help="causal LM: tokens per block")
    d.add_argument("--max-blocks", type=_positive_int, default=None,
                   help="causal LM: at most this many training blocks")
    d.add_argument("--max-eval-blocks", type=_positive_int, default=None,
                   help="causal LM: at most this many evaluation blocks")
    d.add_argument("--image-size", type=_positive_int, default=None,
                   help="images: side in pixels (EfficientNet default 224)")
    d.add_argument("--eval-before", action="store_true",
                   help="also evaluate the untrained model (metric_before in results.json)")
    d.add_argument("--packing", action="store_true",
                   help="instruction data: pack examples into rows of --max-length tokens")
    d.add_argument("--eval-generate", type=int, default=0, metavar="N",
                   help="instruction data: exact match of greedy completions on N held-out "
                        "prompts (exact_match in results.json)")
    d.add_argument("--skip-bad-records", action="store_true",
                   help="instruction data: skip bad records (counted in results.json) instead "
                        "of stopping at the first one")


def _method_options(args: argparse.Namespace) -> dict[str, Any]:
    return {name: getattr(args, f"opt_{name}") for name in all_options()
            if getattr(args, f"opt_{name}") is not None}


def _learning_rate(args: argparse.Namespace, method: str) -> tuple[float, str]:
    """``(lr, where it comes from)``: ``--lr`` when given, else the method's default."""
    if args.lr is not None:
        return args.lr, "--lr"
    try:
        return default_learning_rate(method)
    except ValueError:
        return default_learning_rate("lora")  # an unknown method is reported by the run itself


def _spec_from_args(args: argparse.Namespace, method: str) -> Any:
    from qpeft.train.finetune import FinetuneSpec, with_default_learning_rate
    from qpeft.train.loop import TrainConfig

    lr, lr_source = _learning_rate(args, method)
    train = TrainConfig(
        batch_size=args.batch_size, grad_accum=args.grad_accum, lr=lr,
        weight_decay=args.weight_decay, warmup_ratio=args.warmup_ratio,
        max_steps=args.max_steps, epochs=args.epochs, eval_batch_size=args.eval_batch_size,
        checkpoint_every=args.checkpoint_every, max_grad_norm=args.max_grad_norm,
        seed=args.seed, progress=not args.no_progress)
    return with_default_learning_rate(FinetuneSpec(
        method=method, model=args.model, task=getattr(args, "task", None),
        train_file=getattr(args, "train_file", None), eval_file=getattr(args, "eval_file", None),
        text_column=getattr(args, "text_column", "text"),
        label_column=getattr(args, "label_column", "label"),
        output_dir=args.output_dir, seed=args.seed, eval_fraction=args.eval_fraction,
        max_train=args.max_train, max_eval=args.max_eval, max_length=args.max_length,
        block_size=args.block_size, max_blocks=args.max_blocks,
        max_eval_blocks=args.max_eval_blocks, image_size=args.image_size,
        target_modules=args.target_modules, method_options=_method_options(args), train=train,
        eval_before=args.eval_before, packing=args.packing, eval_generate=args.eval_generate,
        skip_bad_records=args.skip_bad_records,
        gradient_checkpointing=args.gradient_checkpointing,
        load_in_bits=getattr(args, "load_in_bits", None), overwrite=getattr(args, "overwrite", False),
        resume=getattr(args, "resume", False), lr_source=lr_source))


# ----------------------------------------------------------------------------- finetune


def _add_finetune(sub: Any) -> None:
    p = sub.add_parser(
        "finetune", help="fine-tune a model on a task with one method",
        description="Fine-tune MODEL on TASK (or your own CSV/JSONL) with METHOD; writes "
                    "OUTPUT_DIR/results.json and the adapter (peft format) in OUTPUT_DIR/adapter/.")
    p.add_argument("--method", required=True, metavar="METHOD",
                   help=f"one of: {', '.join(method_names())}")
    p.add_argument("--model", required=True, metavar="MODEL", help=MODEL_HELP)
    _add_data_source(p)
    p.add_argument("--output-dir", default="runs/finetune", help="where results and adapter go")
    p.add_argument("--overwrite", action="store_true", help="replace a run in --output-dir")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --output-dir from its last checkpoint")
    add_train_options(p)
    add_method_options(p)
    p.set_defaults(func=_cmd_finetune)


def _add_data_source(p: argparse.ArgumentParser) -> None:
    src = p.add_argument_group("data source (one of)")
    src.add_argument("--task", default=None, metavar="TASK",
                     help=f"one of: {', '.join(TASK_CHOICES)}")
    src.add_argument("--train-file", default=None,
                     help="your own data: a .csv/.tsv/.jsonl classification table (text and "
                          "label columns), or causal-LM .jsonl records with prompt/completion, "
                          "messages (chat) or text fields")
    src.add_argument("--eval-file", default=None,
                     help="evaluation data in the same form (default: a fixed, seeded split "
                          "of --train-file)")
    src.add_argument("--text-column", default="text")
    src.add_argument("--label-column", default="label")


def _cmd_finetune(args: argparse.Namespace) -> int:
    from qpeft.train.finetune import run_finetune

    if args.task is None and args.train_file is None:
        raise CLIError("give --task (one of: " + ", ".join(TASK_CHOICES) + ") or --train-file")
    spec = _spec_from_args(args, args.method)
    results = run_finetune(spec, command=_command())
    if _is_main_process():
        value = results["metric_value"]
        shown = f"{100 * value:.2f}%" if results["metric"] == "accuracy" else f"{value:.3f}"
        extra = ""
        if results.get("exact_match") is not None:
            extra += (f" | exact match {100 * results['exact_match']:.1f}% of "
                      f"{results['eval_generate']}")
        if results.get("skipped_records"):
            extra += f" | skipped {results['skipped_records']} bad records"
        print(f"{results['method']} on {results['model']}/{results['task']}: "
              f"{results['metric']} {shown}{extra} | {results['trainable_params']:,} trainable "
              f"of {results['total_params']:,} | {results['steps']} steps in "
              f"{results['train_seconds']:.1f} s | peak {results['peak_memory_mb']:.0f} MB")
        print(f"results: {Path(spec.output_dir) / 'results.json'}")
        print(f"adapter: {Path(spec.output_dir) / 'adapter'}")
    return 0


# ----------------------------------------------------------------------------- compare / demo


def _add_compare(sub: Any) -> None:
    p = sub.add_parser(
        "compare", help="run several methods under the same budget; table + Pareto plot",
        description="Run METHODS one after the other on MODEL/TASK with the same budget and "
                    "seeds; print a table (params, metric ± std, time, memory), write "
                    "OUTPUT_DIR/compare.json and OUTPUT_DIR/pareto.png.")
    p.add_argument("--model", required=True, metavar="MODEL", help=MODEL_HELP)
    _add_data_source(p)
    p.add_argument("--methods", required=True, type=_csv_list, metavar="A,B,C",
                   help=f"comma-separated, from: {', '.join(method_names())}")
    p.add_argument("--seeds", type=_positive_int, default=1,
                   help="seeds per method (--seed, --seed+1, ...): mean ± std")
    p.add_argument("--output-dir", default="runs/compare")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier comparison")
    p.add_argument("--lr-for", type=_lr_map, default=None, metavar="M=LR,...",
                   help="per-method learning rates, e.g. qpa=1e-4 (default: --lr for all, or "
                        "each method's own without --lr)")
    add_train_options(p)
    add_method_options(p)
    p.set_defaults(func=_cmd_compare)


def _compare(args: argparse.Namespace, methods: Sequence[str], seeds: int) -> int:
    import time

    from qpeft.train.compare import run_compare

    start = time.perf_counter()
    base = _spec_from_args(args, methods[0] if methods and methods[0] in method_names() else "lora")
    result = run_compare(base, list(methods), seeds, args.output_dir,
                         overwrite=args.overwrite, command=_command(),
                         lr_for=getattr(args, "lr_for", None),
                         log=lambda s: print(s, flush=True) if _is_main_process() else None)
    if _is_main_process():
        print()
        print(result["table"])
        print()
        print(f"compare.json: {Path(args.output_dir) / 'compare.json'}")
        print(f"plot: {result['plot']}")
        print(f"total wall time: {time.perf_counter() - start:.0f} s")
    return 0


def _cmd_compare(args: argparse.Namespace) -> int:
    if args.task is None and args.train_file is None:
        raise CLIError("give --task (one of: " + ", ".join(TASK_CHOICES) + ") or --train-file")
    return _compare(args, args.methods, args.seeds)


def _add_demo(sub: Any) -> None:
    p = sub.add_parser(
        "demo", help="MiniLM on BBC News: Quantum-PEFT vs LoRA and QuIC (a few minutes on 2 cores)",
        description="The README's main command: `qpeft compare` with a small embedded budget "
                    f"({DEMO['max_steps']} steps of {DEMO['batch_size']} x {DEMO['max_length']} "
                    f"tokens, {DEMO['max_eval']} held-out articles). Replaces its own output "
                    "folder on every run.")
    p.add_argument("--output-dir", default=DEMO["output_dir"])
    p.add_argument("--seeds", type=_positive_int, default=1)
    p.add_argument("--methods", type=_csv_list, default=list(DEMO["methods"]), metavar="A,B,C")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_cmd_demo)


def _cmd_demo(args: argparse.Namespace) -> int:
    parser = build_parser()
    argv = ["compare", "--model", DEMO["model"], "--task", DEMO["task"],
            "--methods", ",".join(args.methods), "--seeds", str(args.seeds),
            "--max-train", str(DEMO["max_train"]), "--max-eval", str(DEMO["max_eval"]),
            "--max-length", str(DEMO["max_length"]), "--batch-size", str(DEMO["batch_size"]),
            "--max-steps", str(DEMO["max_steps"]), "--output-dir", args.output_dir, "--overwrite"]
    if args.no_progress:
        argv.append("--no-progress")
    compare_args = parser.parse_args(argv)
    print(f"qpeft demo: {DEMO['model']} on {DEMO['task']}, methods {', '.join(args.methods)}; "
          f"equivalent to: qpeft {' '.join(argv)}", flush=True)
    return _compare(compare_args, args.methods, args.seeds)


# ----------------------------------------------------------------------------- count


def _add_count(sub: Any) -> None:
    p = sub.add_parser(
        "count", help="trainable-parameter table per module, without training",
        description="Wrap MODEL (or a transformers config.json, instantiated on the meta "
                    "device without weights) with METHOD and list the trainable parameters.")
    p.add_argument("--method", required=True, metavar="METHOD",
                   help=f"one of: {', '.join(method_names())}")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", metavar="MODEL", help=MODEL_HELP + " (no weights are loaded "
                     "for a folder or hub id: its config is built on the meta device)")
    src.add_argument("--config-file", help="a transformers config.json (model need not be installed)")
    p.add_argument("--num-labels", type=_positive_int, default=None,
                   help="classifier size: MiniLM default 5; for a folder / GGUF / hub model it "
                        "counts a sequence-classification head of this size (default: the head "
                        "its config names)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    add_method_options(p)
    p.set_defaults(func=_cmd_count)


def _cmd_count(args: argparse.Namespace) -> int:
    import json

    from qpeft.train.count import count_for_cli

    table = count_for_cli(args.method, model=args.model, config_file=args.config_file,
                          num_labels=args.num_labels, target_modules=args.target_modules,
                          options=_method_options(args))
    if args.json:
        from qpeft.train.results import _json_default

        print(json.dumps(table, indent=2, default=_json_default))
    else:
        print(table["text"])
    return 0


# ----------------------------------------------------------------------------- export-lora / -oft


def _add_export_lora(sub: Any) -> None:
    from qpeft.export.stock import add_export_parser

    add_export_parser(sub, "lora")


def _add_export_oft(sub: Any) -> None:
    from qpeft.export.stock import add_export_parser

    add_export_parser(sub, "oft")


# ----------------------------------------------------------------------------- main

def _add_export_merged(sub: Any) -> None:
    from qpeft.export.merged import add_export_merged_parser

    add_export_merged_parser(sub)


def _add_export_circuits(sub: Any) -> None:
    from qpeft.export import add_export_circuits_parser

    add_export_circuits_parser(sub)


SUBCOMMANDS: dict[str, Callable[[Any], None]] = {
    "finetune": _add_finetune,
    "compare": _add_compare,
    "count": _add_count,
    "demo": _add_demo,
    "export-lora": _add_export_lora,
    "export-oft": _add_export_oft,
    "export-merged": _add_export_merged,
    "export-circuits": _add_export_circuits,
}


# subcommands whose ValueErrors are input errors (exit 2) rather than bugs
VALUE_ERROR_COMMANDS: set[str] = {"export-lora", "export-oft", "export-merged", "export-circuits"}


def build_parser() -> argparse.ArgumentParser:
    """The ``qpeft`` argument parser with every subcommand of :data:`SUBCOMMANDS`."""
    parser = argparse.ArgumentParser(
        prog="qpeft",
        description="Quantum-inspired PEFT (Quantum-PEFT, QuIC, QPA) next to LoRA/OFT/BOFT/HRA: "
                    "fine-tune, compare and count on offline models and data.")
    parser.add_argument("--verbose", action="store_true",
                        help="show every third-party warning (hidden by default: known, "
                             "harmless ones such as bitsandbytes' offline-kernel message)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in SUBCOMMANDS.values():
        add(sub)
    return parser


_ARGV: list[str] | None = None


def _command() -> list[str]:
    """The command as typed: ``qpeft`` + its arguments (recorded in results.json)."""
    if _ARGV is not None:
        return ["qpeft", *_ARGV]
    return [Path(sys.argv[0]).name, *sys.argv[1:]] if sys.argv else []


def _is_main_process() -> bool:
    return os.environ.get("RANK", "0") == "0"


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``qpeft`` / ``python -m qpeft``; returns the exit status (2: bad input)."""
    from qpeft.assets import AssetError
    from qpeft.train.errors import RunError

    global _ARGV
    _ARGV = list(argv) if argv is not None else list(sys.argv[1:])
    quiet_cli(show_all="--verbose" in _ARGV)
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (CLIError, RunError, AssetError) as exc:
        print(f"qpeft: error: {exc}", file=sys.stderr)
        return 2
    except (ValueError, ImportError) as exc:
        # the export commands' own checks raise ValueError naming the bad argument, or
        # ImportError saying which optional extra to install (qiskit for QPY output)
        if args.command in VALUE_ERROR_COMMANDS:
            print(f"qpeft: error: {exc}", file=sys.stderr)
            return 2
        raise
    except KeyboardInterrupt:
        print("qpeft: interrupted (continue with --resume if checkpoints were on)",
              file=sys.stderr)
        return 130
    finally:
        from qpeft.train.sharding import close_process_group

        close_process_group()  # a launched run's ranks leave gloo cleanly


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
