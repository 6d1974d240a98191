"""Reading the files a command is given, after checking that each is of the kind it should be.

A file of the wrong kind used to be read anyway: a compressed or binary file given as ``--text-file``
was decoded into garbage, benchmarked and reported as if all were well. The readers here check first
and fail with one line (ValueError) naming the file, what is wrong with it and the way out:

- text (:func:`read_text`, :func:`iter_lines`): UTF-8 without NUL bytes (a NUL marks a binary file);
  the error gives the byte offset of the first byte that is not text;
- JSON and JSON lines (:func:`read_json`, :func:`iter_jsonl`): the line and column that fail to parse;
- YAML (:func:`read_yaml`): the line and column of the problem;
- safetensors (:func:`read_safetensors_header`): the 8-byte little-endian header length, the JSON
  header, and that the file holds every byte the header describes, before torch or safetensors maps it;
- a model directory (:func:`check_model_dir`): config.json, weights, every JSON file and safetensors
  header sound.

Compressed files are read transparently as what they hold (as the trainer and the HumanEval reader
always read ``.gz``): gzip and zstd, recognised by their magic bytes under any name, so ``data.jsonl.gz``
is JSON lines and a gzip file named ``text.txt`` is its text. zstd needs the ``zstandard`` module; without
it a zstd file is a one-line error saying how to decompress it. A name ending in ``.gz`` or ``.zst`` on a
file that is not so compressed is an error too. Byte offsets in errors then count in the decompressed
content. Safetensors weights are the exception: they are memory-mapped, so a compressed one is refused
with the command that decompresses it.
"""

from __future__ import annotations

import io
import json
import os
import zlib
from pathlib import Path
from typing import Any, Iterator

import yaml

__all__ = ["compression", "content_suffix", "read_text", "iter_lines", "check_text", "read_json", "iter_jsonl",
           "read_yaml", "read_safetensors_header", "check_model_dir"]

_CHUNK = 1 << 20
_MAGIC = {b"\x1f\x8b": "gzip", b"\x28\xb5\x2f\xfd": "zstd"}
_SUFFIXES = {".gz": "gzip", ".zst": "zstd"}
_DECOMPRESS = {"gzip": "gunzip", "zstd": "unzstd"}
# the weights a backbone loads: one file or shards (model-00001-of-00002.safetensors), or PyTorch's format
_WEIGHTS = ("model*.safetensors", "pytorch_model*.bin")


# ------------------------------------------------------------------------------------ compression
def compression(path: str | os.PathLike) -> str | None:
    """``"gzip"``, ``"zstd"`` or None (not compressed), from the file's first bytes whatever its name;
    ValueError when the name says compressed and the bytes do not."""
    with open(path, "rb") as f:
        head = f.read(4)
    kind = next((k for magic, k in _MAGIC.items() if head.startswith(magic)), None)
    suffix = Path(path).suffix.lower()
    named = _SUFFIXES.get(suffix)
    if named is not None and kind != named:
        raise ValueError(f"{path} is named {suffix} but is not {named}-compressed; rename it, or compress it "
                         f"with {named}")
    return kind


def content_suffix(path: str | os.PathLike) -> str:
    """The suffix of what the file holds: ``".jsonl"`` for ``data.jsonl`` and ``data.jsonl.gz`` alike."""
    path = Path(path)
    return path.with_suffix("").suffix if path.suffix.lower() in _SUFFIXES else path.suffix


def _decompressor(kind: str, path):
    """A factory of one-stream decompressors (``decompress``, ``eof``, ``unused_data``) and their error type."""
    if kind == "gzip":
        return (lambda: zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)), zlib.error
    try:
        import zstandard
    except ImportError:
        raise ValueError(f"{path} is zstd-compressed and the zstandard module is not installed; pip install "
                         f"zstandard, or decompress it first ({_DECOMPRESS[kind]} {path})") from None
    return zstandard.ZstdDecompressor().decompressobj, zstandard.ZstdError


def _chunks(path, kind: str | None) -> Iterator[bytes]:
    """The file's content in pieces, decompressed when ``kind`` says so. A file of several gzip members or
    zstd frames (concatenated files) is their concatenation, as ``gunzip`` and ``unzstd`` read it."""
    with open(path, "rb") as f:
        if kind is None:
            while chunk := f.read(_CHUNK):
                yield chunk
            return
        new, error = _decompressor(kind, path)
        stream, data = None, b""
        try:
            while data := data or f.read(_CHUNK):
                stream = stream if stream is not None else new()
                yield stream.decompress(data)
                data, stream = (stream.unused_data, None) if stream.eof else (b"", stream)
        except error as err:
            raise ValueError(_corrupt(path, kind, str(err))) from None
        if stream is not None:
            raise ValueError(_corrupt(path, kind, "it ends in the middle of the stream"))


def _corrupt(path, kind: str, why: str) -> str:
    return f"{path} is truncated or corrupt {kind} data ({why}); compress it again, or give the uncompressed file"


# ------------------------------------------------------------------------------------------- text
def _decode(data: bytes, path, kind: str | None, offset: int, errors: str) -> str:
    """``data`` (which starts at byte ``offset`` of the content) as UTF-8; ValueError at the first byte
    that is not text. ``errors="surrogateescape"`` keeps undecodable bytes (as lone surrogates)."""
    nul = data.find(b"\0")
    where = " of its decompressed content" if kind else ""
    try:
        text = (data if nul < 0 else data[:nul]).decode("utf-8", errors)  # a bad byte before the NUL comes first
    except UnicodeDecodeError as err:
        raise ValueError(f"{path} is not UTF-8 text: byte {data[err.start]:#04x} at offset {offset + err.start}"
                         f"{where} does not decode; give a UTF-8 text file (convert one in another encoding "
                         f"with iconv -t utf-8)") from None
    if nul >= 0:
        raise ValueError(f"{path} is a binary file, not text: a NUL byte at offset {offset + nul}{where}; "
                         f"give a UTF-8 text file")
    return text


def read_text(path: str | os.PathLike, errors: str = "strict") -> str:
    """The whole text of a UTF-8 file, exactly (no newline translation)."""
    kind = compression(path)
    return _decode(b"".join(_chunks(path, kind)), path, kind, 0, errors)


def _byte_lines(chunks: Iterator[bytes]) -> Iterator[bytes]:
    """The lines of a byte stream, each ending in ``\\n`` but perhaps the last. The byte ``\\n`` never occurs
    inside a UTF-8 character, so each line decodes on its own."""
    tail = bytearray()
    for chunk in chunks:
        *lines, rest = chunk.split(b"\n")
        if lines:
            lines[0] = bytes(tail) + lines[0]
            tail.clear()
            yield from (line + b"\n" for line in lines)
        tail += rest
    if tail:
        yield bytes(tail)


def iter_lines(path: str | os.PathLike, errors: str = "strict") -> Iterator[str]:
    """The lines of a UTF-8 file with their endings, split as ``open(path, newline="")`` splits them
    (at ``\\n``, ``\\r\\n`` and ``\\r``), checked as they are read: the file is streamed, never held whole."""
    kind = compression(path)
    offset = 0
    for raw in _byte_lines(_chunks(path, kind)):
        text = _decode(raw, path, kind, offset, errors)
        offset += len(raw)
        if "\r" in text:  # a lone \r ends a line too
            yield from io.StringIO(text, newline="").readlines()
        else:
            yield text


def check_text(path: str | os.PathLike, errors: str = "strict") -> None:
    """Fail now rather than deep into a long run on a file that is no text at all (compressed garbage,
    a binary): its first lines, about a chunk of them, must read. The rest is checked as it is read."""
    seen = 0
    for line in iter_lines(path, errors):
        seen += len(line)
        if seen >= _CHUNK:
            return


# ----------------------------------------------------------------------------------- JSON, YAML
def read_json(path: str | os.PathLike) -> Any:
    """The value in a JSON file."""
    try:
        return json.loads(read_text(path))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON ({err.msg} at line {err.lineno}, column {err.colno}); "
                         f"fix or replace the file") from None


def iter_jsonl(path: str | os.PathLike) -> Iterator[tuple[int, Any]]:
    """``(line number, value)`` for each non-blank line of a JSON-lines file, streamed."""
    for lineno, line in enumerate(iter_lines(path), 1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}, line {lineno}: not valid JSON ({err.msg} at column {err.colno}); fix or "
                             f"remove that line") from None
        yield lineno, value


def read_yaml(path: str | os.PathLike) -> Any:
    """The document in a YAML file (None for an empty one)."""
    try:
        return yaml.safe_load(read_text(path))
    except yaml.YAMLError as err:
        raise ValueError(f"{path} is not valid YAML ({_yaml_problem(err)}); fix the file") from None


def _yaml_problem(err: yaml.YAMLError) -> str:
    """``problem at line L, column C`` of a parser error, in one line."""
    mark = getattr(err, "problem_mark", None)
    problem = getattr(err, "problem", None) or str(err).splitlines()[0]
    return f"{problem} at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else problem


# ------------------------------------------------------------------------------------ safetensors
def read_safetensors_header(path: str | os.PathLike) -> dict:
    """The JSON header of a safetensors file (tensor name -> dtype, shape, data_offsets; ``__metadata__``),
    after checking that the file is one and holds every byte its header describes."""
    kind = compression(path)
    if kind is not None:
        raise ValueError(f"{path} is {kind}-compressed; decompress it ({_DECOMPRESS[kind]} {path}): safetensors "
                         f"weights are memory-mapped, not read through a decompressor")
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        if size < 8:
            raise ValueError(_broken(path, f"it has {size} bytes, fewer than the 8 of its header length field"))
        length = int.from_bytes(f.read(8), "little")
        if length > size - 8:
            raise ValueError(_broken(path, f"its header length field ({length:,} bytes) runs past the end of the "
                                           f"file ({size:,} bytes)"))
        raw = f.read(length)
    try:
        header = json.loads(raw)
        tensors = [entry for name, entry in header.items() if name != "__metadata__"]
        end = max((int(entry["data_offsets"][1]) for entry in tensors), default=0)
    except (ValueError, TypeError, KeyError, IndexError, AttributeError, RecursionError):  # RecursionError: "[[[[..."
        raise ValueError(_broken(path, "its header is not the JSON of a safetensors file")) from None
    if 8 + length + end > size:
        raise ValueError(_broken(path, f"its header describes {8 + length + end:,} bytes, the file has {size:,}"))
    return header


def _broken(path, why: str) -> str:
    return f"{path} is truncated or corrupt: {why}; download or save the model again"


# -------------------------------------------------------------------------------- model directory
def check_model_dir(path: str | os.PathLike) -> Path:
    """``path``, checked as a directory a model loads from: it has config.json (a JSON object) and weights,
    every JSON file in it parses and every safetensors file's header is sound."""
    path = Path(path)
    if not path.is_dir():
        raise ValueError(f"model directory {path} does not exist (or is not a directory); give the directory "
                         f"a model was saved to")
    if not (path / "config.json").is_file():
        raise ValueError(f"{path} is not a model directory: it has no config.json; give the directory a model was "
                         f"saved to (config.json beside model.safetensors)")
    if not any(next(path.glob(pattern), None) for pattern in _WEIGHTS):
        raise ValueError(f"{path} has config.json but no weights (model.safetensors); copy them beside it or save "
                         f"the model again")
    for file in sorted(path.glob("*.json")):
        value = read_json(file)
        if file.name == "config.json" and not isinstance(value, dict):
            raise ValueError(f"{file} is not a JSON object of config fields; save the model again")
    for file in sorted(path.glob("*.safetensors")):
        read_safetensors_header(file)
    return path
