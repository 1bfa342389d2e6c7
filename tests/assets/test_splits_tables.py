"""Splits (deterministic, stratified, disjoint, sizes recorded), built-in text tasks, and
load_table on small files made in tmp_path including every bad input."""

from __future__ import annotations

import json
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qpeft.assets import (
    TASK_NAMES,
    AssetError,
    load_table,
    load_task,
    stratified_split,
    stratified_subsample,
)

# ----------------------------------------------------------------- split machinery (pure)


@settings(max_examples=60, deadline=None)
@given(
    labels=st.lists(st.integers(0, 4), min_size=2, max_size=200),
    frac=st.floats(0.05, 0.95),
    seed=st.integers(0, 10**6),
)
def test_stratified_split_partition_and_proportions(labels, frac, seed):
    train, evals = stratified_split(labels, frac, seed)
    # disjoint and together exactly all indices
    assert not set(train) & set(evals)
    assert sorted(train + evals) == list(range(len(labels)))
    # deterministic
    assert (train, evals) == stratified_split(labels, frac, seed)
    counts = Counter(labels)
    ev = Counter(labels[i] for i in evals)
    tr = Counter(labels[i] for i in train)
    for c, n in counts.items():
        assert tr[c] >= 1, "every class keeps a training example"
        # per class, eval size is within one of the proportional share (or capped at n-1)
        assert ev[c] <= n - 1
        assert ev[c] >= min(n - 1, int(frac * n) - 1)
        assert ev[c] <= frac * n + 1 + 1e-9
    # total eval size is round(frac * N) unless capping by the keep-one-in-train rule bit
    target = int(frac * len(labels) + 0.5)
    assert len(evals) <= target
    assert len(evals) >= target - sum(1 for c in counts if counts[c] <= target)


def test_stratified_split_depends_on_seed():
    labels = [i % 3 for i in range(300)]
    a = stratified_split(labels, 0.2, 0)
    b = stratified_split(labels, 0.2, 1)
    assert set(a[1]) != set(b[1])
    assert Counter(labels[i] for i in a[1]) == Counter({0: 20, 1: 20, 2: 20})


@settings(max_examples=40, deadline=None)
@given(keys=st.lists(st.integers(0, 30), min_size=4, max_size=120), seed=st.integers(0, 99))
def test_stratified_split_groups_never_straddle(keys, seed):
    labels = [k % 3 for k in keys]
    train, evals = stratified_split(labels, 0.3, seed, groups=keys)
    assert sorted(train + evals) == list(range(len(keys)))
    assert not {keys[i] for i in train} & {keys[i] for i in evals}
    assert (train, evals) == stratified_split(labels, 0.3, seed, groups=keys)
    with pytest.raises(ValueError, match="groups"):
        stratified_split(labels, 0.3, seed, groups=keys[:-1])


def test_stratified_subsample_counts():
    labels = [0] * 50 + [1] * 30 + [2] * 20
    idx = stratified_subsample(labels, 10, seed=5)
    assert len(idx) == len(set(idx)) == 10
    assert Counter(labels[i] for i in idx) == Counter({0: 5, 1: 3, 2: 2})
    assert idx == stratified_subsample(labels, 10, seed=5)
    assert stratified_subsample(labels, 1000, seed=0) != list(range(100))  # shuffled order
    assert sorted(stratified_subsample(labels, 1000, seed=0)) == list(range(100))


@pytest.mark.parametrize("bad", [0.0, 1.0, -0.1, 1.5, "0.2", True])
def test_bad_eval_fraction(bad):
    with pytest.raises(ValueError, match="eval_fraction"):
        stratified_split([0, 1, 0, 1], bad, 0)


# ----------------------------------------------------------------- built-in text tasks


@pytest.fixture(scope="module")
def bbc():
    return load_task("bbc-news")


def test_bbc_news_split(bbc):
    assert bbc.kind == "text-classification" and bbc.metric == "accuracy"
    assert bbc.num_labels == 5 and len(bbc.label_names) == 5
    assert len(bbc.train) + len(bbc.eval) == 2225
    # 2,127 distinct texts (98 duplicated rows): the split is made over distinct texts
    assert bbc.split["duplicate_rows"] == 98
    assert abs(len(bbc.eval) - 445) <= 10
    s = bbc.split
    assert s["strategy"] == "stratified" and s["seed"] == 0 and s["eval_fraction"] == 0.2
    assert (s["train_size"], s["eval_size"]) == (len(bbc.train), len(bbc.eval))
    # published class sizes (assets.md) and stratification within one example per class
    totals = [a + b for a, b in zip(s["train_class_counts"], s["eval_class_counts"], strict=True)]
    assert totals == [510, 386, 417, 511, 401]
    for n, e in zip(totals, s["eval_class_counts"], strict=True):
        assert abs(e - 0.2 * n) <= 4
    assert Counter(ex["label"] for ex in bbc.eval) == Counter(
        dict(enumerate(s["eval_class_counts"]))
    )
    # disjoint by text: duplicated articles never straddle train and eval
    assert not {ex["text"] for ex in bbc.train} & {ex["text"] for ex in bbc.eval}
    assert all(isinstance(ex["text"], str) and len(ex["text"]) > 100 for ex in bbc.eval)
    # train order is shuffled (the source is grouped by topic)
    assert len({ex["label"] for ex in bbc.train[:50]}) > 1


def test_bbc_news_deterministic_and_seeded(bbc):
    again = load_task("bbc-news")
    assert again.split == bbc.split and again.train == bbc.train
    other = load_task("bbc-news", seed=1)
    assert other.split["eval_ids_sha256"] != bbc.split["eval_ids_sha256"]
    # distinct-text counts per class are seed-independent; row counts vary by duplicates only
    for a, b in zip(other.split["eval_class_counts"], bbc.split["eval_class_counts"],
                    strict=True):
        assert abs(a - b) <= 8


def test_bbc_news_max_train_max_eval(bbc):
    small = load_task("bbc-news", max_train=20, max_eval=10, seed=0)
    assert len(small.train) == 20 and len(small.eval) == 10
    assert sum(small.split["train_class_counts"]) == 20
    for k, n in zip(small.split["train_class_counts"], bbc.split["train_class_counts"],
                    strict=True):
        assert abs(k - 20 * n / len(bbc.train)) < 1  # proportional (largest remainder)
    assert small.split["eval_class_counts"] == [2, 2, 2, 2, 2]
    # the subsample is drawn from the full split's sides (no leakage)
    full_eval = {ex["text"] for ex in bbc.eval}
    assert {ex["text"] for ex in small.eval} <= full_eval
    assert not {ex["text"] for ex in small.train} & full_eval
    assert load_task("bbc-news", max_train=20, max_eval=10).train == small.train


def test_tweets():
    t = load_task("tweets", max_train=30, max_eval=9, seed=2)
    assert t.label_names == ["negative", "neutral", "positive"]
    assert t.split["source_size"] == 38158
    assert len(t.train) == 30 and len(t.eval) == 9
    assert t.split["eval_class_counts"] == [4, 3, 2]  # ~16186 : 15018 : 6954 of 9
    assert not {ex["text"] for ex in t.train} & {ex["text"] for ex in t.eval}


def test_shakespeare_holds_out_hamlet():
    d = load_task("shakespeare", max_train=5, max_eval=2)
    assert d.kind == "causal-lm" and d.metric == "perplexity" and d.num_labels is None
    assert d.split["eval_documents"] == ["hamlet_gut.txt"]
    assert "hamlet_gut.txt" not in d.split["train_documents"]
    assert len(d.split["train_documents"]) == 41
    assert len(d.train) == 5 and len(d.eval) == 2
    assert d.eval[0].startswith("HAMLET, PRINCE OF DENMARK")
    assert all(isinstance(x, str) and 0 < len(x) for x in d.train)
    assert not any("HAMLET, PRINCE OF DENMARK" in x for x in d.train)
    # eval budget is a prefix of Hamlet, independent of the seed; train subset is seeded
    other = load_task("shakespeare", max_train=5, max_eval=2, seed=1)
    assert other.eval == d.eval and other.train != d.train


@pytest.mark.parametrize(
    "kwargs, word",
    [
        ({"seed": "0"}, "seed"),
        ({"eval_fraction": 0.0}, "eval_fraction"),
        ({"max_train": 0}, "max_train"),
        ({"max_eval": -3}, "max_eval"),
    ],
)
def test_load_task_bad_arguments(kwargs, word):
    with pytest.raises(ValueError, match=word):
        load_task("bbc-news", **kwargs)


def test_load_task_unknown_name():
    with pytest.raises(ValueError, match="bbc-news"):
        load_task("imdb")
    assert TASK_NAMES == ("bbc-news", "tweets", "shakespeare", "fashion-mnist")


# ----------------------------------------------------------------- load_table


def _csv(path, rows, header="text,label"):
    path.write_text(header + "\n" + "\n".join(rows) + "\n", encoding="utf-8")
    return path


def _jsonl(path, objs):
    path.write_text("\n".join(json.dumps(o) for o in objs) + "\n", encoding="utf-8")
    return path


def test_load_table_csv_split(tmp_path):
    rows = [f"text {i},{'spam' if i % 3 == 0 else 'ham'}" for i in range(30)]
    f = _csv(tmp_path / "d.csv", rows)
    d = load_table(f, text_column="text", label_column="label", seed=0, eval_fraction=0.2)
    assert d.label_names == ["ham", "spam"] and d.num_labels == 2
    assert d.kind == "text-classification" and d.metric == "accuracy"
    assert len(d.train) + len(d.eval) == 30 and len(d.eval) == 6
    assert d.split["eval_class_counts"] == [4, 2]
    assert d.split["strategy"] == "stratified" and d.split["train_file"] == str(f)
    for ex in d.train + d.eval:
        assert ex["label"] == (1 if int(ex["text"].split()[1]) % 3 == 0 else 0)
    assert load_table(f, text_column="text", label_column="label").train == d.train


def test_load_table_quoted_csv_and_numeric_labels(tmp_path):
    rows = ['"a, quoted ""text""",10', "plain,2", "x,2", "y,10", "z,1", "w,1"]
    d = load_table(_csv(tmp_path / "n.csv", rows), text_column="text", label_column="label",
                   eval_fraction=0.5)
    assert d.label_names == ["1", "2", "10"]  # numeric order, not "1" < "10" < "2"
    texts = {ex["text"]: ex["label"] for ex in d.train + d.eval}
    assert texts['a, quoted "text"'] == 2 and texts["plain"] == 1


def test_load_table_jsonl_with_eval_file(tmp_path):
    tr = _jsonl(tmp_path / "tr.jsonl",
                [{"sentence": f"s{i}", "y": i % 2, "extra": 1} for i in range(8)])
    ev = _jsonl(tmp_path / "ev.jsonl", [{"sentence": "e0", "y": 1}, {"sentence": "e1", "y": 0}])
    d = load_table(tr, text_column="sentence", label_column="y", eval_file=ev)
    assert d.split["strategy"] == "files"
    assert len(d.train) == 8 and len(d.eval) == 2
    assert sorted((ex["text"], ex["label"]) for ex in d.eval) == [("e0", 1), ("e1", 0)]
    assert d.label_names == ["0", "1"]


def test_load_table_tsv_and_bom(tmp_path):
    f = tmp_path / "d.tsv"
    f.write_text("\ufefftext\tlabel\na\tx\nb\ty\nc\tx\nd\ty\n", encoding="utf-8")
    d = load_table(f, text_column="text", label_column="label", eval_fraction=0.5)
    assert d.num_labels == 2 and len(d.eval) == 2


def test_load_table_latin1_with_encoding(tmp_path):
    f = tmp_path / "l.csv"
    f.write_bytes("text,label\ncaf\xe9,a\nna\xefve,b\nx,a\ny,b\n".encode("latin-1"))
    with pytest.raises(AssetError, match="not valid utf-8"):
        load_table(f, text_column="text", label_column="label")
    d = load_table(f, text_column="text", label_column="label", encoding="latin-1")
    assert "café" in {ex["text"] for ex in d.train + d.eval}


def test_table_missing_file(tmp_path):
    with pytest.raises(AssetError, match="does not exist"):
        load_table(tmp_path / "nope.csv", text_column="t", label_column="l")


def test_table_missing_columns_lists_found(tmp_path):
    f = _csv(tmp_path / "d.csv", ["a,x", "b,y"], header="body,category")
    with pytest.raises(AssetError, match=r"no column\(s\) \['text'\].*\['body', 'category'\]"):
        load_table(f, text_column="text", label_column="category")
    j = _jsonl(tmp_path / "d.jsonl", [{"t": "a", "l": 1}])
    with pytest.raises(AssetError, match=r"\['label'\].*\['t', 'l'\]"):
        load_table(j, text_column="t", label_column="label")


def test_table_empty(tmp_path):
    f = tmp_path / "e.csv"
    f.write_text("text,label\n", encoding="utf-8")
    with pytest.raises(AssetError, match="empty"):
        load_table(f, text_column="text", label_column="label")
    g = tmp_path / "e.jsonl"
    g.write_text("\n\n", encoding="utf-8")
    with pytest.raises(AssetError, match="no column"):  # nothing at all: no columns either
        load_table(g, text_column="text", label_column="label")
    h = tmp_path / "z.csv"
    h.write_text("", encoding="utf-8")
    with pytest.raises(AssetError):
        load_table(h, text_column="text", label_column="label")


def test_table_single_class(tmp_path):
    f = _csv(tmp_path / "one.csv", ["a,x", "b,x", "c,x"])
    with pytest.raises(AssetError, match="single class"):
        load_table(f, text_column="text", label_column="label")


def test_table_bad_rows(tmp_path):
    f = _csv(tmp_path / "m.csv", ["a,x", "b,", "c,y"])
    with pytest.raises(AssetError, match="row 2.*missing or empty"):
        load_table(f, text_column="text", label_column="label")
    g = _csv(tmp_path / "extra.csv", ["a,x,oops", "b,y"])
    with pytest.raises(AssetError, match="more fields"):
        load_table(g, text_column="text", label_column="label")
    j = tmp_path / "bad.jsonl"
    j.write_text('{"text": "a", "label": 1}\n{not json}\n', encoding="utf-8")
    with pytest.raises(AssetError, match="line 2 is not valid JSON"):
        load_table(j, text_column="text", label_column="label")
    k = _jsonl(tmp_path / "arr.jsonl", [[1, 2]])
    with pytest.raises(AssetError, match="expected a JSON object"):
        load_table(k, text_column="text", label_column="label")
    n = _jsonl(tmp_path / "num.jsonl", [{"text": 5, "label": 1}, {"text": "b", "label": 0}])
    with pytest.raises(AssetError, match="must be a string"):
        load_table(n, text_column="text", label_column="label")


def test_table_unknown_extension(tmp_path):
    f = tmp_path / "d.xlsx"
    f.write_text("x", encoding="utf-8")
    with pytest.raises(AssetError, match="unknown extension"):
        load_table(f, text_column="text", label_column="label")


def test_table_eval_labels_unknown(tmp_path):
    tr = _csv(tmp_path / "tr.csv", ["a,x", "b,y"])
    ev = _csv(tmp_path / "ev.csv", ["c,z"])
    with pytest.raises(AssetError, match=r"\['z'\] that never occur"):
        load_table(tr, text_column="text", label_column="label", eval_file=ev)
    with pytest.raises(AssetError, match="eval_file.*does not exist"):
        load_table(tr, text_column="text", label_column="label", eval_file=tmp_path / "no.csv")


def test_asset_error_is_value_error():
    assert issubclass(AssetError, ValueError)
