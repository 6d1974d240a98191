"""Tests of asarm.tokenization: loading, the code whitespace mapping, the exact codec, training."""

from __future__ import annotations

import random
import sysconfig
from pathlib import Path

import pytest
import transformers
from packaging.version import Version

from asarm import tokenization as T
from asarm.tokenization import (ESCAPE, CodeTokenizer, TokenizerLoadError, decode_code, decode_text, encode_code,
                                encode_text, escape_specials, load_xlnet_tokenizer, train_tokenizer,
                                unescape_specials)

_TRANSFORMERS = Version(transformers.__version__)
STDLIB = Path(sysconfig.get_paths()["stdlib"])
# files known to contain literal special spellings, CRLF line ends, non-UTF-8 bytes, odd characters
TRICKY = ["test/test_re.py", "email/feedparser.py", "lib2to3/pgen2/conv.py", "zoneinfo/_zoneinfo.py",
          "lib2to3/tests/data/crlf.py", "test/encoded_modules/module_iso_8859_1.py",
          "test/encoded_modules/module_koi8_r.py", "test/test_source_encoding.py", "test/test_unicode.py",
          "test/test_fstring.py", "test/tokenizedata/badsyntax_pep3120.py"]

EDGE_CASES = [
    "", " ", "  ", "   ", "\n", "\t", "\r\n", "\x0c", "a  b   c    d     e",
    "<cls>", "<sep>", "<unk>", "<s>", "</s>", "<pad>", "<mask>", "<eod>", "<eop>",
    "<<cls>>", "<\n>", "<\t", "< cls>", "<cls", "cls>", "</s></s>", "<s>\n</s>",
    ESCAPE, ESCAPE * 3, ESCAPE + "{5e}", "<" + ESCAPE + "mask>", ESCAPE + "<mask>", "<" + ESCAPE, ESCAPE + "{",
    ESCAPE + "{110000}", "x^y", "caf\u00e9 \u4e2d\u6587 \U0001f600", "\u2581x \u2581", "''", "``", "\udc80\udcff",
    "def f():\n    return ''  # \u00e9\n\tpass   \n",
]


def _read(path: Path) -> str:
    return path.read_bytes().decode("utf-8", "surrogateescape")


def _stdlib_sample(n: int, seed: int) -> list[Path]:
    files = sorted(p for p in STDLIB.rglob("*.py") if "site-packages" not in p.parts)
    chosen = random.Random(seed).sample(files, min(n, len(files)))
    chosen += [STDLIB / t for t in TRICKY if (STDLIB / t).is_file()]
    return chosen


@pytest.fixture(scope="module")
def xlnet():
    return load_xlnet_tokenizer()


@pytest.fixture(scope="module")
def codec(xlnet):
    return CodeTokenizer(xlnet)


# ------------------------------------------------------------------------------ string level
@pytest.mark.parametrize("text", EDGE_CASES)
def test_string_round_trip_edge_cases(text):
    encoded = encode_code(text)
    assert decode_code(encoded) == text
    assert "\n" not in encoded and "\t" not in encoded and "  " not in encoded
    everything = encode_code(text, escape=lambda c: True)
    assert decode_code(everything) == text
    names = "".join(T.XLNET_SPECIAL_TOKENS)  # escaped literal spellings keep their letters
    assert set(everything) <= set(names + "{}0123456789abcdef " + ESCAPE)


def test_mapping_is_the_spec_mapping():
    assert encode_code("a\nb\tc  d   e") == "a<cls>b<sep>c<unk>d<unk> e"
    assert decode_code("a<cls>b<sep>c<unk>d<unk> e") == "a\nb\tc  d   e"
    # literal special spellings are escaped so that they never read as whitespace or special tokens
    assert encode_code("<cls><mask></s>") == f"<{ESCAPE}cls><{ESCAPE}mask><{ESCAPE}/s>"
    assert encode_code(ESCAPE) == ESCAPE * 2
    assert encode_code("x^y", escape="^") == f"x{ESCAPE}{{5e}}y"


def test_string_round_trip_random_strings():
    rng = random.Random(0)
    alphabet = list("<>/clsepunkmadoxy{}5e ") + ["\n", "\t", ESCAPE, "^", "\u00e9"]
    for _ in range(3000):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 30)))
        assert decode_code(encode_code(text)) == text
        assert decode_code(encode_code(text, escape={"<", "e", "^", "/"})) == text
        assert unescape_specials(escape_specials(text)) == text


def test_string_round_trip_stdlib():
    files = _stdlib_sample(250, seed=1)
    with_specials = 0
    for path in files:
        text = _read(path)
        assert decode_code(encode_code(text)) == text, path
        with_specials += any(tok in text for tok in T.XLNET_SPECIAL_TOKENS)
    assert with_specials >= 3  # the sample exercises the escaping of literal special spellings


def test_decode_is_lenient_on_malformed_escapes():
    # model output may contain escape characters that no encoding produces: they pass through
    for text in [ESCAPE, ESCAPE + "x", ESCAPE + "{zz}", "<" + ESCAPE + "foo>", ESCAPE + "{110000}"]:
        assert decode_code(text) == text


# ------------------------------------------------------------------------------ token level
def test_loaders_agree_and_have_xlnet_layout(xlnet, tmp_path):
    from asarm.paths import data_file

    spiece = data_file("xlnet-base-cased/spiece.model")
    from_sp = load_xlnet_tokenizer(spiece)
    folder = tmp_path / "tok"
    folder.mkdir()
    (folder / "spiece.model").write_bytes(spiece.read_bytes())  # a bare spiece.model directory
    from_dir = load_xlnet_tokenizer(folder)
    text = "The quick brown fox, 3.14 -- caf\u00e9 (x) [y] {z}."
    for tok in (xlnet, from_sp, from_dir):
        assert len(tok) == 32000 and tok.mask_token_id == 6 and tok.eos_token_id == 2
        assert tok.convert_tokens_to_ids(list(T.XLNET_SPECIAL_TOKENS)) == list(range(9))
        assert tok(text, add_special_tokens=False)["input_ids"] == xlnet(text, add_special_tokens=False)["input_ids"]


def test_loader_errors(tmp_path, monkeypatch):
    with pytest.raises(TokenizerLoadError, match="does not exist"):
        load_xlnet_tokenizer(tmp_path / "missing")
    import huggingface_hub.constants

    monkeypatch.setenv("ASARM_DATA_DIR", str(tmp_path))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(TokenizerLoadError, match="xlnet-base-cased/spiece.model"):
        load_xlnet_tokenizer()


def test_plain_hf_path_is_lossy_as_documented(xlnet):
    """What the Hugging Face tokenizer itself does to mapped code (module doc, points 1-4)."""
    def plain(text):
        ids = xlnet(encode_code(text), add_special_tokens=False)["input_ids"]
        return ids, decode_code(xlnet.decode(ids))

    assert plain("x = ''")[1] == 'x = "'                        # '' -> "
    assert plain("caf\u00e9")[1] == "cafe"                      # accents stripped
    ids, back = plain("a ^ b")
    assert 0 in ids and back != "a ^ b"                          # OOV -> <unk> (= two spaces on decode)
    assert plain("if x:\n    y")[1] == "if x:\n     y"          # decode adds a space after a whitespace token
    assert plain("a  b")[0] == plain("a   b")[0]                 # odd runs of spaces lose their last space
    assert plain("x = 1 \ny")[1] == "x = 1\n y"                  # trailing spaces are lost
    assert 6 in _split_special_ids(xlnet, "a <mask> b")


def _split_special_ids(tokenizer, text):
    """``tokenizer(text, add_special_tokens=False, split_special_tokens=True)``; fast tokenizers take that
    argument from transformers 4.42, before it the same switch is the backend's ``encode_special_tokens``."""
    if _TRANSFORMERS >= Version("4.42"):
        return tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]
    backend = tokenizer.backend_tokenizer
    backend.encode_special_tokens = True
    try:
        return backend.encode(text, add_special_tokens=False).ids
    finally:
        backend.encode_special_tokens = False


def test_codec_matches_hf_on_ordinary_code(xlnet, codec):
    code = ("def add(a, b):\n    \"\"\"Add two numbers.\"\"\"\n    if a is None:\n        return b\n"
            "\treturn a + b  # sum\n\nclass Foo(object):\n    x = [1, 2, 3]\n")
    assert codec.encode(code) == xlnet(encode_code(code), add_special_tokens=False)["input_ids"]
    assert codec.decode(codec.encode(code)) == code


@pytest.mark.parametrize("text", EDGE_CASES)
def test_codec_round_trip_edge_cases(codec, text):
    ids = codec.encode(text)
    assert codec.decode(ids) == text
    # id 0 stands for exactly two spaces: unknown characters never produce it
    assert ids.count(0) == encode_code(text).count("<unk>")


def test_codec_round_trip_stdlib(codec):
    files = _stdlib_sample(25, seed=2)
    for path in files:
        text = _read(path)
        ids = codec.encode(text)
        assert codec.decode(ids) == text, path
        assert all(0 <= i < 32000 for i in ids)
        assert not set(ids) & {1, 2, 5, 6, 7, 8}  # no special token but the whitespace ones


def test_codec_parts_and_continuation(codec):
    text = _read(STDLIB / "json" / "encoder.py")[:3000]
    rng = random.Random(3)
    for _ in range(20):
        cuts = sorted(rng.sample(range(1, len(text)), 3))
        parts = [text[i:j] for i, j in zip([0, *cuts], [*cuts, len(text)])]
        encoded = codec.encode_parts(parts)
        assert codec.decode([i for part in encoded for i in part]) == text
        # a middle part decoded alone, as a continuation of the text before it
        before = sum(encoded[:1], [])
        middle = encoded[1]
        assert codec.decode(before) + codec.decode(middle, continues=not _ends_stretch(parts[0])) == parts[0] + parts[1]


def _ends_stretch(part: str) -> bool:
    n = len(part) - len(part.rstrip(" "))
    return part.endswith(("\n", "\t")) or (n > 0 and n % 2 == 0)


def test_encode_text_escapes_special_spellings(xlnet):
    text = "Use <mask> and </s> tags; a \u2044 slash."
    ids = encode_text(text, xlnet)
    assert not set(ids) & set(range(9))
    assert decode_text(ids, xlnet) == text
    assert encode_text([text, "b"], xlnet)[0] == ids


# ------------------------------------------------------------------------------ training
def test_train_tokenizer_unigram(tmp_path):
    from transformers import AutoTokenizer

    text = (STDLIB / "this.py").read_text() + _read(STDLIB / "textwrap.py")
    tok = train_tokenizer([text], vocab_size=300, out_dir=tmp_path / "uni")
    again = AutoTokenizer.from_pretrained(str(tmp_path / "uni"))
    for t in (tok, again):
        # the tokenizers-backed XLNet class is XLNetTokenizer from transformers 5, XLNetTokenizerFast before
        assert type(t).__name__ == ("XLNetTokenizer" if _TRANSFORMERS >= Version("5") else "XLNetTokenizerFast")
        assert t.mask_token_id == 6 and t.pad_token_id == 5 and t.eos_token_id == 2
        assert t.convert_tokens_to_ids(list(T.XLNET_SPECIAL_TOKENS)) == list(range(9))
        assert 100 < len(t) <= 300
    sample = "the text wraps at the width"
    assert again(sample, add_special_tokens=False)["input_ids"] == tok(sample, add_special_tokens=False)["input_ids"]
    assert load_xlnet_tokenizer(tmp_path / "uni" / "spiece.model")(sample)["input_ids"] == tok(sample)["input_ids"]


def test_train_tokenizer_code_bpe_round_trip(tmp_path):
    sources = [_read(STDLIB / name) for name in ("textwrap.py", "bisect.py", "colorsys.py")]
    tok = train_tokenizer(sources, vocab_size=300, out_dir=tmp_path / "code", model_type="bpe", code=True)
    codec = CodeTokenizer(tok)
    for text in sources + ["x ^ y  # caf\u00e9 <mask>\n"]:
        assert codec.decode(codec.encode(text)) == text


def test_train_tokenizer_rejects_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="model_type"):
        train_tokenizer(["a b c"], 100, tmp_path, model_type="wordpiece")
    with pytest.raises(ValueError, match="vocab_size"):
        train_tokenizer(["a b c"], 5, tmp_path)
