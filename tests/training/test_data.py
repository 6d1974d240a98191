"""Tests of asarm.training.data: packing, sharding, resuming, held-out splits, sources."""

from __future__ import annotations

import gzip
import json
import math

import pytest
import torch

from asarm.training.data import (HUB_PRESETS, CodeDirectorySource, DataSourceError, JsonlSource, PackedStream,
                                 StreamLoader, TextFileSource, hub_source, make_encoder)

EOS = 2
BASE = 1000


class DocIdEncoder:
    """Document ``"<i> <n>"`` -> ``n`` copies of token ``BASE + i``: every token names its document."""

    def __call__(self, text: str) -> list[int]:
        i, n = text.split()
        return [BASE + int(i)] * int(n)


def doc_lengths(n_docs: int) -> list[int]:
    return [1 + (7 * i) % 11 for i in range(n_docs)]


@pytest.fixture
def corpus(tmp_path):
    lengths = doc_lengths(40)
    path = tmp_path / "docs.txt"
    lines = [f"{i} {n}" for i, n in enumerate(lengths)]
    lines.insert(5, "   ")  # blank lines are skipped
    path.write_text("\n".join(lines) + "\n")
    return path, lengths


def expected_stream(doc_ids, lengths) -> list[int]:
    out = []
    for i in doc_ids:
        out += [BASE + i] * lengths[i] + [EOS]
    return out


def collect(stream_or_iter, n=None) -> list[torch.Tensor]:
    out = []
    for item in stream_or_iter:
        out.append(item["input_ids"] if isinstance(item, dict) else item)
        if n is not None and len(out) == n:
            break
    return out


def flat(chunks) -> list[int]:
    return [t for c in chunks for t in (c.reshape(-1).tolist())]


def test_packing_is_greedy_and_drops_the_tail(corpus):
    path, lengths = corpus
    stream = PackedStream(TextFileSource(path), DocIdEncoder(), max_length=7)
    chunks = collect(stream)
    want = expected_stream(range(len(lengths)), lengths)
    assert all(c.shape == (7,) and c.dtype == torch.long for c in chunks)
    assert len(chunks) == len(want) // 7
    assert flat(chunks) == want[: len(chunks) * 7]


def test_shards_are_disjoint_and_complete(corpus):
    path, lengths = corpus
    world = 3
    seen = {}
    for rank in range(world):
        stream = PackedStream(TextFileSource(path), DocIdEncoder(), max_length=5, rank=rank, world_size=world)
        ids = flat(collect(stream))
        docs = {t - BASE for t in ids if t != EOS}
        assert all(d % world == rank for d in docs)
        assert ids == expected_stream(range(rank, len(lengths), world), lengths)[: len(ids)]
        seen[rank] = docs
    assert not (seen[0] & seen[1]) and not (seen[1] & seen[2]) and not (seen[0] & seen[2])


def test_workers_and_ranks_shard_by_document_index(corpus):
    path, lengths = corpus
    world, workers = 2, 2
    for rank in range(world):
        stream = PackedStream(TextFileSource(path), DocIdEncoder(), max_length=4, rank=rank, world_size=world)
        batches = list(StreamLoader(stream, batch_size=2, num_workers=workers))
        by_shard = {}
        for batch in batches:
            docs = {t - BASE for t in batch.reshape(-1).tolist() if t != EOS}
            shards = {d % (world * workers) for d in docs}
            assert len(shards) == 1  # a batch comes from one worker = one shard
            by_shard.setdefault(shards.pop(), []).extend(batch.reshape(-1).tolist())
        assert set(by_shard) == {rank * workers + w for w in range(workers)}
        for shard, ids in by_shard.items():
            assert ids == expected_stream(range(shard, len(lengths), world * workers), lengths)[: len(ids)]


@pytest.mark.parametrize("stop", [0, 1, 3, 7, 12])
@pytest.mark.parametrize("epochs", [1, 2])
def test_resume_equals_uninterrupted_run(corpus, stop, epochs):
    path, _ = corpus

    def make():
        return PackedStream(TextFileSource(path), DocIdEncoder(), max_length=6, epochs=epochs)

    full = flat(collect(make()))
    first = make()
    head = collect(first, stop) if stop else []
    state = json.loads(json.dumps(first.state_dict()))  # the state is JSON-serialisable
    resumed = make()
    resumed.load_state_dict(state)
    tail = collect(resumed)
    assert flat(head) + flat(tail) == full
    assert len(full) % 6 == 0 and len(head) + len(tail) == len(full) // 6


def test_resume_at_every_position_of_a_long_document(tmp_path):
    # one document much longer than a chunk, resumed inside it, across an epoch boundary
    path = tmp_path / "d.txt"
    path.write_text("0 23\n1 2\n")
    make = lambda: PackedStream(TextFileSource(path), DocIdEncoder(), max_length=4, epochs=3)  # noqa: E731
    full = flat(collect(make()))
    for stop in range(1, len(full) // 4):
        first = make()
        head = collect(first, stop)
        resumed = make()
        resumed.load_state_dict(first.state_dict())
        assert flat(head) + flat(collect(resumed)) == full


def test_resume_with_workers(corpus):
    path, lengths = corpus

    def make():
        stream = PackedStream(TextFileSource(path), DocIdEncoder(), max_length=5, rank=1, world_size=2)
        return StreamLoader(stream, batch_size=2, num_workers=2)

    def per_shard(batches):
        out = {}
        for batch in batches:
            docs = {t - BASE for t in batch.reshape(-1).tolist() if t != EOS}
            out.setdefault(docs.pop() % 4, []).extend(batch.reshape(-1).tolist())
        return out

    full = per_shard(list(make()))
    first = make()
    head = []
    for batch in first:
        head.append(batch)
        if len(head) == 3:
            break
    state = first.state_dict()
    assert state["num_shards"] == 4 and set(state["positions"]) <= {2, 3}
    second = make()
    second.load_state_dict(state)
    rest = per_shard(list(second))
    got = per_shard(head)
    for shard in full:
        assert got.get(shard, []) + rest.get(shard, []) == full[shard]
    # a different worker count cannot resume this state
    third = PackedStream(TextFileSource(path), DocIdEncoder(), max_length=5, rank=1, world_size=2)
    third.load_state_dict(state)
    with pytest.raises(ValueError, match="same world_size and num_workers"):
        list(StreamLoader(third, batch_size=2, num_workers=0))


def test_state_must_match_the_stream(corpus):
    path, _ = corpus
    stream = PackedStream(TextFileSource(path), DocIdEncoder(), max_length=5)
    collect(stream, 2)
    other = PackedStream(TextFileSource(path), DocIdEncoder(), max_length=6)
    with pytest.raises(ValueError, match="max_length"):
        other.load_state_dict(stream.state_dict())


@pytest.mark.parametrize("mode", ["tail", "hash"])
def test_heldout_split_is_disjoint(corpus, mode):
    path, lengths = corpus
    kwargs = dict(heldout_fraction=0.2, heldout_mode=mode)
    train = list(TextFileSource(path, split="train", **kwargs).documents())
    held = list(TextFileSource(path, split="heldout", **kwargs).documents())
    everything = list(TextFileSource(path, split="all", **kwargs).documents())
    assert not set(train) & set(held)
    assert sorted(train + held) == sorted(everything) and len(everything) == len(lengths)
    if mode == "tail":
        assert held == everything[-math.ceil(0.2 * len(lengths)):]
        assert TextFileSource(path, split="heldout", **kwargs).num_documents() == len(held)
    # the packed training stream never contains a held-out document
    stream = PackedStream(TextFileSource(path, split="train", **kwargs), DocIdEncoder(), max_length=3)
    held_ids = {int(d.split()[0]) for d in held}
    assert not {t - BASE for t in flat(collect(stream)) if t != EOS} & held_ids
    with pytest.raises(ValueError, match="heldout_fraction"):
        TextFileSource(path, split="heldout")


def test_text_units_and_jsonl(tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("a b\nc\n\nd\n\n\ne f\n")
    assert list(TextFileSource(text).documents()) == ["a b", "c", "d", "e f"]
    assert list(TextFileSource(text, unit="paragraph").documents()) == ["a b\nc", "d", "e f"]
    assert list(TextFileSource(text, unit="file").documents()) == ["a b\nc\n\nd\n\n\ne f\n"]
    rows = [{"context_string": "one"}, {"context_string": "two\nlines"}, {"context_string": None}]
    plain = tmp_path / "r.jsonl"
    plain.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    packed = tmp_path / "r.jsonl.gz"
    with gzip.open(packed, "wt") as f:
        f.write(plain.read_text())
    for path in (plain, packed):
        assert list(JsonlSource(path, field="context_string").documents()) == ["one", "two\nlines"]
    with pytest.raises(DataSourceError, match="no field 'text'"):
        list(JsonlSource(plain).documents())
    with pytest.raises(DataSourceError, match="does not exist"):
        TextFileSource(tmp_path / "missing.txt")
    with pytest.raises(DataSourceError, match="matches no file"):
        TextFileSource(str(tmp_path / "*.nothing"))


def test_code_directory_source_reads_exact_text(tmp_path):
    root = tmp_path / "repo"
    (root / "pkg" / "tests").mkdir(parents=True)
    (root / "pkg" / "a.py").write_bytes(b"x = 1\r\n\tif x:\r\n  pass\r\n")
    (root / "pkg" / "b.py").write_bytes("s = '\u00e9'\n".encode() + b"# \xff\n")
    (root / "pkg" / "tests" / "test_a.py").write_text("assert True\n")
    (root / "notes.txt").write_text("not code\n")
    source = CodeDirectorySource(root, exclude=["*/tests/*"])
    assert source.files == ["pkg/a.py", "pkg/b.py"]
    docs = list(source.documents())
    assert docs[0] == "x = 1\r\n\tif x:\r\n  pass\r\n"
    assert docs[1].encode("utf-8", "surrogateescape") == (root / "pkg" / "b.py").read_bytes()
    with pytest.raises(DataSourceError, match="no file"):
        CodeDirectorySource(root, patterns="**/*.rs")


def test_code_stream_with_the_real_tokenizer(tmp_path):
    from asarm.tokenization import CodeTokenizer, load_xlnet_tokenizer

    root = tmp_path / "code"
    root.mkdir()
    files = {"a.py": "def f(x):\n    return x ^ 2  # <mask>\n", "b.py": "class A:\n\tpass\n" * 20,
             "c.py": "print('hi')\n" * 30}
    for name, text in files.items():
        (root / name).write_text(text)
    tokenizer = load_xlnet_tokenizer()
    stream = PackedStream(CodeDirectorySource(root), make_encoder(tokenizer, code=True), max_length=16)
    ids = flat(collect(stream))
    assert 6 not in ids  # literal <mask> text never becomes the mask token
    docs = []
    current = []
    for t in ids:
        if t == EOS:
            docs.append(current)
            current = []
        else:
            current.append(t)
    codec = CodeTokenizer(tokenizer)
    assert [codec.decode(d) for d in docs] == list(files.values())[: len(docs)]
    assert len(docs) >= 2
    text_stream = PackedStream(TextFileSource(root / "a.py", unit="file"), make_encoder(tokenizer), max_length=4)
    assert 6 not in flat(collect(text_stream))


def test_hub_source_fails_clearly_offline(monkeypatch):
    import datasets
    import huggingface_hub.constants

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    assert set(HUB_PRESETS) == {"openwebtext", "starcoder-python", "wikitext-2", "wikitext-103"}
    source = hub_source("wikitext-2")
    assert (source.name, source.config, source.field) == ("Salesforce/wikitext", "wikitext-2-raw-v1", "text")
    code = hub_source("starcoder-python")
    assert (code.name, code.data_dir, code.field) == ("bigcode/starcoderdata", "python", "content")
    stream = PackedStream(source, DocIdEncoder(), max_length=8)
    with pytest.raises(DataSourceError, match="HF_HUB_OFFLINE is set"):
        next(iter(stream))
    with pytest.raises(ValueError, match="unknown Hub preset"):
        hub_source("c4")
