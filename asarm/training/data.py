"""Packed, sharded, resumable token streams for the masking-distribution trainer (spec section 5).

Documents come from a :class:`DocumentSource` (local text / JSON-lines / a directory of code files, or
a Hugging Face dataset streamed from the Hub), are encoded with ``</s>`` (id 2) appended, and are
packed greedily into chunks of ``max_length`` tokens: the token stream of one shard is cut every
``max_length`` tokens, so a document may straddle two chunks. At the end of the data the last,
incomplete chunk is dropped.

Sharding
    Shard ``s = rank * num_workers + worker_id`` of ``S = world_size * num_workers`` owns the documents
    whose index ``i`` (position in the source's document order, after the train/held-out split)
    satisfies ``i % S == s``. No two (rank, dataloader worker) pairs ever see the same document.
    Hub datasets are split with ``datasets.distributed.split_dataset_by_node(rank=s, world_size=S)``:
    whole data files per shard when their number is a multiple of ``S``, else the same
    one-in-``S`` rule as above, so each process downloads only its share where possible.

Resuming
    A shard's position is ``(epoch, doc, offset)``: the next chunk starts at token ``offset`` of the
    shard's ``doc``-th document (``</s>`` included) in epoch ``epoch``. Every chunk travels with the
    position *after* it, the consumer records the positions of what it has consumed, and
    :meth:`PackedStream.load_state_dict` restarts every shard exactly there (skipping ``doc``
    documents without tokenising them, re-encoding one document and dropping ``offset`` tokens). The
    concatenation of an interrupted and a resumed run equals an uninterrupted run. The state records
    the shard count: resume with the same ``world_size`` and ``num_workers`` (each rank saves its own
    state). With dataloader workers use :class:`StreamLoader`, which records positions in the main
    process (a worker's copy of the dataset is not visible there); prefetched but unconsumed batches
    are not counted, so nothing is lost.

Held-out data
    Local sources take ``split="train" | "heldout" | "all"`` and ``heldout_fraction``: the held-out part
    is the last ``ceil(n * fraction)`` documents (``heldout_mode="tail"``) or the documents whose content
    hash falls below the fraction (``"hash"``: order- and sharding-independent; the only mode for Hub
    streams, whose length is unknown). Train and held-out never share a document.
"""

from __future__ import annotations

import glob as _glob
import hashlib
import math
import os
from collections import deque
from fnmatch import fnmatch
from pathlib import Path
from typing import Callable, Iterator, Sequence

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from ..offline import hub_offline, offline_reason
from ..inputs import check_text, iter_jsonl, iter_lines, read_text

__all__ = [
    "DataSourceError", "DocumentSource", "TextFileSource", "JsonlSource", "CodeDirectorySource", "HubSource",
    "HUB_PRESETS", "hub_source", "TextEncoder", "make_encoder", "PackedStream", "StreamLoader",
]

EOS_TOKEN_ID = 2
_SPLITS = ("train", "heldout", "all")


class DataSourceError(OSError):
    """A document source cannot be opened (missing files, Hub unreachable, unknown dataset or field).
    An OSError, so the commands report it in one line like other unreadable files."""


def _content_hash_unit(text: str) -> float:
    digest = hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2.0 ** 64


# ------------------------------------------------------------------------------------ sources
class DocumentSource:
    """Documents (strings) in a fixed order. Subclasses implement :meth:`documents`; the default
    :meth:`iter_shard` keeps every ``num_shards``-th document."""

    def documents(self) -> Iterator[str]:
        raise NotImplementedError

    def iter_shard(self, shard: int, num_shards: int, start: int = 0) -> Iterator[str]:
        """The documents ``i`` with ``i % num_shards == shard``, skipping the first ``start`` of them."""
        if not 0 <= shard < num_shards:
            raise ValueError(f"shard {shard} is outside 0..{num_shards - 1}")
        kept = 0
        for i, doc in enumerate(self.documents()):
            if i % num_shards != shard:
                continue
            if kept >= start:
                yield doc
            kept += 1


class _LocalSource(DocumentSource):
    def __init__(self, split: str = "train", heldout_fraction: float = 0.0, heldout_mode: str = "tail",
                 skip_blank: bool = True):
        if split not in _SPLITS:
            raise ValueError(f"split must be one of {_SPLITS}, got {split!r}")
        if not 0.0 <= heldout_fraction < 1.0:
            raise ValueError(f"heldout_fraction must lie in [0, 1), got {heldout_fraction}")
        if heldout_mode not in ("tail", "hash"):
            raise ValueError(f"heldout_mode must be 'tail' or 'hash', got {heldout_mode!r}")
        if split == "heldout" and heldout_fraction == 0.0:
            raise ValueError("split='heldout' needs heldout_fraction > 0")
        self.split = split
        self.heldout_fraction = heldout_fraction
        self.heldout_mode = heldout_mode
        self.skip_blank = skip_blank
        self._count: int | None = None

    def _raw_documents(self) -> Iterator[str]:
        raise NotImplementedError

    def _all_documents(self) -> Iterator[str]:
        for doc in self._raw_documents():
            if self.skip_blank and not doc.strip():
                continue
            yield doc

    def num_documents(self, split: str | None = None) -> int:
        """Number of documents in ``split`` (default: this source's split)."""
        if self._count is None:
            self._count = sum(1 for _ in self._all_documents())
        split = split or self.split
        if split == "all" or self.heldout_fraction == 0.0:
            return self._count if split != "heldout" else 0
        if self.heldout_mode == "tail":
            held = math.ceil(self._count * self.heldout_fraction)
            return held if split == "heldout" else self._count - held
        return sum(1 for _ in self._split_documents(split))

    def _split_documents(self, split: str) -> Iterator[str]:
        if split == "all" or self.heldout_fraction == 0.0:
            yield from self._all_documents()
            return
        if self.heldout_mode == "hash":
            want_heldout = split == "heldout"
            for doc in self._all_documents():
                if (_content_hash_unit(doc) < self.heldout_fraction) == want_heldout:
                    yield doc
            return
        n_train = self.num_documents("train")
        for i, doc in enumerate(self._all_documents()):
            if (i < n_train) == (split == "train"):
                yield doc

    def documents(self) -> Iterator[str]:
        yield from self._split_documents(self.split)


def _expand_paths(paths, what: str) -> list[Path]:
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    out: list[Path] = []
    for p in paths:
        s = str(p)
        if any(ch in s for ch in "*?["):
            matches = sorted(_glob.glob(os.path.expanduser(s), recursive=True))
            if not matches:
                raise DataSourceError(f"{what}: the pattern {s!r} matches no file")
            out += [Path(m) for m in matches]
        else:
            path = Path(s).expanduser()
            if not path.is_file():
                raise DataSourceError(f"{what}: file {s!r} does not exist")
            out.append(path)
    if not out:
        raise DataSourceError(f"{what}: no input files given")
    return out


class TextFileSource(_LocalSource):
    """UTF-8 text files (paths or glob patterns; gzip or zstd compressed ones are read as what they hold,
    ``asarm.inputs``), cut into documents by ``unit``: ``"line"`` (one document a line, e.g. WikiText
    rows), ``"paragraph"`` (blank-line separated blocks) or ``"file"``. Whitespace-only documents are
    skipped (``skip_blank``). A file that is not text fails at construction (its start is checked), a bad
    byte further on when it is read (ValueError naming the file and the byte offset)."""

    def __init__(self, paths, unit: str = "line", split: str = "train", heldout_fraction: float = 0.0,
                 heldout_mode: str = "tail", skip_blank: bool = True):
        super().__init__(split, heldout_fraction, heldout_mode, skip_blank)
        if unit not in ("line", "paragraph", "file"):
            raise ValueError(f"unit must be 'line', 'paragraph' or 'file', got {unit!r}")
        self.paths = _expand_paths(paths, "TextFileSource")
        self.unit = unit
        for path in self.paths:
            check_text(path)

    def _raw_documents(self) -> Iterator[str]:
        for path in self.paths:
            if self.unit == "file":
                yield read_text(path)
            elif self.unit == "line":
                for line in iter_lines(path):
                    yield line.rstrip("\r\n")
            else:
                block: list[str] = []
                for line in iter_lines(path):
                    if line.strip():
                        block.append(line)
                    elif block:
                        yield "".join(block).rstrip("\r\n")
                        block = []
                if block:
                    yield "".join(block).rstrip("\r\n")


class JsonlSource(_LocalSource):
    """JSON-lines files (``.jsonl``, or compressed: ``.jsonl.gz``, ``.jsonl.zst``); each row's ``field`` is a
    document. A file that is not text fails at construction, a line that is not JSON when it is read."""

    def __init__(self, paths, field: str = "text", split: str = "train", heldout_fraction: float = 0.0,
                 heldout_mode: str = "tail", skip_blank: bool = True):
        super().__init__(split, heldout_fraction, heldout_mode, skip_blank)
        self.paths = _expand_paths(paths, "JsonlSource")
        self.field = field
        for path in self.paths:
            check_text(path)

    def _raw_documents(self) -> Iterator[str]:
        for path in self.paths:
            for lineno, row in iter_jsonl(path):
                if not isinstance(row, dict):
                    raise DataSourceError(f"{path}:{lineno}: a JSON {type(row).__name__}, not an object with a "
                                          f"{self.field!r} field")
                if self.field not in row:
                    raise DataSourceError(f"{path}:{lineno}: no field {self.field!r} (fields: {sorted(row)})")
                value = row[self.field]
                if value is None:
                    continue
                if not isinstance(value, str):
                    raise DataSourceError(f"{path}:{lineno}: field {self.field!r} is a {type(value).__name__}, "
                                          f"not a string")
                yield value


class CodeDirectorySource(_LocalSource):
    """Every file under ``root`` matching one of ``patterns`` (glob, relative to ``root``, ``**``
    allowed) and none of ``exclude`` (fnmatch on the relative POSIX path), one document a file, in
    sorted path order. Files are read as UTF-8 with ``surrogateescape`` and without newline
    translation, so a document is the file's exact text (a stray non-UTF-8 byte survives as a lone
    surrogate); a NUL byte, the mark of a binary file, is an error."""

    def __init__(self, root, patterns: str | Sequence[str] = "**/*.py", exclude: Sequence[str] = (),
                 split: str = "train", heldout_fraction: float = 0.0, heldout_mode: str = "tail",
                 skip_blank: bool = True):
        super().__init__(split, heldout_fraction, heldout_mode, skip_blank)
        self.root = Path(root).expanduser()
        if not self.root.is_dir():
            raise DataSourceError(f"CodeDirectorySource: {str(self.root)!r} is not a directory")
        patterns = [patterns] if isinstance(patterns, str) else list(patterns)
        files = set()
        for pattern in patterns:
            files.update(p for p in self.root.glob(pattern) if p.is_file())
        rel = sorted(p.relative_to(self.root).as_posix() for p in files)
        self.files = [r for r in rel if not any(fnmatch(r, ex) for ex in exclude)]
        if not self.files:
            raise DataSourceError(f"CodeDirectorySource: no file under {str(self.root)!r} matches {patterns} "
                                  f"(excluding {list(exclude)})")

    def _raw_documents(self) -> Iterator[str]:
        for rel in self.files:
            yield read_text(self.root / rel, errors="surrogateescape")


# Hugging Face datasets used by the paper's training scripts (spec section 5).
HUB_PRESETS = {
    "openwebtext": dict(name="openwebtext", field="text"),
    "starcoder-python": dict(name="bigcode/starcoderdata", data_dir="python", field="content"),
    "wikitext-2": dict(name="Salesforce/wikitext", config="wikitext-2-raw-v1", field="text"),
    "wikitext-103": dict(name="Salesforce/wikitext", config="wikitext-103-raw-v1", field="text"),
}


class HubSource(DocumentSource):
    """A Hugging Face dataset streamed from the Hub (``datasets.load_dataset(..., streaming=True)``).

    ``heldout_fraction`` > 0 splits by content hash (``split`` ``"train"``/``"heldout"`` refer to that
    split when ``hub_split`` has no held-out part of its own, e.g. OpenWebText). Opening the dataset
    is deferred to the first iteration; failures raise DataSourceError saying why (offline, unknown
    name, ...).
    """

    def __init__(self, name: str, config: str | None = None, hub_split: str = "train", data_dir: str | None = None,
                 field: str = "text", split: str = "all", heldout_fraction: float = 0.0, skip_blank: bool = True,
                 batch_size: int = 256, **load_kwargs):
        if split not in _SPLITS:
            raise ValueError(f"split must be one of {_SPLITS}, got {split!r}")
        if split != "all" and heldout_fraction <= 0.0:
            raise ValueError(f"split={split!r} on a Hub source needs heldout_fraction > 0 (or use split='all' with "
                             f"the dataset's own hub_split)")
        self.name, self.config, self.hub_split, self.data_dir = name, config, hub_split, data_dir
        self.field, self.split, self.heldout_fraction = field, split, heldout_fraction
        self.skip_blank, self.batch_size, self.load_kwargs = skip_blank, batch_size, load_kwargs

    def _describe(self) -> str:
        parts = [repr(self.name)]
        if self.config:
            parts.append(f"config {self.config!r}")
        if self.data_dir:
            parts.append(f"data_dir {self.data_dir!r}")
        parts.append(f"split {self.hub_split!r}")
        return ", ".join(parts)

    def open(self):
        """The streaming ``datasets.IterableDataset`` (raises DataSourceError when it cannot be opened)."""
        try:
            import datasets
        except ImportError as err:  # pragma: no cover - datasets is a dependency
            raise DataSourceError("the 'datasets' package is needed for Hub sources") from err
        if hub_offline():
            raise DataSourceError(f"could not open Hugging Face dataset {self._describe()}: {offline_reason()}. "
                                  f"Pre-download it into the datasets cache on a connected machine, or use local "
                                  f"files (TextFileSource / JsonlSource / CodeDirectorySource)")
        try:
            return datasets.load_dataset(self.name, self.config, split=self.hub_split, data_dir=self.data_dir,
                                         streaming=True, **self.load_kwargs)
        except Exception as err:  # noqa: BLE001 - translate every failure into one clear error
            text = str(err).splitlines()[0] if str(err) else type(err).__name__
            lowered = (text + type(err).__name__).lower()
            if any(k in lowered for k in ("offline", "connect", "reach", "resolve", "network", "timed out")):
                why = ("the Hugging Face Hub is not reachable (offline?). Connect, pre-download the dataset into the "
                       "datasets cache, or train from local files (TextFileSource / JsonlSource / "
                       "CodeDirectorySource)")
            else:
                why = "check the dataset name, config, data_dir and split"
            raise DataSourceError(f"could not open Hugging Face dataset {self._describe()}: {why}. "
                                  f"Cause: {type(err).__name__}: {text}") from err

    def _keep(self, text) -> bool:
        if not isinstance(text, str) or (self.skip_blank and not text.strip()):
            return False
        if self.split == "all" or self.heldout_fraction <= 0.0:
            return True
        return (_content_hash_unit(text) < self.heldout_fraction) == (self.split == "heldout")

    def _iterate(self, ds) -> Iterator[str]:
        # ``IterableDataset.iter`` does not re-shard by dataloader worker (``__iter__`` would).
        for batch in ds.iter(batch_size=self.batch_size):
            if self.field not in batch:
                raise DataSourceError(f"dataset {self._describe()} has no field {self.field!r} "
                                      f"(fields: {sorted(batch)})")
            for text in batch[self.field]:
                if self._keep(text):
                    yield text

    def documents(self) -> Iterator[str]:
        yield from self._iterate(self.open())

    def iter_shard(self, shard: int, num_shards: int, start: int = 0) -> Iterator[str]:
        if not 0 <= shard < num_shards:
            raise ValueError(f"shard {shard} is outside 0..{num_shards - 1}")
        ds = self.open()
        if num_shards > 1:
            from datasets.distributed import split_dataset_by_node

            ds = split_dataset_by_node(ds, rank=shard, world_size=num_shards)
        for i, text in enumerate(self._iterate(ds)):
            if i >= start:
                yield text


def hub_source(preset: str, **overrides) -> HubSource:
    """A :class:`HubSource` for one of ``HUB_PRESETS`` (``openwebtext``, ``starcoder-python``,
    ``wikitext-2``, ``wikitext-103``); keyword arguments override the preset."""
    if preset not in HUB_PRESETS:
        raise ValueError(f"unknown Hub preset {preset!r}; known: {sorted(HUB_PRESETS)}")
    kwargs = dict(HUB_PRESETS[preset])
    kwargs.update(overrides)
    return HubSource(**kwargs)


# ------------------------------------------------------------------------------------ encoders
class TextEncoder:
    """Natural text -> ids with the tokenizer's normal normalisation (``asarm.tokenization.encode_text``)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def __call__(self, text: str) -> list[int]:
        from ..tokenization import encode_text

        return encode_text(text, self.tokenizer)


def make_encoder(tokenizer, code: bool = False) -> Callable[[str], list[int]]:
    """The document encoder for :class:`PackedStream`: ``CodeTokenizer`` (exact code codec with the
    whitespace mapping) when ``code``, else :class:`TextEncoder`. ``</s>`` is added by the stream."""
    if code:
        from ..tokenization import CodeTokenizer

        return CodeTokenizer(tokenizer)
    return TextEncoder(tokenizer)


# ------------------------------------------------------------------------------------ packing
def _dist_rank_world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


class PackedStream(IterableDataset):
    """Greedily packed ``max_length``-token chunks of ``encode(doc) + [eos_token_id]`` (module doc).

    Yields dicts ``{"input_ids": LongTensor (max_length,), "position": LongTensor (4,)}`` where
    ``position = (shard, epoch, doc, offset)`` is where the shard resumes after this chunk.

    Args:
        source: a :class:`DocumentSource`.
        encode: ``str -> list[int]`` without ``</s>`` (see :func:`make_encoder`).
        max_length: chunk length (512 in the paper).
        rank, world_size: this process's DDP rank; default: ``torch.distributed`` if initialised, else 0/1.
        epochs: passes over the data (``None``: forever); leftovers carry over between epochs.
    """

    def __init__(self, source: DocumentSource, encode: Callable[[str], Sequence[int]], max_length: int = 512,
                 eos_token_id: int = EOS_TOKEN_ID, rank: int | None = None, world_size: int | None = None,
                 epochs: int | None = 1):
        super().__init__()
        if max_length < 1:
            raise ValueError(f"max_length must be positive, got {max_length}")
        if epochs is not None and epochs < 1:
            raise ValueError(f"epochs must be >= 1 or None, got {epochs}")
        d_rank, d_world = _dist_rank_world()
        self.rank = d_rank if rank is None else int(rank)
        self.world_size = d_world if world_size is None else int(world_size)
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} is outside 0..{self.world_size - 1}")
        self.source = source
        self.encode = encode
        self.max_length = int(max_length)
        self.eos_token_id = int(eos_token_id)
        self.epochs = epochs
        self._num_shards: int | None = None  # fixed by the first iteration or a loaded state
        self._positions: dict[int, tuple[int, int, int]] = {}
        self._chunks: dict[int, int] = {}

    # ---------------------------------------------------------------------------- state
    def state_dict(self) -> dict:
        """Where every shard of this rank resumes (positions recorded so far)."""
        return {"version": 1, "rank": self.rank, "world_size": self.world_size, "num_shards": self._num_shards,
                "max_length": self.max_length, "eos_token_id": self.eos_token_id,
                "positions": {int(k): list(v) for k, v in self._positions.items()},
                "chunks": {int(k): int(v) for k, v in self._chunks.items()}}

    def load_state_dict(self, state: dict) -> None:
        if state.get("version") != 1:
            raise ValueError(f"unknown stream state version {state.get('version')!r}")
        for key in ("rank", "world_size", "max_length", "eos_token_id"):
            if state[key] != getattr(self, key):
                raise ValueError(f"stream state was saved with {key}={state[key]}, this stream has "
                                 f"{key}={getattr(self, key)}; resume with the same setting")
        self._num_shards = state["num_shards"]
        self._positions = {int(k): tuple(int(x) for x in v) for k, v in state["positions"].items()}
        self._chunks = {int(k): int(v) for k, v in state.get("chunks", {}).items()}

    def record(self, positions: torch.Tensor) -> None:
        """Mark chunks as consumed: ``positions (N, 4)`` rows ``(shard, epoch, doc, offset)`` in order."""
        for shard, epoch, doc, offset in torch.as_tensor(positions).reshape(-1, 4).tolist():
            self._positions[int(shard)] = (int(epoch), int(doc), int(offset))
            self._chunks[int(shard)] = self._chunks.get(int(shard), 0) + 1

    def set_num_workers(self, num_workers: int) -> None:
        """Fix the shard layout for ``num_workers`` dataloader workers (checked against a loaded state)."""
        shards = self.world_size * max(1, int(num_workers))
        if self._num_shards is not None and self._num_shards != shards:
            raise ValueError(f"stream state was saved with {self._num_shards} shards (world_size x num_workers), "
                             f"now {shards}: resume with the same world_size and num_workers")
        self._num_shards = shards

    # ---------------------------------------------------------------------------- iteration
    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        num_workers, worker_id = (info.num_workers, info.id) if info is not None else (1, 0)
        self.set_num_workers(num_workers)
        num_shards = self._num_shards
        shard = self.rank * num_workers + worker_id
        record_here = info is None  # in a worker, the consumer records positions (StreamLoader)
        L = self.max_length
        epoch, doc, offset = self._positions.get(shard, (0, 0, 0))
        buf: list[int] = []
        head = 0  # buf[head:] is still to be emitted
        # pieces of documents in ``buf``: [epoch, doc, first offset in buf, tokens left in buf]
        pieces: deque[list[int]] = deque()

        while self.epochs is None or epoch < self.epochs:
            seen_any = False
            index = doc
            for text in self.source.iter_shard(shard, num_shards, start=doc):
                seen_any = True
                ids = list(self.encode(text))
                ids.append(self.eos_token_id)
                start = offset if index == doc else 0
                if start:
                    ids = ids[start:]
                if ids:
                    if head:
                        del buf[:head]
                        head = 0
                    buf.extend(ids)
                    pieces.append([epoch, index, start, len(ids)])
                index += 1
                while len(buf) - head >= L:
                    chunk = buf[head:head + L]
                    head += L
                    need = L
                    last = None
                    while need:
                        piece = pieces[0]
                        take = min(need, piece[3])
                        piece[2] += take
                        piece[3] -= take
                        need -= take
                        if piece[3] == 0:
                            last = pieces.popleft()
                    if pieces:
                        pos = (pieces[0][0], pieces[0][1], pieces[0][2])
                    else:
                        pos = (last[0], last[1] + 1, 0)
                    if record_here:
                        self._positions[shard] = pos
                        self._chunks[shard] = self._chunks.get(shard, 0) + 1
                    yield {"input_ids": torch.tensor(chunk, dtype=torch.long),
                           "position": torch.tensor((shard, *pos), dtype=torch.long)}
            if not seen_any and doc == 0:
                break  # an empty shard: nothing to repeat
            epoch, doc, offset = epoch + 1, 0, 0


class StreamLoader:
    """A ``DataLoader`` over a :class:`PackedStream` that records what the training loop consumed.

    Iterating yields ``input_ids (B, max_length)``; ``state_dict()`` / ``load_state_dict()`` save and
    restore the stream position (load before iterating). Extra keyword arguments go to ``DataLoader``.
    """

    def __init__(self, stream: PackedStream, batch_size: int, num_workers: int = 0, **loader_kwargs):
        self.stream = stream
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.loader_kwargs = loader_kwargs

    def __iter__(self) -> Iterator[torch.Tensor]:
        self.stream.set_num_workers(self.num_workers)
        loader = DataLoader(self.stream, batch_size=self.batch_size, num_workers=self.num_workers,
                            **self.loader_kwargs)
        for batch in loader:
            if self.num_workers > 0:
                self.stream.record(batch["position"])
            yield batch["input_ids"]

    def state_dict(self) -> dict:
        return self.stream.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.stream.load_state_dict(state)
