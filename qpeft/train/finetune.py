"""One fine-tuning run, end to end: validate, load, wrap with peft, train, evaluate, save.

Everything that can be checked is checked before anything is written (method, model, task,
their compatibility, method options, the output folder, then the data and the model): a bad
input leaves the output folder as it was. The output folder then holds

- ``run.json``: the run's fingerprint (everything that defines it) and the command;
- ``checkpoint.pt``: every ``checkpoint_every`` steps (atomic), for ``--resume``;
- ``adapter/``: the trained adapter in peft format (written to a temporary folder, then renamed);
- ``results.json``: the measurements (written last, atomically).

Only rank 0 writes under a multi-process launcher. Under ``accelerate launch`` with an FSDP
config the model is sharded with FSDP2 (:mod:`qpeft.train.sharding`; on CPU by qpeft itself) and
the adapter is gathered in full on rank 0 before it is saved, so it loads in one process.

``spec.model`` is a bundled name, a local transformers folder, a ``.gguf`` file or a hub id
(:mod:`qpeft.assets.sources`); the model's head follows the data (sequence classification for
labelled text, causal LM for text / instruction data). Instruction data (JSONL with
``prompt``/``completion``, ``messages`` or ``text``) trains with the loss on completion tokens
only (:mod:`qpeft.train.sft`).
"""

from __future__ import annotations

import dataclasses
import functools
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import torch

from qpeft.assets.sft import SFTRecord, jsonl_kind, load_sft
from qpeft.assets.sources import ModelSource, read_source_config, resolve_model_source
from qpeft.train import sharding
from qpeft.train.checkpoint import CHECKPOINT_NAME
from qpeft.train.data import CausalLMData, ImageData, PreparedData, TextClassificationData
from qpeft.train.errors import RunError
from qpeft.train.loop import TrainConfig, TrainResult, check_data_sizes, evaluate, train
from qpeft.train.methods import (
    build_peft_config,
    check_method,
    choose_targets,
    config_class,
    default_learning_rate,
    default_target_modules,
    resolve_options,
)
from qpeft.train.results import (
    RESULTS_NAME,
    RUN_NAME,
    atomic_write_json,
    read_json,
    reset_peak_memory,
    results_record,
)
from qpeft.train.sft import SFTData, exact_match

MODEL_KINDS: dict[str, str] = {"minilm": "text-classification", "smollm2": "causal-lm",
                               "efficientnet-lite0": "image-classification"}
TASK_KINDS: dict[str, str] = {"bbc-news": "text-classification", "tweets": "text-classification",
                              "shakespeare": "causal-lm", "fashion-mnist": "image-classification"}
PEFT_TASK_TYPES: dict[str, str | None] = {"text-classification": "SEQ_CLS",
                                          "causal-lm": "CAUSAL_LM",
                                          "image-classification": None}
OWNED_NAMES: tuple[str, ...] = (RUN_NAME, RESULTS_NAME, CHECKPOINT_NAME, "adapter")


def kind_of_task_type(task_type: str | None) -> str | None:
    """The kind of data a peft ``task_type`` stands for ("CAUSAL_LM" -> "causal-lm"), the
    inverse of :data:`PEFT_TASK_TYPES`; None where it names none (a plain ``PeftModel``)."""
    kinds = [kind for kind, tt in PEFT_TASK_TYPES.items() if tt is not None and tt == task_type]
    return kinds[0] if kinds else None


@dataclasses.dataclass
class FinetuneSpec:
    """Everything that defines a run (the CLI's ``finetune`` options)."""

    method: str
    model: str
    task: str | None = None
    train_file: str | None = None
    eval_file: str | None = None
    text_column: str = "text"
    label_column: str = "label"
    output_dir: str = "runs/finetune"
    seed: int = 0
    data_seed: int | None = None
    eval_fraction: float = 0.2
    max_train: int | None = None
    max_eval: int | None = None
    max_length: int = 128
    block_size: int = 128
    max_blocks: int | None = None
    max_eval_blocks: int | None = None
    image_size: int | None = None
    target_modules: list[str] | None = None
    method_options: dict[str, Any] = dataclasses.field(default_factory=dict)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    eval_before: bool = False
    packing: bool = False
    eval_generate: int = 0
    skip_bad_records: bool = False
    gradient_checkpointing: bool = False
    load_in_bits: int | None = None  # 4 / 8: quantize the base's linear layers (bitsandbytes)
    overwrite: bool = False
    resume: bool = False
    #: where ``train.lr`` comes from: "--lr", "--lr-for" or "default for <method>"
    lr_source: str = "given"

    def fingerprint(self) -> dict[str, Any]:
        """The fields that make two runs the same run (not the output folder, resume flags,
        progress bars or checkpoint frequency)."""
        d = dataclasses.asdict(self)
        for key in ("output_dir", "overwrite", "resume", "lr_source"):
            d.pop(key)
        for key in ("progress", "checkpoint_every"):
            d["train"].pop(key)
        for key in ("train_file", "eval_file"):
            if d[key] is not None:
                d[key] = str(Path(d[key]).resolve())
        try:
            d["model"] = resolve_model_source(self.model).location
        except ValueError:
            pass
        d["method_options"] = resolve_options(self.method, self.method_options,
                                              kind=readable_kind(self),
                                              targets=self.target_modules)
        if self.target_modules is None and (own := method_targets(self)) is not None:
            d["target_modules"] = own[0]  # the method's own default: a new default is a new run
        return d


# ----------------------------------------------------------------------------- validation


def _kind_of(what: str, name: str, known: dict[str, str]) -> str:
    if name not in known:
        raise RunError(f"unknown {what} {name!r}; valid {what}s: {', '.join(known)}")
    return known[name]


def model_source(name: str) -> ModelSource:
    """Where ``--model`` points (bundled name, folder, GGUF file, hub id); RunError if nowhere."""
    try:
        return resolve_model_source(name)
    except ValueError as exc:
        raise RunError(str(exc)) from None


def model_kind(name: str) -> str | None:
    """Task kind a bundled model serves; None for a folder / GGUF / hub model (its head follows
    the data). RunError for a path that does not exist."""
    source = model_source(name)
    return MODEL_KINDS[name] if source.kind == "bundled" else None


def task_kind(name: str) -> str:
    """Kind of a task name; RunError listing the valid names otherwise."""
    return _kind_of("task", name, dict(TASK_KINDS))


def data_kind(spec: FinetuneSpec) -> str:
    """Kind of ``spec``'s data: the task's, or of the ``--train-file`` (a JSONL file without the
    label column is causal-LM data; CSV/TSV and labelled JSONL are classification tables).
    O(file) the first time for a file; repeated calls (the learning rate, the target modules,
    the fingerprint, the record) reuse the answer while the file is unchanged."""
    if spec.train_file is None:
        return task_kind(spec.task)
    try:
        stat = os.stat(spec.train_file)
        version = (stat.st_mtime_ns, stat.st_size)
    except OSError:
        version = None  # jsonl_kind raises for the missing file (an exception is not cached)
    return _file_kind(str(spec.train_file), spec.label_column, version)


@functools.lru_cache(maxsize=16)
def _file_kind(path: str, label_column: str, version: tuple[int, int] | None) -> str:
    """:func:`jsonl_kind` of ``path``, cached per (path, label column, modification time and
    size)."""
    try:
        return jsonl_kind(path, label_column)
    except ValueError as exc:
        raise RunError(str(exc)) from None


def readable_kind(spec: FinetuneSpec) -> str | None:
    """:func:`data_kind`, or None when the data cannot be read (the run reports that when it
    loads them): what the per-kind defaults (learning rate, target modules) read."""
    try:
        return data_kind(spec)
    except (ValueError, OSError):  # RunError / AssetError included
        return None


def default_rate(spec: FinetuneSpec, method: str | None = None) -> tuple[float, str]:
    """``(lr, why)``: the default learning rate of ``method`` (default ``spec.method``) for
    ``spec``'s kind of data (the general default when the data cannot be read). O(file) for a
    ``--train-file`` (it is read once)."""
    return default_learning_rate(method or spec.method, readable_kind(spec),
                                 targets=spec.target_modules)


def method_targets(spec: FinetuneSpec) -> tuple[str | list[str], str] | None:
    """``(targets, why)`` where ``spec.method`` has its own default target modules for
    ``spec``'s kind of data (None: the model's default applies, also for unreadable data or
    an unknown method, which the run reports)."""
    try:
        return default_target_modules(spec.method, readable_kind(spec))
    except ValueError:  # an unknown method
        return None


def resolve_targets(spec: FinetuneSpec, model_default: list[str]) -> tuple[str | list[str], str]:
    """``(target modules, where they come from)``: the ones given, else the method's own
    default for the kind of data, else the model's default (peft's for its architecture)."""
    kind = None if spec.target_modules else readable_kind(spec)
    return choose_targets(spec.method, kind, spec.target_modules, model_default)


def with_default_learning_rate(spec: FinetuneSpec) -> FinetuneSpec:
    """``spec`` with :func:`default_rate` when its rate is a default (``lr_source``
    "default ..."); a rate the user gave is kept, and so is a spec of an unknown method."""
    if not spec.lr_source.startswith("default"):
        return spec
    try:
        lr, source = default_rate(spec)
    except ValueError:
        return spec
    return dataclasses.replace(spec, train=dataclasses.replace(spec.train, lr=lr),
                               lr_source=source)


def _check_model_readable(source: ModelSource) -> None:
    """Read a folder's config.json, or a hub id's config (fails fast offline)."""
    try:
        if source.kind == "folder":
            import qpeft.tuners.counting

            qpeft.tuners.counting.read_model_config(source.location)
        elif source.kind == "hub":
            read_source_config(source)
    except ValueError as exc:
        raise RunError(str(exc)) from None


def validate_spec(spec: FinetuneSpec) -> str:
    """Check names, compatibility and options before anything heavy is loaded (a folder's
    config.json and a JSONL file's fields are read); returns the data kind."""
    try:
        check_method(spec.method)
        config_class(spec.method)
        resolve_options(spec.method, spec.method_options)
        spec.train.validate()
    except ValueError as exc:
        raise RunError(str(exc)) from None
    source = model_source(spec.model)
    mkind = MODEL_KINDS[spec.model] if source.kind == "bundled" else None
    if (spec.task is None) == (spec.train_file is None):
        raise RunError("give exactly one of --task or --train-file")
    if spec.train_file is not None:
        if spec.eval_file is not None and not Path(spec.eval_file).is_file():
            raise RunError(f"--eval-file {spec.eval_file!r} does not exist")
        if not Path(spec.train_file).is_file():
            raise RunError(f"--train-file {spec.train_file!r} does not exist")
    tkind = data_kind(spec)
    if mkind is not None and mkind != tkind:
        fits = [m for m, k in MODEL_KINDS.items() if k == tkind]
        raise RunError(f"model {spec.model!r} ({mkind}) cannot run task "
                       f"{spec.task or spec.train_file!r} ({tkind}); use --model "
                       f"{' or '.join(fits)}" + ("" if tkind == "image-classification"
                                                 else ", or a model folder"))
    if mkind is None and tkind == "image-classification":
        raise RunError(f"a model given by path or hub id ({spec.model!r}) runs text data only; "
                       "for images use --model efficientnet-lite0")
    sft = spec.train_file is not None and tkind == "causal-lm"
    for flag, on in (("--packing", spec.packing), ("--eval-generate", spec.eval_generate),
                     ("--skip-bad-records", spec.skip_bad_records)):
        if on and not sft:
            raise RunError(f"{flag} applies to causal-LM JSONL data (--train-file with "
                           "prompt/completion, messages or text records)")
    if spec.eval_generate < 0:
        raise RunError(f"--eval-generate must be >= 0, got {spec.eval_generate}")
    if spec.load_in_bits not in (None, 4, 8):
        raise RunError(f"load_in_bits must be 4 or 8, got {spec.load_in_bits}")
    if spec.load_in_bits and spec.model == "efficientnet-lite0":
        raise RunError("--load-in-4bit / --load-in-8bit quantize linear layers of transformers "
                       "models; efficientnet-lite0 is a convolutional network")
    if spec.gradient_checkpointing and spec.model == "efficientnet-lite0":
        raise RunError("--gradient-checkpointing needs a transformers model; "
                       "efficientnet-lite0 does not support it")
    if not 0.0 < spec.eval_fraction < 1.0:
        raise RunError(f"--eval-fraction must be in (0, 1), got {spec.eval_fraction}")
    for name in ("max_train", "max_eval", "max_blocks", "max_eval_blocks", "image_size"):
        v = getattr(spec, name)
        if v is not None and v < 1:
            raise RunError(f"--{name.replace('_', '-')} must be >= 1, got {v}")
    for name in ("max_length", "block_size"):
        if getattr(spec, name) < 2:
            raise RunError(f"--{name.replace('_', '-')} must be >= 2, got {getattr(spec, name)}")
    _check_model_readable(source)
    return tkind


def check_output_dir(spec: FinetuneSpec) -> str:
    """Decide what to do with the output folder: "new", "resume" or "overwrite".

    RunError when it is not a folder, not writable, or holds another run (or any run, without
    --resume/--overwrite); nothing is created or removed here.
    """
    if spec.overwrite and spec.resume:
        raise RunError("--overwrite and --resume exclude each other")
    out = Path(spec.output_dir)
    if out.exists() and not out.is_dir():
        raise RunError(f"--output-dir {str(out)!r} exists and is not a folder")
    probe = out
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise RunError(f"--output-dir {str(out)!r} cannot be created: {str(probe)!r} is a file")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise RunError(f"--output-dir {str(out)!r} is not writable ({str(probe)!r} denies writes)")
    held = [n for n in OWNED_NAMES if (out / n).exists()]
    if not held:
        return "new"
    if spec.overwrite:
        return "overwrite"
    previous = None
    if (out / RUN_NAME).exists():
        try:
            previous = read_json(out / RUN_NAME).get("fingerprint")
        except (OSError, ValueError):
            previous = None
    if not spec.resume:
        what = "a different run" if previous != spec.fingerprint() else "this run already"
        raise RunError(f"--output-dir {str(out)!r} holds {what} ({', '.join(held)}); "
                       f"pass --resume to continue it or --overwrite to replace it")
    if previous != spec.fingerprint():
        raise RunError(f"--resume: {str(out)!r} holds a different run (its run.json differs "
                       f"from these options); use another --output-dir or --overwrite")
    return "resume" if (out / CHECKPOINT_NAME).exists() else "overwrite"


# ----------------------------------------------------------------------------- loading


def load_model(name: str, num_labels: int | None, kind: str | None = None) -> Any:
    """A LoadedModel: a bundled one (:func:`qpeft.assets.load_model`), or a folder / GGUF file /
    hub id loaded with the head ``kind`` of data needs (:mod:`qpeft.assets.sources`)."""
    from qpeft import assets
    from qpeft.assets.sources import load_model_source

    source = resolve_model_source(name)
    if source.kind == "bundled":
        kwargs = {"num_labels": num_labels} if num_labels is not None else {}
        return assets.load_model(name, **kwargs)
    if kind is None:
        raise ValueError(f"model {name!r}: the data kind is needed to choose its head")
    return load_model_source(source, kind=kind, num_labels=num_labels)


def load_data(spec: FinetuneSpec) -> Any:
    """The TaskData of ``spec`` (a named task, a user's CSV/JSONL table, or causal-LM JSONL).

    The split is seeded by ``spec.data_seed`` (default: ``spec.seed``)."""
    seed = spec.seed if spec.data_seed is None else spec.data_seed
    from qpeft import assets

    if spec.train_file is not None:
        if jsonl_kind(spec.train_file, spec.label_column) == "causal-lm":
            return load_sft(spec.train_file, eval_file=spec.eval_file, seed=seed,
                            eval_fraction=spec.eval_fraction,
                            skip_bad_records=spec.skip_bad_records,
                            max_train=spec.max_train, max_eval=spec.max_eval)
        return assets.load_table(spec.train_file, text_column=spec.text_column,
                                 label_column=spec.label_column, eval_file=spec.eval_file,
                                 seed=seed, eval_fraction=spec.eval_fraction)
    return assets.load_task(spec.task, seed=seed, eval_fraction=spec.eval_fraction,
                            max_train=spec.max_train, max_eval=spec.max_eval)


def is_sft(task: Any) -> bool:
    """True when ``task`` holds SFT records (causal-LM JSONL) rather than text chunks."""
    return task.kind == "causal-lm" and bool(task.train) and isinstance(task.train[0], SFTRecord)


def _split_images(part: Any) -> tuple[torch.Tensor, torch.Tensor]:
    if isinstance(part, dict):
        return part["images"], part["labels"]
    if hasattr(part, "images"):
        return part.images, part.labels
    images, labels = part
    return images, labels


def prepare_data(spec: FinetuneSpec, loaded: Any, task: Any) -> tuple[PreparedData, PreparedData]:
    """Tokenize / block / wrap the task's train and eval parts for the loop."""
    from qpeft.assets import image_batch, lm_blocks

    if task.kind == "text-classification":
        return (TextClassificationData(task.train, loaded.tokenizer, spec.max_length),
                TextClassificationData(task.eval, loaded.tokenizer, spec.max_length))
    if is_sft(task):
        return (SFTData(task.train, loaded.tokenizer, spec.max_length, packing=spec.packing,
                        skip_bad_records=spec.skip_bad_records),
                SFTData(task.eval, loaded.tokenizer, spec.max_length,
                        skip_bad_records=spec.skip_bad_records))
    if task.kind == "causal-lm":
        train = lm_blocks(loaded.tokenizer, task.train, spec.block_size, spec.max_blocks)
        evald = lm_blocks(loaded.tokenizer, task.eval, spec.block_size, spec.max_eval_blocks)
        return CausalLMData(train), CausalLMData(evald)
    size = spec.image_size or loaded.image_size or 224

    def transform(x: torch.Tensor) -> torch.Tensor:
        return image_batch(x, size)

    return (ImageData(*_split_images(task.train), transform),
            ImageData(*_split_images(task.eval), transform))


def wrap_model(spec: FinetuneSpec, loaded: Any) -> tuple[Any, Any]:
    """``get_peft_model`` of the loaded model with the method's config; returns (model, config)."""
    import peft

    import qpeft.tuners  # noqa: F401  (registers our methods with peft)

    targets, _ = resolve_targets(spec, loaded.default_target_modules)
    if not targets:
        model_type = getattr(getattr(loaded.model, "config", None), "model_type", "?")
        raise RunError(f"peft has no default target modules for {spec.model!r} (model_type "
                       f"{model_type!r}); pass --target-modules, e.g. --target-modules "
                       "q_proj,v_proj")
    try:
        config = build_peft_config(spec.method, targets, loaded.modules_to_save,
                                   task_type=PEFT_TASK_TYPES[loaded.kind],
                                   options=spec.method_options, kind=readable_kind(spec))
        model = peft.get_peft_model(loaded.model, config)
    except ValueError as exc:
        raise RunError(f"cannot apply {spec.method} to {spec.model}: {exc}") from None
    return model, config


# ----------------------------------------------------------------------------- the run


def enable_gradient_checkpointing(model: Any, name: str) -> None:
    """Turn on the transformers model's non-reentrant activation checkpointing
    (``gradient_checkpointing_enable``, renamed ``activation_checkpointing_enable`` in newer
    transformers; recompute each
    layer's activations in the backward: less memory, about one more forward of compute).

    Non-reentrant checkpointing passes gradients to the adapter's parameters inside a layer even
    when the layer's inputs do not require grad, so peft's ``enable_input_require_grads`` hook
    (needed with reentrant checkpointing and frozen embeddings) is not needed here.
    RunError when the model has no such support."""
    if not (getattr(model, "supports_gradient_checkpointing", False)
            and hasattr(model, "gradient_checkpointing_enable")):
        raise RunError(f"--gradient-checkpointing: model {name!r} does not support gradient "
                       "checkpointing (it needs a transformers model that does)")
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x's name
        model.activation_checkpointing_enable(kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def _clear_owned(out: Path) -> None:
    for name in OWNED_NAMES:
        path = out / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


def _save_adapter(model: Any, out: Path, state_dict: dict[str, torch.Tensor] | None = None) -> None:
    """``save_pretrained`` to ``out/adapter`` through a temporary folder; ``state_dict``: the
    full (gathered) state dict of a sharded model."""
    tmp = out / f".adapter-tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    if state_dict is None:
        model.save_pretrained(str(tmp))
    else:
        model.save_pretrained(str(tmp), state_dict=state_dict)
    final = out / "adapter"
    if final.exists():
        old = out / f".adapter-old-{os.getpid()}"
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old)
    else:
        os.replace(tmp, final)


@dataclasses.dataclass
class _Prepared:
    """What a run has after loading, before training."""

    accelerator: Any
    mode: str
    task: Any
    loaded: Any
    model: Any
    config: Any
    train_data: PreparedData
    eval_data: PreparedData
    memory_kind: str
    load_seconds: float


def _new_accelerator(spec: FinetuneSpec) -> Any:
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    try:
        plan = sharding.fsdp_plan(accelerator)
    except ValueError as exc:
        raise RunError(str(exc)) from None
    if plan is not None and plan.sharded_by == "qpeft" and spec.load_in_bits:
        raise RunError("--load-in-4bit / --load-in-8bit cannot be combined with FSDP on CPU "
                       "(bitsandbytes' packed weights are not sharded); drop one of them")
    return accelerator


def _load_base(spec: FinetuneSpec, task: Any, kind: str) -> Any:
    """The LoadedModel of ``spec``: quantized and checkpointed as asked."""
    try:
        loaded = load_model(spec.model, task.num_labels, kind)
    except ValueError as exc:
        raise RunError(str(exc)) from None
    if spec.load_in_bits:
        from qpeft.quantize import DEFAULT_SKIP_MODULES, quantize_linear_layers

        try:
            quantize_linear_layers(loaded.model, bits=spec.load_in_bits,
                                   skip_modules=[*DEFAULT_SKIP_MODULES,
                                                 *(loaded.modules_to_save or [])])
        except ImportError as exc:
            raise RunError(str(exc)) from None
    if spec.gradient_checkpointing:
        enable_gradient_checkpointing(loaded.model, spec.model)
    return loaded


def _prepared_data(spec: FinetuneSpec, loaded: Any, task: Any) -> tuple[PreparedData, PreparedData]:
    try:
        train_data, eval_data = prepare_data(spec, loaded, task)
        if spec.eval_generate and not eval_data.generation_examples(1):
            raise ValueError("--eval-generate needs held-out prompt/completion or messages "
                             "records; the evaluation data are plain text")
        check_data_sizes(len(train_data), len(eval_data), spec.train.batch_size)
    except ValueError as exc:
        raise RunError(str(exc)) from None
    return train_data, eval_data


def _prepare(spec: FinetuneSpec, task_data: Any | None) -> _Prepared:
    """Validate, then load data and model and wrap it: every RunError comes from here, before
    anything is written."""
    from accelerate.utils import set_seed

    kind = validate_spec(spec)
    mode = check_output_dir(spec)
    accelerator = _new_accelerator(spec)
    memory_kind = reset_peak_memory()
    t_load = time.perf_counter()
    try:
        task = task_data if task_data is not None else load_data(spec)
    except ValueError as exc:  # AssetError is a ValueError
        raise RunError(str(exc)) from None
    set_seed(spec.seed)
    loaded = _load_base(spec, task, kind)
    model, config = wrap_model(spec, loaded)
    train_data, eval_data = _prepared_data(spec, loaded, task)
    return _Prepared(accelerator, mode, task, loaded, model, config, train_data, eval_data,
                     memory_kind, time.perf_counter() - t_load)


def _start_output_dir(spec: FinetuneSpec, mode: str, accelerator: Any,
                      command: list[str] | None) -> None:
    """Create the output folder (clearing a replaced run) and write ``run.json``."""
    out = Path(spec.output_dir)
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        if mode == "overwrite":
            _clear_owned(out)
        if mode != "resume":
            atomic_write_json({"fingerprint": spec.fingerprint(), "command": command or sys.argv},
                              out / RUN_NAME)
    accelerator.wait_for_everyone()


def run_finetune(spec: FinetuneSpec, *, command: list[str] | None = None,
                 task_data: Any | None = None, on_step: Any = None) -> dict[str, Any]:
    """Run ``spec`` and return the results dict (also written to ``output_dir/results.json``).

    ``task_data``: an already loaded TaskData to reuse (compare runs several methods on one
    task). RunError for any bad input, raised before anything is written.
    """
    run = _prepare(spec, task_data)
    accelerator, model, out = run.accelerator, run.model, Path(spec.output_dir)
    _start_output_dir(spec, run.mode, accelerator, command)
    metric_before = None
    if spec.eval_before and run.mode != "resume":
        metric_before, _ = evaluate(model, run.eval_data, accelerator=accelerator,
                                    batch_size=spec.train.eval_batch_size,
                                    progress=spec.train.progress)
    result: TrainResult = train(model, run.train_data, run.eval_data, spec.train,
                                accelerator=accelerator, checkpoint_dir=out,
                                resume=run.mode == "resume", fingerprint=spec.fingerprint(),
                                on_step=on_step)
    unwrapped = accelerator.unwrap_model(model)
    generation = None
    if spec.eval_generate:
        with sharding.root_unsharded(model):  # every rank generates the same completions
            generation = exact_match(unwrapped, run.loaded.tokenizer,
                                     run.eval_data.generation_examples(spec.eval_generate),
                                     device=accelerator.device)
    context = {"model_source": dataclasses.asdict(model_source(spec.model)),
               "task": spec.task or ("sft" if is_sft(run.task) else "table"),
               "method_options": resolve_options(spec.method, spec.method_options,
                                                 kind=readable_kind(spec),
                                                 targets=spec.target_modules),
               "targets": resolve_targets(spec, run.loaded.default_target_modules)}
    results = results_record(spec, result, unwrapped, run, context=context,
                             metric_before=metric_before, generation=generation,
                             command=command)
    full = sharding.full_state_dict(model) if sharding.is_sharded(model) else None  # collective
    if accelerator.is_main_process:
        _save_adapter(unwrapped, out, full)
        atomic_write_json(results, out / RESULTS_NAME)
    accelerator.wait_for_everyone()
    return results
