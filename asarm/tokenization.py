"""Tokenizers for AS-ARMs: loading XLNet's SentencePiece vocabulary, the code whitespace mapping with
an exact inverse, and training small SentencePiece vocabularies laid out like XLNet's.

Code whitespace mapping (spec section 5)
----------------------------------------
XLNet's vocabulary has no tokens for newlines, tabs or indentation, so code is rewritten before it is
tokenised: ``"\\n" -> <cls>``, ``"\\t" -> <sep>``, two spaces ``-> <unk>`` (runs of spaces are paired
from the left, so three spaces are ``<unk>`` plus one space). On its own that is not invertible: a
file may contain the literal text ``<cls>``, and SentencePiece turns unknown characters into ``<unk>``
too. :func:`encode_code` therefore escapes first, with the escape character ``ESCAPE`` = ``"⁄"``
(U+2044 FRACTION SLASH: a single piece of XLNet's vocabulary, one of its rarest, unchanged by
NFKC/NFKD, and very rare in code and prose):

* ``ESCAPE`` itself -> ``ESCAPE ESCAPE``;
* a literal spelling of any of the nine XLNet special tokens ``<name>`` (``<unk>``, ``<s>``, ``</s>``,
  ``<cls>``, ``<sep>``, ``<pad>``, ``<mask>``, ``<eod>``, ``<eop>``) -> ``< ESCAPE name>``, which no
  tokenizer matches as a special token;
* optionally (``escape=``), any other character ``c`` -> ``ESCAPE {hex(ord(c))}``; the token-level codec
  uses this for every character the vocabulary cannot represent exactly.

then maps the whitespace. :func:`decode_code` reads the result left to right: ``<cls>``/``<sep>``/
``<unk>`` give back the whitespace, ``<ESCAPE name>`` a literal special spelling, ``ESCAPE ESCAPE`` the
escape character and ``ESCAPE{hex}`` the escaped character. Because every ``ESCAPE`` in an encoded
string starts one of these forms and no escape form contains a special spelling, decoding is
unambiguous and ``decode_code(encode_code(t)) == t`` for every string ``t`` (tested on CPython's
standard library). Malformed escapes (possible in model output) are copied through unchanged.

Token level: what the Hugging Face XLNet tokenizer really does
-------------------------------------------------------------
``tokenizer(encode_code(text))`` followed by ``decode_code(tokenizer.decode(ids))`` is NOT exact.
Measured with transformers 5.23 on ``xlnet-base-cased``:

1. the normaliser replaces ``''`` and ````` `` ````` by ``"`` (so ``x = ''`` comes back as ``x = "``),
   applies NFKD and strips accents (``café`` -> ``cafe``, ``ﬁ`` -> ``fi``);
2. whitespace: leading/trailing spaces of every stretch between special tokens are lost (so two
   and three spaces give the same ids, and trailing spaces vanish), and ``decode`` puts a space
   after each special token followed by a word (``"if x:\\n    y"`` comes back with five spaces);
3. characters outside the vocabulary (``^``, ``\\r``, ``\\f``, most non-Latin scripts, emoji) become
   id 0 = ``<unk>``, which the whitespace mapping then reads as two spaces;
4. literal ``<mask>``, ``<s>``, ... in the text become the special ids (the pieces are in the unigram
   vocabulary with the highest score, so even ``split_special_tokens=True`` does not prevent it).

:class:`CodeTokenizer` is the exact alternative: it bypasses the normaliser and feeds each stretch
between whitespace tokens straight to the unigram model (with SentencePiece's usual ``▁`` dummy
prefix, so ordinary code tokenises exactly as XLNet's tokenizer would), escapes every character that
is not a single piece of the vocabulary (plus ``▁`` itself), and decodes by joining pieces and
dropping each stretch's dummy prefix. Then ``decode(encode(t)) == t`` for every string, and id 0
means exactly "two spaces". For natural text :func:`encode_text` uses the normal tokenizer but
escapes literal special spellings, so text can never produce ``<mask>`` or ``</s>``.

XLNetTokenizer in transformers 5 ignores ``vocab_file=``: ``XLNetTokenizer(vocab_file="spiece.model")``
silently gives a 9-token vocabulary that maps everything to ``<unk>``. Use :func:`load_xlnet_tokenizer`.
"""

from __future__ import annotations

import io
import itertools
import json
import os
import re
from pathlib import Path
from typing import Callable, Iterable, Sequence

from .offline import hub_offline

__all__ = [
    "XLNET_SPECIAL_TOKENS", "ESCAPE", "WHITESPACE_TOKENS", "WORD_START", "TokenizerLoadError",
    "load_xlnet_tokenizer", "tokenizer_from_sentencepiece",
    "encode_code", "decode_code", "escape_specials", "unescape_specials",
    "CodeTokenizer", "encode_text", "decode_text", "train_tokenizer",
]

# XLNet's special tokens in id order (spec section 1).
XLNET_SPECIAL_TOKENS = ("<unk>", "<s>", "</s>", "<cls>", "<sep>", "<pad>", "<mask>", "<eod>", "<eop>")
UNK_ID, BOS_ID, EOS_ID, CLS_ID, SEP_ID, PAD_ID, MASK_ID, EOD_ID, EOP_ID = range(9)
ESCAPE = "\u2044"  # "⁄" FRACTION SLASH
# whitespace -> the special token standing for it (spec section 5)
WHITESPACE_TOKENS = {"\n": "<cls>", "\t": "<sep>", "  ": "<unk>"}
_TOKEN_WHITESPACE = {v: k for k, v in WHITESPACE_TOKENS.items()}
_WHITESPACE_IDS = {CLS_ID: "<cls>", SEP_ID: "<sep>", UNK_ID: "<unk>"}
HUB_TOKENIZER = "xlnet/xlnet-base-cased"
WORD_START = "\u2581"  # SentencePiece's word-start mark ("▁")

_names = sorted((t[1:-1] for t in XLNET_SPECIAL_TOKENS), key=len, reverse=True)
_special_alt = "|".join(re.escape("<" + n + ">") for n in _names)
# encode: one alternation, tried left to right at each position (specials before whitespace pairs)
_ENCODE_RE = re.compile(f"{_special_alt}|{re.escape(ESCAPE)}|\n|\t|  ")
_ENCODE_SPECIALS_RE = re.compile(f"{_special_alt}|{re.escape(ESCAPE)}")
_esc_names = "|".join(re.escape(n) for n in _names)
_DECODE_RE = re.compile(
    f"<cls>|<sep>|<unk>"                                   # mapped whitespace
    f"|<{re.escape(ESCAPE)}(?:{_esc_names})>"              # an escaped literal special spelling
    f"|{re.escape(ESCAPE)}{re.escape(ESCAPE)}"             # the escape character itself
    f"|{re.escape(ESCAPE)}\\{{[0-9a-f]{{1,6}}\\}}"          # an escaped character
)
_DECODE_SPECIALS_RE = re.compile(
    f"<{re.escape(ESCAPE)}(?:{_esc_names})>|{re.escape(ESCAPE)}{re.escape(ESCAPE)}"
    f"|{re.escape(ESCAPE)}\\{{[0-9a-f]{{1,6}}\\}}")


class TokenizerLoadError(OSError):
    """No tokenizer could be loaded from the given path, the data directory or the Hub."""


# ------------------------------------------------------------------------------------------ loading
def tokenizer_from_sentencepiece(model_file: str | os.PathLike | bytes):
    """An ``XLNetTokenizer`` built from a SentencePiece model (a path or the serialised bytes).

    Reads pieces and scores with the ``sentencepiece`` library, so it needs neither ``protobuf`` nor
    a ``tokenizer.json`` (transformers 5 needs one of them to load a bare ``spiece.model``).
    """
    import sentencepiece as spm

    if isinstance(model_file, (bytes, bytearray)):
        sp = spm.SentencePieceProcessor(model_proto=bytes(model_file))
    else:
        sp = spm.SentencePieceProcessor(model_file=str(model_file))
    vocab = [(sp.id_to_piece(i), float(sp.get_score(i))) for i in range(sp.get_piece_size())]
    for i, name in enumerate(XLNET_SPECIAL_TOKENS):
        if i >= len(vocab) or vocab[i][0] != name:
            raise TokenizerLoadError(f"SentencePiece model does not have XLNet's special tokens at ids 0-8 "
                                     f"(id {i} is {vocab[i][0] if i < len(vocab) else None!r}, expected {name!r})")
    if _transformers_5():
        from transformers import XLNetTokenizer

        return XLNetTokenizer(vocab=vocab, unk_id=UNK_ID)
    # transformers 4.x: XLNetTokenizer is the slow sentencepiece class (it needs vocab_file=) and the fast one
    # would convert the model with protobuf; build the pipeline transformers 5's XLNetTokenizer builds instead.
    from tokenizers import Tokenizer, decoders, normalizers, pre_tokenizers, processors
    from tokenizers.models import Unigram
    from transformers import XLNetTokenizerFast

    backend = Tokenizer(Unigram(vocab, unk_id=UNK_ID, byte_fallback=False))
    backend.normalizer = normalizers.Sequence([normalizers.Replace("``", '"'), normalizers.Replace("''", '"'),
                                               normalizers.NFKD(), normalizers.StripAccents()])
    backend.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(),
                                                     pre_tokenizers.Metaspace(replacement=WORD_START,
                                                                              prepend_scheme="always")])
    backend.decoder = decoders.Metaspace(replacement=WORD_START, prepend_scheme="always")
    backend.post_processor = processors.TemplateProcessing(
        single="$A:0 <sep>:0 <cls>:2", pair="$A:0 <sep>:0 $B:1 <sep>:1 <cls>:2",
        special_tokens=[("<sep>", SEP_ID), ("<cls>", CLS_ID)])
    return XLNetTokenizerFast(tokenizer_object=backend)


def _transformers_5() -> bool:
    """Whether ``transformers.XLNetTokenizer`` is the tokenizers-backed class (5.x) rather than the slow one (4.x)."""
    import transformers
    from packaging.version import Version

    return Version(transformers.__version__) >= Version("5")


def _check_layout(tokenizer, where: str):
    ids = tokenizer.convert_tokens_to_ids(list(XLNET_SPECIAL_TOKENS))
    if list(ids) != list(range(9)):
        raise TokenizerLoadError(f"tokenizer from {where} does not put XLNet's special tokens at ids 0-8: {ids}")
    return tokenizer


def load_xlnet_tokenizer(path: str | os.PathLike | None = None, hub_name: str = HUB_TOKENIZER):
    """Load XLNet's SentencePiece tokenizer (or one laid out like it, e.g. from :func:`train_tokenizer`).

    ``path``: a tokenizer directory, a ``tokenizer.json`` or a ``spiece.model``. Without it: the data
    directory's ``xlnet-base-cased/tokenizer.json`` or ``spiece.model`` (``asarm.paths``), else the Hub
    repository ``hub_name``. Raises TokenizerLoadError listing every place tried.
    """
    from transformers import AutoTokenizer

    # the tokenizers-backed class: XLNetTokenizer in transformers 5, XLNetTokenizerFast in 4.x
    if _transformers_5():
        from transformers import XLNetTokenizer as FastXLNetTokenizer
    else:
        from transformers import XLNetTokenizerFast as FastXLNetTokenizer

    tried: list[str] = []

    def from_file(p: Path):
        if p.suffix == ".json":
            return FastXLNetTokenizer(tokenizer_file=str(p))
        return tokenizer_from_sentencepiece(p)

    candidates: list[Path] = []
    if path is not None:
        p = Path(path).expanduser()
        if not p.exists():
            raise TokenizerLoadError(f"tokenizer path {str(p)!r} does not exist")
        if p.is_dir():
            try:
                return _check_layout(AutoTokenizer.from_pretrained(str(p)), str(p))
            except (OSError, ValueError, TypeError) as err:
                tried.append(f"{p} (AutoTokenizer: {str(err).splitlines()[0] if str(err) else type(err).__name__})")
            candidates += [p / "tokenizer.json", p / "spiece.model"]
        else:
            candidates.append(p)
    else:
        from .paths import data_file

        for name in ("xlnet-base-cased/tokenizer.json", "xlnet-base-cased/spiece.model"):
            found = data_file(name, required=False)
            if found is not None:
                candidates.append(found)
            else:
                tried.append(f"data directory: {name} (missing)")
    for cand in candidates:
        if not cand.is_file():
            continue
        try:
            return _check_layout(from_file(cand), str(cand))
        except TokenizerLoadError:
            raise
        except Exception as err:  # noqa: BLE001 - report every attempt
            tried.append(f"{cand} ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})")
    if path is None and hub_name:
        try:
            return _check_layout(AutoTokenizer.from_pretrained(hub_name, local_files_only=hub_offline()), hub_name)
        except (OSError, ValueError) as err:
            tried.append(f"Hub {hub_name!r} ({str(err).splitlines()[0] if str(err) else type(err).__name__})")
    raise TokenizerLoadError("could not load an XLNet tokenizer; tried: " + "; ".join(tried) +
                             ". Pass a tokenizer directory or spiece.model, or set ASARM_DATA_DIR to a folder "
                             "holding xlnet-base-cased/spiece.model")


# ------------------------------------------------------------------------------- string mapping
def _escape_char(c: str) -> str:
    return f"{ESCAPE}{{{ord(c):x}}}"


def encode_code(text: str, escape: Callable[[str], bool] | Iterable[str] | None = None) -> str:
    """Escape, then map ``\\n``/``\\t``/two spaces to ``<cls>``/``<sep>``/``<unk>`` (see module doc).

    ``escape``: extra characters to write as ``ESCAPE{hex}`` (a predicate or a collection); newline,
    tab, space and ``ESCAPE`` itself are never written that way.
    """
    if escape is not None:
        pred = escape if callable(escape) else frozenset(escape).__contains__
        bad = sorted(c for c in set(text) if c not in _NEVER_HEX_ESCAPED and pred(c))
        if bad:
            # One left-to-right scan: special spellings, the escape character and whitespace are tried
            # first at each position, then the single characters to escape.
            pattern = re.compile(_ENCODE_RE.pattern + "|[" + "".join(re.escape(c) for c in bad) + "]")
            return pattern.sub(_encode_match, text)
    return _ENCODE_RE.sub(_encode_match, text)


_NEVER_HEX_ESCAPED = frozenset(("\n", "\t", " ", ESCAPE))


def _encode_match(m: re.Match) -> str:
    s = m.group(0)
    if s in WHITESPACE_TOKENS:
        return WHITESPACE_TOKENS[s]
    if s == ESCAPE:
        return ESCAPE + ESCAPE
    if len(s) == 1:
        return _escape_char(s)
    return "<" + ESCAPE + s[1:]  # a literal special spelling


def _decode_match(m: re.Match) -> str:
    s = m.group(0)
    if s in _TOKEN_WHITESPACE:
        return _TOKEN_WHITESPACE[s]
    if s == ESCAPE + ESCAPE:
        return ESCAPE
    if s.startswith(ESCAPE + "{"):
        code = int(s[2:-1], 16)
        return chr(code) if code <= 0x10FFFF else s
    return "<" + s[2:]  # "<" ESCAPE name ">" -> "<name>"


def decode_code(text: str) -> str:
    """Inverse of :func:`encode_code`; malformed escapes are copied through unchanged."""
    return _DECODE_RE.sub(_decode_match, text)


def escape_specials(text: str) -> str:
    """Only the escaping part of :func:`encode_code` (for natural text): literal special spellings and
    the escape character; whitespace is left alone."""
    return _ENCODE_SPECIALS_RE.sub(_encode_match, text)


def unescape_specials(text: str) -> str:
    """Inverse of :func:`escape_specials`."""
    return _DECODE_SPECIALS_RE.sub(_decode_match, text)


# ------------------------------------------------------------------------------ natural text
def encode_text(text: str | Sequence[str], tokenizer) -> list[int] | list[list[int]]:
    """Token ids of natural text with the tokenizer's normal normalisation, no ``<sep><cls>`` added,
    and literal special spellings escaped (so ``"<mask>"`` in a web page never becomes id 6)."""
    if isinstance(text, str):
        return tokenizer(escape_specials(text), add_special_tokens=False)["input_ids"]
    return tokenizer([escape_specials(t) for t in text], add_special_tokens=False)["input_ids"]


def decode_text(ids: Sequence[int], tokenizer) -> str:
    """Decode ids from :func:`encode_text` (special tokens dropped, escapes undone)."""
    return unescape_specials(tokenizer.decode(list(ids), skip_special_tokens=True))


# ------------------------------------------------------------------------------ exact code codec
class CodeTokenizer:
    """Exact token-level codec for code: ``decode(encode(t)) == t`` for every string ``t``.

    Args:
        tokenizer: a Hugging Face tokenizer with a unigram (SentencePiece) backend laid out like
            XLNet's (special tokens at ids 0-8), e.g. from :func:`load_xlnet_tokenizer`.

    ``encode`` splits ``encode_code(text, escape=unrepresentable)`` at the whitespace tokens
    (ids ``<cls>`` 3, ``<sep>`` 4, ``<unk>`` 0); every stretch in between becomes
    ``"▁" + stretch.replace(" ", "▁")`` split before each ``▁`` (like SentencePiece's whitespace
    splitting) and tokenised by the unigram model without any normaliser. ``decode`` joins a
    stretch's pieces, drops its leading ``▁`` and turns the others back into spaces. Special ids other
    than 0/3/4 (``</s>``, ``<mask>``, ...) are dropped by ``decode``.

    ``continues=True`` encodes / decodes a piece of text that continues a stretch started by text
    before it (no dummy ``▁`` at its start): use it for the second and later parts of a document
    tokenised in parts (``encode_parts``), e.g. an infilling suffix that starts mid-line.
    """

    def __init__(self, tokenizer):
        backend = getattr(tokenizer, "backend_tokenizer", None)
        model = getattr(backend, "model", None)
        if model is None or type(model).__name__ != "Unigram":
            raise TypeError("CodeTokenizer needs a fast tokenizer with a Unigram model (XLNet's SentencePiece "
                            f"vocabulary); got {type(tokenizer).__name__}")
        _check_layout(tokenizer, type(tokenizer).__name__)
        self.tokenizer = tokenizer
        self._model = model
        vocab = tokenizer.get_vocab()
        self._pieces = [""] * (max(vocab.values()) + 1)
        for piece, idx in vocab.items():
            self._pieces[idx] = piece
        specials = set(XLNET_SPECIAL_TOKENS)
        self._single = frozenset(p for p in vocab if len(p) == 1 and p not in specials)
        needed = {ESCAPE, "{", "}", "<", ">", *"0123456789abcdef"}
        missing = sorted(needed - self._single)
        if missing:
            raise ValueError(f"the vocabulary lacks single-character pieces needed for escaping: {missing}")
        self._word_cache: dict[str, tuple[int, ...]] = {}
        self._special_ids = frozenset(range(len(XLNET_SPECIAL_TOKENS)))

    # characters written as ESCAPE{hex}: not a single piece, or the meta symbol itself
    def needs_escape(self, c: str) -> bool:
        return c == WORD_START or c not in self._single

    @property
    def vocab_size(self) -> int:
        return len(self._pieces)

    def _tokenize_word(self, word: str) -> tuple[int, ...]:
        ids = self._word_cache.get(word)
        if ids is None:
            ids = tuple(tok.id for tok in self._model.tokenize(word))
            if UNK_ID in ids:  # cannot happen after escaping; guard against vocabulary surprises
                raise ValueError(f"unigram model produced <unk> for {word!r}")
            if len(self._word_cache) < 1_000_000:
                self._word_cache[word] = ids
        return ids

    def _encode_stretch(self, stretch: str, dummy: bool, out: list[int]) -> None:
        s = stretch.replace(" ", WORD_START)
        if dummy:
            s = WORD_START + s
        start = 0
        for i in range(1, len(s) + 1):
            if i == len(s) or s[i] == WORD_START:
                out.extend(self._tokenize_word(s[start:i]))
                start = i

    def encode(self, text: str, continues: bool = False) -> list[int]:
        mapped = encode_code(text, escape=self.needs_escape)
        out: list[int] = []
        pos = 0
        dummy = not continues
        for m in _MAPPED_WS_RE.finditer(mapped):
            if m.start() > pos:
                self._encode_stretch(mapped[pos:m.start()], dummy, out)
            out.append(_MAPPED_WS_IDS[m.group(0)])
            pos = m.end()
            dummy = True
        if pos < len(mapped):
            self._encode_stretch(mapped[pos:], dummy, out)
        return out

    def encode_parts(self, parts: Sequence[str]) -> list[list[int]]:
        """Encode consecutive parts of one text so that ``decode(sum(result, []))`` gives ``"".join(parts)``."""
        out = []
        continues = False
        for part in parts:
            out.append(self.encode(part, continues=continues))
            if part:
                # the next part continues a stretch unless this one ends with a whitespace token
                continues = not (part.endswith(("\n", "\t")) or _ends_with_space_pair(part))
        return out

    def decode(self, ids: Sequence[int], continues: bool = False) -> str:
        chunks: list[str] = []
        stretch: list[str] = []
        first = not continues

        def flush():
            if stretch:
                s = "".join(stretch)
                if first and s.startswith(WORD_START):
                    s = s[1:]
                chunks.append(s.replace(WORD_START, " "))
                stretch.clear()

        for i in ids:
            i = int(i)
            if i in _WHITESPACE_IDS:
                flush()
                chunks.append(_WHITESPACE_IDS[i])
                first = True
            elif i in self._special_ids:
                continue
            else:
                stretch.append(self._pieces[i])
        flush()
        return decode_code("".join(chunks))

    def __call__(self, text: str) -> list[int]:
        return self.encode(text)


def _ends_with_space_pair(part: str) -> bool:
    # whether the mapping of ``part`` ends with a whitespace token <unk>: the trailing run of spaces
    # has even length (runs are paired from the left)
    n = len(part) - len(part.rstrip(" "))
    return n > 0 and n % 2 == 0


_MAPPED_WS_RE = re.compile("<cls>|<sep>|<unk>")
_MAPPED_WS_IDS = {"<cls>": CLS_ID, "<sep>": SEP_ID, "<unk>": UNK_ID}


# ------------------------------------------------------------------------------ training
def train_tokenizer(texts: Iterable[str] | str | os.PathLike | Sequence[str | os.PathLike], vocab_size: int,
                    out_dir: str | os.PathLike, model_type: str = "unigram", code: bool = False,
                    character_coverage: float = 1.0, max_sentence_length: int = 1 << 16,
                    input_sentence_size: int = 0, num_threads: int = 1):
    """Train a SentencePiece model laid out like XLNet's and save it as an ``XLNetTokenizer`` directory.

    Args:
        texts: an iterable of documents, or a path / list of paths of text files (read whole).
        vocab_size: the target size (a soft limit: small corpora may give fewer pieces).
        out_dir: written with ``tokenizer.json``, ``tokenizer_config.json`` (``XLNetTokenizer``) and
            the raw ``spiece.model``; ``AutoTokenizer.from_pretrained(out_dir)`` loads it.
        model_type: ``"unigram"`` (XLNet's) or ``"bpe"``.
        code: apply :func:`encode_code` and train on the stretches between whitespace tokens, so
            the vocabulary is learnt on what :class:`CodeTokenizer` will actually tokenise.

    The special tokens sit at XLNet's ids (``<unk>`` 0, ``<s>`` 1, ``</s>`` 2, ``<cls>`` 3,
    ``<sep>`` 4, ``<pad>`` 5, ``<mask>`` 6, ``<eod>`` 7, ``<eop>`` 8); the escape characters are
    always in the vocabulary. No normalisation is learnt (``identity`` rule); the saved tokenizer
    uses ``XLNetTokenizer``'s own normaliser like XLNet. Returns the loaded tokenizer.
    """
    import sentencepiece as spm

    if model_type not in ("unigram", "bpe"):
        raise ValueError(f"model_type must be 'unigram' or 'bpe', got {model_type!r}")
    if vocab_size < 20:
        raise ValueError(f"vocab_size must be at least 20, got {vocab_size}")
    if isinstance(texts, (str, os.PathLike)):
        texts = [texts]
    texts = list(texts) if isinstance(texts, (list, tuple)) else texts

    def documents():
        for item in texts:
            if isinstance(item, os.PathLike) or (isinstance(item, str) and len(item) < 4096 and "\n" not in item
                                                 and os.path.isfile(item)):
                yield Path(item).read_text(encoding="utf-8", errors="replace")
            else:
                yield item

    def sentences():
        for doc in documents():
            if code:
                for stretch in _MAPPED_WS_RE.split(encode_code(doc)):
                    if stretch.strip():
                        yield stretch
            else:
                for line in doc.splitlines():
                    if line.strip():
                        yield escape_specials(line)

    # SentencePiece's own answer to no input is an "INTERNAL" check failure: say what is wrong instead
    stream = sentences()
    first = next(stream, None)
    if first is None:
        raise ValueError("the text to train a tokenizer on is empty or blank; give at least one line of text")
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=itertools.chain([first], stream), model_writer=model, vocab_size=vocab_size,
        model_type=model_type,
        unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID, pad_id=PAD_ID,
        control_symbols=["<cls>", "<sep>", "<mask>", "<eod>", "<eop>"],
        character_coverage=character_coverage, normalization_rule_name="identity",
        remove_extra_whitespaces=False, add_dummy_prefix=True, split_by_whitespace=True,
        required_chars=ESCAPE + "{}<>0123456789abcdef", byte_fallback=False, hard_vocab_limit=False,
        max_sentence_length=max_sentence_length, input_sentence_size=input_sentence_size,
        shuffle_input_sentence=input_sentence_size > 0, seed_sentencepiece_size=max(1000, vocab_size * 10),
        num_threads=num_threads, minloglevel=2)
    blob = model.getvalue()
    tokenizer = tokenizer_from_sentencepiece(blob)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(str(out))
    (out / "spiece.model").write_bytes(blob)
    meta = {"trained_by": "asarm.tokenization.train_tokenizer", "model_type": model_type, "vocab_size": len(tokenizer),
            "code": code, "escape": ESCAPE}
    (out / "asarm_tokenizer.json").write_text(json.dumps(meta, indent=2) + "\n")
    from transformers import AutoTokenizer

    return _check_layout(AutoTokenizer.from_pretrained(str(out)), str(out))
