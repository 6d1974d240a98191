"""Infilling templates: the blanks' ids, and the shown prompt and filled text spaced as the template is
written, for the embedded asarm-tiny tokenizer and XLNet's real SentencePiece tokenizer."""

import pytest

from asarm.paths import EMBEDDED_MODELS, data_file
from asarm.templates import Blank, encode_template, parse_template, show_completion, show_prompt, token_blanks

MASK = 6
WORD_START = "\u2581"  # SentencePiece's word-start mark


@pytest.fixture(scope="module", params=["asarm-tiny", "xlnet-base-cased"])
def tokenizer(request):
    from transformers import AutoTokenizer

    if request.param == "asarm-tiny":
        return AutoTokenizer.from_pretrained(str(EMBEDDED_MODELS["asarm-tiny"]))
    path = data_file("xlnet-base-cased/tokenizer.json", required=False)
    if path is None:
        pytest.skip("XLNet's tokenizer is not in the data directory")
    return AutoTokenizer.from_pretrained(str(path.parent))


def _word_ids(tokenizer, word):
    """The tokenizer's ids of ``word`` as a word of its own (starting with the word-start mark)."""
    return tokenizer(word, add_special_tokens=False)["input_ids"]


def _piece_ids(tokenizer, text):
    """Ids of ``text`` as the inside of a word (no word-start mark), straight from the unigram model."""
    return [token.id for token in tokenizer.backend_tokenizer.model.tokenize(text)]


def _decoded(tokenizer, text):
    """What the tokenizer makes of ``text`` as a whole: tokenised and decoded in one piece."""
    return tokenizer.decode(_word_ids(tokenizer, text))


def _fill(template, fills):
    """The template's ids with each blank's tokens replaced by the given ids, in order."""
    ids = list(template.ids)
    for blank, fill in zip(template.blanks, fills, strict=True):
        assert len(fill) == blank.length
        ids[blank.start:blank.start + blank.length] = fill
    return ids


# (template with {} for the blank, the word filled in, whether the blank continues the word before it)
CASES = [
    ("The cat sat {} .", "on", False),          # before spaced punctuation
    ("The cat sat {}.", "on", False),           # before glued punctuation
    ("{}, he said", "Yes", False),              # at the start, before a comma
    ("un{}able", "believ", True),               # inside a word
    ("The cat {}", "sat", False),               # at the end
    ("cat{} dog", "s", True),                   # glued to the word before
    ("The  cat  {}  on the mat.", "sat", False),  # double spaces in the input
]


@pytest.mark.parametrize("text, word, inside", CASES)
def test_known_fills_decode_as_the_whole_text(tokenizer, text, word, inside):
    fill = _piece_ids(tokenizer, word) if inside else _word_ids(tokenizer, word)
    template = parse_template(tokenizer, text.format(f"<mask:{len(fill)}>"), MASK)
    filled = _fill(template, [fill])
    shown = show_completion(tokenizer, filled, template.blanks)
    assert shown == tokenizer.decode(filled)  # the tokenizer's decode of the whole sequence
    assert shown == _decoded(tokenizer, text.format(word))  # = the whole text, tokenised and decoded in one piece
    assert "  " not in shown and (" ." in shown) == (" ." in text) and (" ," in shown) == (" ," in text)
    assert (f" {word}" in f" {shown}") != inside  # a word boundary exactly where the template has a space


@pytest.mark.parametrize("text, word, inside", CASES)
def test_the_prompt_shows_blanks_where_the_template_has_them(tokenizer, text, word, inside):
    template = parse_template(tokenizer, text.format("<mask:2>"), MASK)
    assert show_prompt(tokenizer, template.ids, template.blanks, MASK) == " ".join(text.split()).format("<mask>" * 2)


def test_blanks_record_the_spaces_around_them(tokenizer):
    template = parse_template(tokenizer, "<mask> cat <mask:2>.  dog<mask>s", MASK)
    assert [(b.length, b.starts_word) for b in template.blanks] == [(1, True), (2, True), (1, False)]
    assert [template.ids[b.start] for b in template.blanks] == [MASK] * 3
    # text glued after a blank continues its word: no word-start mark, unlike the same text on its own
    assert template.ids[-1] == _piece_ids(tokenizer, "s")[0] != _word_ids(tokenizer, "s")[0]
    assert encode_template(tokenizer, "<mask> cat <mask:2>.  dog<mask>s", MASK) == template.ids


def test_adjacent_tags_are_one_blank(tokenizer):
    assert parse_template(tokenizer, "a <mask><mask> b", MASK) == parse_template(tokenizer, "a <mask:2> b", MASK)


def test_a_blank_after_a_space_starts_a_word_whatever_fills_it(tokenizer):
    """A fill that does not start a word still does after a space ("The cat son", not "The catson")."""
    son = _piece_ids(tokenizer, "son")
    template = parse_template(tokenizer, f"The cat <mask:{len(son)}> on the mat.", MASK)
    filled = _fill(template, [son])
    assert tokenizer.decode(filled).startswith("The catson")  # what decoding the ids alone would print
    assert show_completion(tokenizer, filled, template.blanks) == "The cat son on the mat."


def test_a_blank_glued_to_a_word_continues_it_whatever_fills_it(tokenizer):
    s = _word_ids(tokenizer, "s")
    template = parse_template(tokenizer, f"The cat<mask:{len(s)}> sat.", MASK)
    assert show_completion(tokenizer, _fill(template, [s]), template.blanks) == "The cats sat."


def test_lone_word_marks_give_no_double_or_trailing_space(tokenizer):
    mark = tokenizer.convert_tokens_to_ids(WORD_START)
    sat = _word_ids(tokenizer, "sat")
    for fill in ([mark] + sat, sat + [mark], [mark, mark] + sat):
        template = parse_template(tokenizer, f"The cat <mask:{len(fill)}> on the mat.", MASK)
        assert show_completion(tokenizer, _fill(template, [fill]), template.blanks) == "The cat sat on the mat."
        template = parse_template(tokenizer, f"The cat <mask:{len(fill)}>", MASK)
        assert show_completion(tokenizer, _fill(template, [fill]), template.blanks) == "The cat sat"
    # a lone mark before the inside of a word is how the tokenizer starts that word: kept
    template = parse_template(tokenizer, "The <mask>able cat", MASK)
    assert show_completion(tokenizer, _fill(template, [[mark]]), template.blanks) == "The able cat"


def test_hidden_tokens_of_a_text_are_shown_spaced_as_they_were(tokenizer):
    """``--masking-rate`` hides tokens of a whole text: each one shows as <mask> where its token was."""
    ids = _word_ids(tokenizer, "The cat sat on the mat.")
    pieces = tokenizer.convert_ids_to_tokens(ids)
    hidden = [piece in (WORD_START + "on", ".") for piece in pieces]
    blanks = token_blanks(tokenizer, ids, hidden)
    assert blanks == (Blank(pieces.index(WORD_START + "on"), 1, True), Blank(len(ids) - 1, 1, False))
    assert show_prompt(tokenizer, ids, blanks, MASK) == "The cat sat <mask> the mat<mask>"
    assert show_completion(tokenizer, ids, ()) == tokenizer.decode(ids)


def test_asarm_sample_prints_the_template_spacing(capsys):
    """End to end on the embedded model: the prompt line and every completion keep the template's spaces."""
    from asarm.cli import sample

    results = sample("asarm-tiny", "The cat <mask:3> on the mat.", sampler="sequential", batch_size=2,
                     progress=False)
    assert capsys.readouterr().out.splitlines()[0] == "prompt: The cat <mask><mask><mask> on the mat."
    for result in results:
        text = result["text"]
        assert text.startswith("The cat ") and text.endswith(" on the mat.") and "  " not in text, text
