"""Every input checked for its kind (issue 23, item 1): text, JSON lines, YAML, safetensors and model
directories fail with one line naming the file, what is wrong and the way out; gzip and zstd files are
read as what they hold."""

from __future__ import annotations

import gzip
import json
import shutil
import sys

import pytest
from safetensors import safe_open

from asarm import inputs
from asarm.cli import main
from asarm.eval.humaneval import load_problems
from asarm.eval.rocstories import load_stories
from asarm.eval.texts import packed_text
from asarm.model import ASARM, ModelLoadError
from asarm.training.config import load_config
from asarm.training.data import CodeDirectorySource, JsonlSource, TextFileSource

from helpers import tiny_model

# \r\n, a lone \r, a blank line, two-byte characters and no newline at the end
TEXT = "The first line of the text.\nA second, with café and naïve.\r\nthird\rfourth\n\nlast é"
STORY = ("The dog ran to the park. It saw a ball there. It picked the ball up. It ran home with it. "
         "The dog was happy.").split(". ")


def _one_line(err: str, *needles: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("asarm")]
    assert len(lines) == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def _bad(call, *needles: str) -> str:
    """``call()`` raises ValueError: one line that holds every needle."""
    with pytest.raises(ValueError) as info:
        call()
    message = str(info.value)
    assert "\n" not in message
    for needle in needles:
        assert needle in message, message
    return message


def _reference_lines(path) -> list[str]:
    with open(path, encoding="utf-8", newline="") as f:
        return list(f)


# ------------------------------------------------------------------------------------------- text
@pytest.mark.parametrize("chunk", [inputs._CHUNK, 3])  # 3: chunks end inside characters, lines and a \r\n
def test_text_and_gzip_are_read_exactly(tmp_path, monkeypatch, chunk):
    monkeypatch.setattr(inputs, "_CHUNK", chunk)
    data = TEXT.encode()
    plain = tmp_path / "text.txt"
    plain.write_bytes(data)
    # gzip under its own name, under a text name (found by its magic bytes), and as two concatenated members
    files = {"text.txt.gz": gzip.compress(data), "disguised.txt": gzip.compress(data),
             "members.gz": gzip.compress(data[:20]) + gzip.compress(data[20:])}
    for name, content in files.items():
        (tmp_path / name).write_bytes(content)
    for path in [plain, *(tmp_path / name for name in files)]:
        assert inputs.read_text(path) == TEXT
        assert list(inputs.iter_lines(path)) == _reference_lines(plain)
    assert inputs.compression(tmp_path / "disguised.txt") == "gzip" and inputs.compression(plain) is None


def test_latin1_bytes_name_the_offset(tmp_path):
    path = tmp_path / "latin1.txt"
    path.write_bytes("line one\nun café\n".encode("latin-1"))
    for read in (inputs.read_text, lambda p: list(inputs.iter_lines(p))):
        _bad(lambda: read(path), str(path), "not UTF-8 text", "byte 0xe9 at offset 15", "iconv")
    # code files keep a stray byte as a lone surrogate: the exact bytes come back
    assert inputs.read_text(path, errors="surrogateescape").encode("utf-8", "surrogateescape") == path.read_bytes()
    packed = tmp_path / "latin1.gz"
    packed.write_bytes(gzip.compress(path.read_bytes()))
    _bad(lambda: inputs.read_text(packed), "offset 15 of its decompressed content")


def test_nul_bytes_are_binary(tmp_path):
    path = tmp_path / "binary.txt"
    path.write_bytes(b"abc\ndef\x00ghi\n")
    _bad(lambda: list(inputs.iter_lines(path)), str(path), "binary file", "NUL byte at offset 7")
    _bad(lambda: inputs.read_text(path, errors="surrogateescape"), "NUL byte at offset 7")
    path.write_bytes(b"ab\xff\x00")  # the first bad byte is the one reported
    _bad(lambda: inputs.read_text(path), "byte 0xff at offset 2")


def test_bad_compressed_files(tmp_path, monkeypatch):
    truncated = tmp_path / "cut.txt.gz"
    truncated.write_bytes(gzip.compress(TEXT.encode() * 50)[:-30])
    _bad(lambda: inputs.read_text(truncated), str(truncated), "truncated or corrupt gzip", "uncompressed file")
    misnamed = tmp_path / "plain.gz"
    misnamed.write_text("not compressed\n")
    _bad(lambda: inputs.read_text(misnamed), str(misnamed), "named .gz but is not gzip-compressed")
    zstd_file = tmp_path / "text.zst"
    zstd_file.write_bytes(b"\x28\xb5\x2f\xfd" + b"\0" * 16)
    monkeypatch.setitem(sys.modules, "zstandard", None)  # as where it is not installed
    _bad(lambda: inputs.read_text(zstd_file), str(zstd_file), "zstd-compressed", "pip install zstandard",
         f"unzstd {zstd_file}")


def test_zstd_is_read_when_zstandard_is_installed(tmp_path):
    zstandard = pytest.importorskip("zstandard")
    data = TEXT.encode()
    frames = zstandard.ZstdCompressor().compress(data[:20]) + zstandard.ZstdCompressor().compress(data[20:])
    path = tmp_path / "text"
    path.write_bytes(frames)
    assert inputs.read_text(path) == TEXT and "".join(inputs.iter_lines(path)) == TEXT
    path.write_bytes(frames[:-4])
    _bad(lambda: inputs.read_text(path), "truncated or corrupt zstd")


# ------------------------------------------------------------------------------------ JSON, YAML
def test_broken_jsonl_line_3(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text('{"text": "one"}\n\n{"text": "two"}\n{"text": "three\n{"text": "four"}\n')
    _bad(lambda: list(inputs.iter_jsonl(path)), f"{path}, line 4", "not valid JSON", "column")
    path.write_text('{"text": "one"}\n{"text": "two"}\n{"text": oops}\n')
    _bad(lambda: list(inputs.iter_jsonl(path)), f"{path}, line 3", "column 10", "fix or remove that line")
    _bad(lambda: list(JsonlSource(path).documents()), "line 3")
    single = tmp_path / "results.json"
    single.write_text('{\n  "a": 1,\n  "b": \n}\n')
    _bad(lambda: inputs.read_json(single), str(single), "line 4, column 1")


def test_jsonl_readers_of_the_evaluations(tmp_path):
    row = {"task_id": "t/0", "prompt": "def f():\n", "suffix": "", "canonical_solution": "    return 1\n",
           "test": "def check(c):\n    assert c() == 1\n", "entry_point": "f"}
    packed = tmp_path / "problems.jsonl.gz"
    packed.write_bytes(gzip.compress((json.dumps(row) + "\n").encode()))
    assert [p.task_id for p in load_problems(path=packed)] == ["t/0"]
    broken = tmp_path / "broken.jsonl"
    broken.write_text(json.dumps(row) + "\n" + json.dumps(row) + "\n" + json.dumps(row)[:-1] + "\n")
    _bad(lambda: load_problems(path=broken), "line 3")
    rows = JsonlSource(tmp_path / "*.jsonl.gz", field="prompt")
    assert list(rows.documents()) == ["def f():\n"]
    numbers = tmp_path / "numbers.jsonl"
    numbers.write_text("1\n")
    with pytest.raises(OSError, match="numbers.jsonl:1: a JSON int, not an object"):
        list(JsonlSource(numbers).documents())


def test_broken_yaml(tmp_path, capsys):
    path = tmp_path / "config.yaml"
    path.write_text("model:\n  d_model: 16\n data:\n  max_length: 8\n")
    _bad(lambda: inputs.read_yaml(path), str(path), "not valid YAML", "line 3", "fix the file")
    _bad(lambda: load_config(path), "line 3")
    assert main(["train", "--config", str(path)]) == 2
    _one_line(capsys.readouterr().err, str(path), "line 3")
    packed = tmp_path / "config.yaml.gz"
    packed.write_bytes(gzip.compress(b"train:\n  max_steps: 7\n"))
    assert load_config(packed).train.max_steps == 7


# ------------------------------------------------------------------------- safetensors, model dirs
@pytest.fixture
def model_dir(tmp_path):
    path = tmp_path / "model"
    tiny_model().save_pretrained(path)
    return path


def test_safetensors_header(model_dir):
    weights = model_dir / "model.safetensors"
    header = inputs.read_safetensors_header(weights)
    with safe_open(str(weights), framework="pt") as f:  # the same tensors and shapes as safetensors reads
        assert {name: entry["shape"] for name, entry in header.items() if name != "__metadata__"} == \
            {name: f.get_slice(name).get_shape() for name in f.keys()}
    data = weights.read_bytes()
    length = int.from_bytes(data[:8], "little")
    for cut, needle in [(5, "5 bytes, fewer than the 8"), (8 + length // 2, "header length field"),
                        (len(data) - 1, f"the file has {len(data) - 1:,}")]:
        weights.write_bytes(data[:cut])
        _bad(lambda: inputs.read_safetensors_header(weights), str(weights), "truncated or corrupt", needle,
             "save the model again")
    weights.write_bytes(data[:8] + b"[" * length + data[8 + length:])
    _bad(lambda: inputs.read_safetensors_header(weights), "not the JSON of a safetensors file")
    weights.write_bytes(gzip.compress(data))
    _bad(lambda: inputs.read_safetensors_header(weights), "gzip-compressed", f"gunzip {weights}")


def test_truncated_weights_fail_before_loading(model_dir, capsys):
    weights = model_dir / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(ModelLoadError, match="truncated or corrupt"):
        ASARM.from_pretrained(model_dir)
    assert main(["sample", "--model", str(model_dir), "--text", "a <mask>", "--no-progress"]) == 2
    _one_line(capsys.readouterr().err, str(weights), "truncated or corrupt")


def test_model_directory_checks(model_dir, tmp_path, capsys):
    assert inputs.check_model_dir(model_dir) == model_dir
    bare = tmp_path / "bare"
    shutil.copytree(model_dir, bare)
    (bare / "config.json").unlink()
    _bad(lambda: inputs.check_model_dir(bare), str(bare), "no config.json")
    assert main(["sample", "--model", str(bare), "--text", "a <mask>", "--no-progress"]) == 2
    _one_line(capsys.readouterr().err, "no config.json")
    (model_dir / "model.safetensors").rename(tmp_path / "elsewhere.safetensors")
    _bad(lambda: inputs.check_model_dir(model_dir), "no weights (model.safetensors)")
    with pytest.raises(ModelLoadError, match="no weights"):
        ASARM.from_pretrained(model_dir)
    (tmp_path / "elsewhere.safetensors").rename(model_dir / "model.safetensors")
    (model_dir / "asarm.json").write_text('{"trained_length": }')
    _bad(lambda: inputs.check_model_dir(model_dir), "asarm.json is not valid JSON", "line 1, column 20")
    _bad(lambda: inputs.check_model_dir(tmp_path / "missing"), "does not exist")


# ------------------------------------------------------------------------------ readers in use
def _speculative(tiny_model_dir, text_file, out):
    return main(["eval", "speculative", "--model", str(tiny_model_dir), "--text-file", str(text_file),
                 "--out", str(out), "--length", "12", "--num-sequences", "1", "--trials", "1", "--samplers",
                 "sequential", "--ppl-model", "none", "--device", "cpu", "--no-progress"])


def test_text_file_of_the_evaluations(tiny_model_dir, xlnet_tokenizer, tmp_path, capsys):
    plain = tmp_path / "text.txt"
    plain.write_text(TEXT * 4)
    packed = tmp_path / "text.bin"  # gzip under any name is read as the text it holds
    packed.write_bytes(gzip.compress(plain.read_bytes()))
    assert packed_text(xlnet_tokenizer, 12, packed).tolist() == packed_text(xlnet_tokenizer, 12, plain).tolist()
    assert _speculative(tiny_model_dir, packed, tmp_path / "run") == 0
    assert json.loads((tmp_path / "run" / "results.json").read_text())["metrics"]
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes((TEXT * 4).encode("latin-1"))
    nul = tmp_path / "nul.txt"
    nul.write_bytes(b"\x00" + plain.read_bytes())
    for path, needle in [(latin1, "byte 0xe9 at offset 46"), (nul, "NUL byte at offset 0")]:
        assert _speculative(tiny_model_dir, path, tmp_path / "bad") == 2
        _one_line(capsys.readouterr().err, "asarm eval", str(path), needle)
        assert not (tmp_path / "bad" / "results.json").exists()


def test_training_sources_check_files_before_use(tmp_path):
    binary = tmp_path / "weights.txt"
    binary.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)))
    _bad(lambda: TextFileSource(binary), str(binary), "byte 0x89 at offset 0")
    _bad(lambda: JsonlSource(binary), str(binary))
    packed = tmp_path / "docs.txt.gz"
    packed.write_bytes(gzip.compress(b"one\n\ntwo\r\nthree"))
    assert list(TextFileSource(packed, unit="line").documents()) == ["one", "two", "three"]
    assert list(TextFileSource(packed, unit="paragraph").documents()) == ["one", "two\r\nthree"]
    code = tmp_path / "repo"
    code.mkdir()
    (code / "a.py").write_bytes(b"x = 1\x00\n")
    _bad(lambda: list(CodeDirectorySource(code).documents()), "a.py", "NUL byte at offset 5")


def test_story_cloze_file(tmp_path):
    columns = ["InputStoryid", *(f"InputSentence{i}" for i in range(1, 5)), "RandomFifthSentenceQuiz1",
               "RandomFifthSentenceQuiz2", "AnswerRightEnding"]
    table = "\t".join(columns) + "\r\n" + "\t".join(["s1", *STORY[:4], STORY[4], "The dog was sad.", "1"]) + "\r\n"
    packed = tmp_path / "stories.tsv.gz"  # a TSV by what it holds, with a spreadsheet's byte-order mark
    packed.write_bytes(gzip.compress(("\ufeff" + table).encode()))
    assert load_stories(packed)[0].sentences == tuple(STORY)
    latin1 = tmp_path / "stories.csv"
    latin1.write_bytes(table.replace("\t", ",").replace("dog", "chien é").encode("latin-1"))
    _bad(lambda: load_stories(latin1), str(latin1), "not UTF-8 text")
