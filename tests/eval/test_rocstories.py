import pytest

from asarm.eval.rocstories import InfillingItem, Story, load_infilling, load_stories, make_items, rouge_scores
from asarm.paths import DataFileNotFoundError

S1 = "Rick grew up in a troubled household."
S2 = "He never found good support in family, and turned to gangs."
S3 = "It wasn't long before Rick got shot in a robbery."
S4 = "The incident caused him to turn a new leaf."
S5 = "He is happy now."  # RandomFifthSentenceQuiz1, AnswerRightEnding = 1
STORY_ID = "138d5bfb-05cc-41e3-bf2c-fa85ebad14e2"


def test_load_stories():
    stories = load_stories()
    assert len(stories) == 1871
    assert stories[0] == Story(STORY_ID, (S1, S2, S3, S4, S5))
    # third row: AnswerRightEnding = 2, so the ending is RandomFifthSentenceQuiz2
    assert stories[2].story_id == "e8f628d5-9f97-40ed-8611-fc0e774673c4"
    assert stories[2].sentences[4] == "Sarah decided that she preferred her home over Europe."
    assert load_stories(limit=3) == stories[:3]


def test_settings_on_first_row():
    assert load_infilling("1/5", limit=1) == [InfillingItem(f"{S1} {S2}", S3, f"{S4} {S5}", STORY_ID)]
    assert load_infilling("3/5", limit=1) == [InfillingItem(S1, f"{S2} {S3} {S4}", S5, STORY_ID)]


def test_right_ending_and_tsv(tmp_path):
    header = ("InputStoryid\tInputSentence1\tInputSentence2\tInputSentence3\tInputSentence4\t"
              "RandomFifthSentenceQuiz1\tRandomFifthSentenceQuiz2\tAnswerRightEnding\n")
    path = tmp_path / "stories.tsv"
    path.write_text(header + "id1\ta.\tb.\tc.\td.\twrong.\tright.\t2\n")
    assert load_stories(path) == [Story("id1", ("a.", "b.", "c.", "d.", "right."))]
    path.write_text(header + "id1\ta.\tb.\tc.\td.\twrong.\tright.\t3\n")
    with pytest.raises(ValueError, match="AnswerRightEnding"):
        load_stories(path)


def test_load_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown ROCStories setting"):
        make_items([], "2/5")
    with pytest.raises(DataFileNotFoundError):
        load_stories(tmp_path / "missing.csv")
    bad = tmp_path / "bad.csv"
    bad.write_text("a,b\n1,2\n")
    with pytest.raises(ValueError, match="lacks the Story Cloze column"):
        load_stories(bad)


def test_rouge_hand_values():
    report = rouge_scores(["He is happy now.", "cats sat", "the cat sat", ""],
                          ["He is happy now.", "dogs ran", "the cat ran", "something"])
    identical, disjoint, partial, empty = report.per_item
    assert identical == pytest.approx({"rouge1": 100.0, "rouge2": 100.0, "rougeL": 100.0})
    assert disjoint == {"rouge1": 0.0, "rouge2": 0.0, "rougeL": 0.0}
    # unigrams 2 of 3 both ways; bigrams {the cat, cat sat} vs {the cat, cat ran}: 1 of 2; LCS "the cat"
    assert partial == pytest.approx({"rouge1": 200 / 3, "rouge2": 50.0, "rougeL": 200 / 3})
    assert empty == {"rouge1": 0.0, "rouge2": 0.0, "rougeL": 0.0}
    mean_1_l = (100 + 200 / 3) / 4
    assert report.mean == pytest.approx({"rouge1": mean_1_l, "rouge2": 150 / 4, "rougeL": mean_1_l})


def test_rouge_uses_stemming_and_ignores_case_and_punctuation():
    assert rouge_scores(["The cats were running!"], ["the cat was run"]).per_item[0]["rouge1"] == pytest.approx(75.0)


def test_rouge_errors():
    with pytest.raises(ValueError):
        rouge_scores(["a"], ["a", "b"])
    with pytest.raises(ValueError):
        rouge_scores([], [])
