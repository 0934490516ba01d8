"""Hand-checked values of the vision-language metrics (VQA, GQA/NLVR2, COCO captions)."""

from __future__ import annotations

import contextlib
import io
import math
import shutil

import pytest

from dept_vl.metrics import (
    accuracy,
    caption_scores,
    cider_d_scores,
    corpus_bleu,
    nlvr_consistency,
    nlvr_sentence_id,
    normalize_vqa_answer,
    tokenize_caption,
    vqa_accuracy,
    vqa_accuracy_per_answer_type,
    vqa_score,
)


def ten_humans(answer: str, times: int, other: str = "something else") -> list[str]:
    """Ten human answers, ``times`` of which are ``answer``."""
    return [answer] * times + [other] * (10 - times)


def split_all(captions: list[list[str]]) -> list[list[list[str]]]:
    return [[caption.split() for caption in refs] for refs in captions]


# ---------------------------------------------------------------- VQA


@pytest.mark.parametrize(
    ("humans_who_agree", "expected"),
    [
        (0, 0.0),
        # The 9 subsets without the one agreeing human see 1 match (1/3); the other subset sees 0.
        (1, (9 * (1 / 3) + 1 * 0) / 10),
        # 8 subsets see both agreeing humans (2/3), 2 subsets see one of them (1/3).
        (2, (8 * (2 / 3) + 2 * (1 / 3)) / 10),
        # 7 subsets see all three (capped at 1), 3 subsets see two (2/3).
        (3, (7 * 1 + 3 * (2 / 3)) / 10),
        # Every subset still sees at least 3.
        (4, 1.0),
        (10, 1.0),
    ],
)
def test_vqa_score_is_mean_over_leave_one_out_subsets(humans_who_agree, expected):
    assert vqa_score("red", ten_humans("red", humans_who_agree)) == pytest.approx(expected, abs=1e-12)


def test_vqa_scores_of_one_two_three_humans_are_point_three_six_nine():
    assert [vqa_score("cat", ten_humans("cat", k)) for k in (1, 2, 3)] == pytest.approx([0.3, 0.6, 0.9], abs=1e-12)


def test_vqa_accuracy_averages_questions_times_100():
    predictions = ["yes", "2", "blue"]
    answers = [ten_humans("yes", 10), ten_humans("2", 2), ten_humans("red", 10)]
    assert vqa_accuracy(predictions, answers) == pytest.approx(100 * (1.0 + 0.6 + 0.0) / 3, abs=1e-9)


def test_vqa_counts_an_answer_only_some_humans_gave_after_normalising_them():
    # "two" and "2" are the same answer; "Two." too. So 3 of 10 humans gave it.
    humans = ["two", "2", "Two.", "3", "3", "3", "3", "4", "4", "4"]
    assert vqa_score("2", humans) == pytest.approx(0.9, abs=1e-12)
    assert vqa_score("three", humans) == pytest.approx(1.0, abs=1e-12)
    assert vqa_score("4", humans) == pytest.approx(0.9, abs=1e-12)
    assert vqa_score("5", humans) == 0.0


def humans(*groups: tuple[int, str]) -> list[str]:
    """Human answers from (count, answer) groups: humans((3, "dog"), (7, "cat")) is 3 x "dog" then 7 x "cat"."""
    return [answer for count, answer in groups for _ in range(count)]


# Worked out by hand from vqaEval.py (GT-Vision-Lab/VQA). With 10 humans, k matching answers after the official
# processing score 0, 0.3, 0.6, 0.9 for k = 0..3 and 1 for k >= 4. Processing happens only when the humans disagree.
OFFICIAL_VQA_CASES = [
    # The four cases of issue 10. "!" is official punctuation; no space next to it, so it becomes a space.
    ("yes!", humans((5, "yes"), (5, "no")), 100.0),
    # "dont" -> "don't" (straight apostrophe); the humans' "don't" keeps its apostrophe: 3 match.
    ("dont know", humans((3, "don't know"), (7, "no")), 90.0),
    ("t-shirt", humans((4, "t shirt"), (6, "shirt")), 100.0),  # "-" becomes a space
    ("isnt", humans((4, "isn't"), (6, "no")), 100.0),
    # Number words.
    ("two", humans((2, "2"), (8, "3")), 60.0),
    ("Three", humans((3, "three"), (7, "3")), 100.0),  # the humans' "three" becomes "3" too: all 10 match
    ("ten", humans((1, "10"), (9, "11")), 30.0),
    ("none", humans((4, "0"), (6, "1")), 100.0),
    ("one two", humans((3, "1 2"), (7, "12")), 90.0),
    ("the two", humans((3, "2"), (7, "1")), 90.0),
    # 1,000: a comma between digits deletes every punctuation mark of the answer.
    ("1,000", humans((3, "1000"), (7, "100")), 90.0),
    ("1,000-2", humans((3, "10002"), (7, "1000 2")), 90.0),
    # 3.5: a period before a digit stays, the last one goes.
    ("3.5.", humans((2, "3.5"), (8, "4")), 60.0),
    # Articles.
    ("the dog", humans((3, "dog"), (7, "cat")), 90.0),
    ("a red car", humans((1, "red car"), (9, "blue")), 30.0),
    ("An apple", humans((2, "apple"), (8, "pear")), 60.0),
    ("a\\b", humans((4, "a b"), (6, "c")), 100.0),  # "\" becomes a space, then "a" is an article: "b"
    # All humans agree: nothing but whitespace is stripped, on either side.
    ("yes", humans((10, "yes")), 100.0),
    ("Yes", humans((10, "yes")), 0.0),
    ("yes.", humans((10, "yes")), 0.0),
    (" yes\n", humans((10, "yes")), 100.0),
    ("dog", humans((10, "the dog")), 0.0),
    ("zero", humans((10, "0")), 0.0),
    ("1,000", humans((10, "1000")), 0.0),
    # Whether they agree is decided after stripping: "no " is "no", so these humans agree and "No" is not lowered.
    ("No", humans((9, "no"), (1, "no ")), 0.0),
    ("Yes", humans((9, "yes"), (1, "Yes")), 100.0),  # "Yes" differs, so all are lowered: 10 match
    # Apostrophes and contractions.
    ("dont", humans((5, "don't"), (5, "dont")), 100.0),
    ("don\u2019t", humans((4, "don't"), (6, "no")), 0.0),  # a typographic apostrophe is not the table's
    ("it's", humans((3, "it's"), (7, "its")), 90.0),  # the apostrophe is not punctuation
    ("maam", humans((3, "ma'am"), (7, "sir")), 90.0),
    ("couldn'tve", humans((4, "couldn't've"), (6, "no")), 100.0),
    ("Im", humans((4, "i'm"), (6, "no")), 0.0),  # the key "Im" has a capital: it never matches
    # The colon is kept: "3:00" stays, so only the 3 humans who wrote "3 00" match.
    ("3 00", humans((3, "3 00"), (7, "3:00")), 90.0),
    # Punctuation: a mark touching a space is deleted, otherwise it becomes a space.
    ("red/white", humans((2, "red white"), (8, "red")), 60.0),
    ("yes ?", humans((1, "yes"), (9, "no")), 30.0),
    ("left, right", humans((4, "left right"), (6, "left")), 100.0),
    ("well-known", humans((3, "well known"), (7, "known")), 90.0),
    ("{red}", humans((4, "red"), (6, "blue")), 100.0),
    ("@home", humans((2, "home"), (8, "away")), 60.0),
    # The period rule removes at most 32 periods (re.UNICODE passed as the count).
    ("yes" + "." * 32, humans((4, "yes"), (6, "no")), 100.0),
    ("yes" + "." * 33, humans((4, "yes"), (6, "no")), 0.0),
    # Three humans: subsets without a "cat" see 1 of 2, 1 of 2, and 2 of 2: (1/3 + 1/3 + 2/3) / 3.
    ("cat", ["cat", "cat", "dog"], 100 * 4 / 9),
]


@pytest.mark.parametrize(("prediction", "human_answers", "official"), OFFICIAL_VQA_CASES)
def test_vqa_score_matches_the_official_script(prediction, human_answers, official):
    assert 100 * vqa_score(prediction, human_answers) == pytest.approx(official, abs=1e-9)
    assert vqa_accuracy([prediction], [human_answers]) == pytest.approx(official, abs=1e-9)


def test_vqa_accuracy_is_the_mean_of_the_official_cases():
    predictions, answers, official = zip(*OFFICIAL_VQA_CASES)
    assert len(OFFICIAL_VQA_CASES) >= 30
    assert vqa_accuracy(predictions, answers) == pytest.approx(sum(official) / len(official), abs=1e-9)


def test_vqa_normalization_always_is_an_option_that_also_normalises_agreeing_humans():
    assert vqa_score("Yes", humans((10, "yes")), normalization="always") == 1.0
    assert vqa_score("dog", humans((10, "the dog")), normalization="always") == 1.0
    assert vqa_score("Yes", humans((10, "yes"))) == 0.0  # the official default
    with pytest.raises(ValueError, match="normalization must be one of"):
        vqa_score("yes", ["yes"], normalization="both")


def test_vqa_accuracy_per_answer_type_averages_each_type_as_the_official_script():
    predictions = ["yes", "no", "2", "four", "red", "blue"]
    answers = [
        humans((10, "yes")),  # 1.0
        humans((2, "no"), (8, "yes")),  # 0.6
        humans((3, "2"), (7, "3")),  # 0.9
        humans((4, "4"), (6, "5")),  # "four" -> "4": 1.0
        humans((1, "red"), (9, "green")),  # 0.3
        humans((10, "green")),  # 0.0
    ]
    types = ["yes/no", "yes/no", "number", "number", "other", "other"]
    per_type = vqa_accuracy_per_answer_type(predictions, answers, types)
    assert per_type == pytest.approx({"yes/no": 80.0, "number": 95.0, "other": 15.0}, abs=1e-9)
    with pytest.raises(ValueError, match="answer types"):
        vqa_accuracy_per_answer_type(predictions, answers, types[:2])


@pytest.mark.parametrize(
    ("raw", "normalised"),
    [
        ("yes.", "yes"),
        ("Yes", "yes"),
        ("  yes \n", "yes"),
        ("two", "2"),
        ("none", "0"),
        ("one two ten eleven", "1 2 10 eleven"),
        ("the dog", "dog"),
        ("an apple a day", "apple day"),
        ("theater", "theater"),
        ("dont", "don't"),
        ("whats", "what's"),
        ("cant", "can't"),
        # Neither the apostrophe nor the colon is official punctuation.
        ("it's", "it's"),
        ("3:00", "3:00"),
        ("red/white", "red white"),
        ("yes!", "yes"),
        # A mark that touches a space is deleted rather than spaced out.
        ("yes ?", "yes"),
        ("left , right", "left right"),
        # A comma between digits deletes every punctuation mark.
        ("1,000", "1000"),
        ("1,000/2", "10002"),
        # A period before a digit stays; every other period goes.
        ("3.5", "3.5"),
        ("a.m.", "am"),
        ("well-known", "well known"),
    ],
)
def test_normalize_vqa_answer_follows_official_rules(raw, normalised):
    assert normalize_vqa_answer(raw) == normalised


def test_vqa_rejects_mismatched_or_missing_answers():
    with pytest.raises(ValueError, match="2 predictions for 1 questions"):
        vqa_accuracy(["a", "b"], [ten_humans("a", 3)])
    with pytest.raises(ValueError, match=r"answers\[0\] is empty"):
        vqa_accuracy(["a"], [[]])
    with pytest.raises(TypeError, match="single string"):
        vqa_accuracy(["a"], ["a"])


# ---------------------------------------------------------------- GQA and NLVR2


def test_accuracy_matches_after_strip_and_lower():
    assert accuracy(["Yes", " no ", "left"], ["yes", "no", "right"]) == pytest.approx(200 / 3)


@pytest.mark.parametrize(
    ("identifier", "sentence"),
    [
        ("dev-850-0-0", "dev-850-0"),
        ("dev-850-3-0", "dev-850-0"),
        ("dev-850-0-1", "dev-850-1"),
        ("test1-7-2-1", "test1-7-1"),
    ],
)
def test_nlvr_sentence_id_drops_the_pair_id(identifier, sentence):
    assert nlvr_sentence_id(identifier) == sentence


def test_nlvr_sentence_id_rejects_other_formats():
    with pytest.raises(ValueError, match="split-set_id-pair_id-sentence_id"):
        nlvr_sentence_id("dev-850")


def test_nlvr_consistency_counts_groups_with_every_example_right():
    identifiers = ["dev-1-0-0", "dev-1-1-0", "dev-1-0-1", "dev-1-1-1", "dev-2-0-0"]
    references = ["true", "false", "true", "true", "false"]
    predictions = ["true", "true", "true", "True", "false"]  # only dev-1-1-0 is wrong
    groups = [nlvr_sentence_id(identifier) for identifier in identifiers]
    # Groups: dev-1-0 (one wrong), dev-1-1 (all right), dev-2-0 (all right).
    assert nlvr_consistency(predictions, references, groups) == pytest.approx(200 / 3)
    assert accuracy(predictions, references) == pytest.approx(80.0)


def test_nlvr_consistency_rejects_missing_group_ids():
    with pytest.raises(ValueError, match="1 group ids for 2 examples"):
        nlvr_consistency(["true", "false"], ["true", "true"], ["dev-1-0"])


# ---------------------------------------------------------------- caption tokenizer


# Outputs of the Java PTB tokenizer (-lowerCase) after pycocoevalcap's punctuation filter.
TOKENIZER_CASES = [
    ("A dog runs.", ["a", "dog", "runs"]),
    ("Two dogs, running!", ["two", "dogs", "running"]),
    ("A man's hat", ["a", "man", "'s", "hat"]),
    ("Don't stop", ["do", "n't", "stop"]),
    ("it can't fly", ["it", "ca", "n't", "fly"]),
    ("the dogs' toys", ["the", "dogs", "toys"]),
    ("a black-and-white photo", ["a", "black-and-white", "photo"]),
    # pycocoevalcap fails to drop PTB's bracket tokens: its list has them in upper case.
    ("a (small) cat -- sleeping...", ["a", "-lrb-", "small", "-rrb-", "cat", "sleeping"]),
    ('a sign reading "stop"', ["a", "sign", "reading", "stop"]),
    ("3.5 inches and 1,000 people", ["3.5", "inches", "and", "1,000", "people"]),
    ("the U.S. flag", ["the", "u.s.", "flag"]),
    ("cats & dogs: 50%", ["cats", "&", "dogs", "50", "%"]),
    ("5 o'clock", ["5", "o'clock"]),
    ("at 10:30 a red/white sign", ["at", "10:30", "a", "red/white", "sign"]),
    ("Mr. Smith on St. Louis st.", ["mr.", "smith", "on", "st.", "louis", "st."]),
    ("a no. 5 bus says no.", ["a", "no.", "5", "bus", "says", "no"]),
    ("a cat?! wow!!", ["a", "cat", "?!", "wow", "!!"]),
    ("3.5mm and 100km", ["3.5", "mm", "and", "100km"]),
]


@pytest.mark.parametrize(("caption", "tokens"), TOKENIZER_CASES)
def test_tokenize_caption_matches_ptb_on_ordinary_captions(caption, tokens):
    assert tokenize_caption(caption) == tokens


# ---------------------------------------------------------------- BLEU


def test_bleu4_matches_hand_counted_ngrams_and_brevity_penalty():
    candidate = "a black cat sits on the mat".split()  # 7 tokens
    references = ["a black cat sits on a red mat".split(), "one black cat is sitting on the mat today".split()]
    # Clipped matches: unigrams 7/7, bigrams 6/6 ("on the" and "the mat" from the second reference),
    # trigrams 4/5 (all but "sits on the"), 4-grams 2/4 ("a black cat sits", "black cat sits on").
    precision = (7 / 7) * (6 / 6) * (4 / 5) * (2 / 4)
    # The closest reference length is 8 (|8 - 7| < |9 - 7|), longer than the candidate.
    brevity_penalty = math.exp(1 - 8 / 7)
    bleu = corpus_bleu([candidate], [references])
    assert bleu[3] == pytest.approx(precision ** (1 / 4) * brevity_penalty, rel=1e-8)
    assert bleu[0] == pytest.approx(1.0 * brevity_penalty, rel=1e-8)


def test_bleu4_sums_ngram_counts_over_the_corpus():
    candidates = ["a b c d".split(), "x y z w".split()]
    references = [["a b c d".split()], ["x y q w".split()]]
    # Image 1 matches 4/4, 3/3, 2/2, 1/1. Image 2 matches x, y, w (3/4), "x y" (1/3), no 3- or 4-gram (0/2, 0/1).
    expected = ((7 / 8) * (4 / 6) * (2 / 4) * (1 / 2)) ** (1 / 4)  # equal lengths: no brevity penalty
    assert corpus_bleu(candidates, references)[3] == pytest.approx(expected, rel=1e-8)


def test_bleu_closest_reference_length_takes_the_shorter_on_a_tie():
    # Candidate length 5, references of length 4 and 6: the closest is 4, so there is no brevity penalty.
    candidate = "a b c d e".split()
    references = ["a b c d".split(), "a b c d e f".split()]
    assert corpus_bleu([candidate], [references])[3] == pytest.approx(1.0, rel=1e-8)


def test_caption_identical_to_its_references_gets_full_bleu4_and_cider():
    predictions = ["a dog runs on the grass", "two red cars park near a house"]
    references = [[predictions[0]] * 5, [predictions[1]] * 5]
    scores = caption_scores(predictions, references)
    assert scores["bleu4"] == pytest.approx(100.0, rel=1e-8)
    assert scores["cider"] == pytest.approx(1000.0, rel=1e-8)


def test_caption_with_no_overlap_scores_zero():
    scores = caption_scores(["a dog runs fast", "one red car"], [["the cat sleeps here"], ["two blue buses"]])
    assert scores["bleu4"] < 1e-9
    assert scores["cider"] == 0.0


# ---------------------------------------------------------------- CIDEr-D


def test_cider_d_matches_hand_computed_tfidf_cosines():
    # Every n-gram occurs in one of the two images' references, so every weight is log(2 / 1) and cancels.
    candidates = [["red", "car"], ["red", "sky"]]
    references = [[["red", "car"]], [["blue", "sky"]]]
    # Image 1: identical, so the unigram and bigram cosines are 1 and there are no 3- or 4-grams.
    # Image 2: unigrams share "sky": cos = 1 / (sqrt(2) * sqrt(2)); the bigrams differ.
    expected = [10 * (1 + 1 + 0 + 0) / 4, 10 * (1 / 2 + 0 + 0 + 0) / 4]
    assert cider_d_scores(candidates, references) == pytest.approx(expected, rel=1e-12)
    scores = caption_scores(["red car", "red sky"], [["red car"], ["blue sky"]])
    assert scores["cider"] == pytest.approx(100 * sum(expected) / 2, rel=1e-12)


def test_cider_d_clips_repeated_candidate_ngrams():
    candidates = [["dog", "dog"], ["bird"]]
    references = [[["dog", "cat"]], [["bird"]]]
    # Unigrams: the candidate weight of "dog" is 2w but is clipped to the reference's w:
    # min(2w, w) * w / (|(2w)| * |(w, w)|) = 1 / (2 * sqrt(2)). Without clipping it would be 1 / sqrt(2).
    expected_first = 10 * (1 / (2 * math.sqrt(2))) / 4
    assert cider_d_scores(candidates, references)[0] == pytest.approx(expected_first, rel=1e-12)


def test_cider_d_applies_gaussian_length_penalty():
    candidates = [["a", "b", "c", "d"], ["z"]]
    references = [[["a", "b"]], [["y"]]]
    # Unigrams: 2 shared of 4 vs 2: cos = 2 / (2 * sqrt(2)). Bigrams: "a b" shared of 3 vs 1: cos = 1 / sqrt(3).
    # Lengths in bigrams are 3 and 1: penalty exp(-(3 - 1)^2 / (2 * 6^2)).
    penalty = math.exp(-4 / 72)
    expected_first = 10 * (1 / math.sqrt(2) + 1 / math.sqrt(3)) / 4 * penalty
    assert cider_d_scores(candidates, references)[0] == pytest.approx(expected_first, rel=1e-12)


def test_cider_d_of_a_single_image_corpus_is_zero():
    # idf = log(1 / 1) = 0 for every n-gram of the only image.
    assert cider_d_scores([["a", "dog"]], [[["a", "dog"]]]) == [0.0]


def test_caption_scores_reject_bad_references():
    with pytest.raises(ValueError, match="2 candidates for 1 reference sets"):
        caption_scores(["a", "b"], [["a"]])
    with pytest.raises(ValueError, match=r"references\[0\] must be a non-empty list"):
        caption_scores(["a dog"], ["a dog"])
    with pytest.raises(ValueError, match=r"references\[1\] must be a non-empty list"):
        caption_scores(["a dog", "a cat"], [["a dog"], []])


# ---------------------------------------------------------------- optional: against pycocoevalcap itself

COCO_LIKE_PREDICTIONS = [
    "a man riding a wave on top of a surfboard",
    "a dog sitting on a couch next to a pillow",
    "two giraffes standing next to each other in a field",
    "a plate of food with broccoli and meat",
    "a red double decker bus driving down a street",
    "a cat laying on top of a laptop computer",
    "a group of people flying kites in a park",
    "a kitchen with a stove and a refrigerator",
    "a man holding a tennis racquet on a court",
    "a train traveling down tracks next to a forest",
    "a bathroom with a toilet and a sink",
    "a pizza sitting on top of a wooden table",
]
COCO_LIKE_REFERENCES = [
    ["A surfer rides a large wave.", "a man on a surfboard riding a wave", "Surfer riding on top of a wave."],
    ["A brown dog sits on a sofa.", "a dog on a couch with pillows", "The dog is resting on the couch."],
    ["Two giraffes in a grassy field.", "a pair of giraffes stand near trees", "two giraffes standing in a field"],
    ["A plate with broccoli and beef.", "food on a white plate", "Broccoli and meat served on a plate."],
    ["A red bus on a city street.", "a double decker bus drives down the road", "The red double-decker bus."],
    ["A cat sleeping on a laptop.", "a cat lying on a computer keyboard", "cat on top of the laptop"],
    ["People fly kites at the park.", "many kites in the sky over a park", "a group of people with kites"],
    ["A kitchen with a white stove.", "a kitchen has a fridge and an oven", "the kitchen is clean"],
    ["A tennis player holds his racket.", "a man on a tennis court", "man playing tennis on a court"],
    ["A train passes by the woods.", "a train on the tracks near trees", "train moving along a forest"],
    ["A white toilet next to a sink.", "a small bathroom with toilet", "bathroom with sink and toilet"],
    ["A pizza on a table.", "a large pizza on a wooden table", "pizza sitting on the table top"],
]


def test_bleu4_and_cider_d_equal_pycocoevalcap_on_the_same_tokens():
    bleu_module = pytest.importorskip("pycocoevalcap.bleu.bleu", reason="pycocoevalcap is optional")
    cider_module = pytest.importorskip("pycocoevalcap.cider.cider", reason="pycocoevalcap is optional")
    candidates = [tokenize_caption(caption) for caption in COCO_LIKE_PREDICTIONS]
    references = [[tokenize_caption(caption) for caption in refs] for refs in COCO_LIKE_REFERENCES]
    # Both sides get our tokenizer's output, so their Java PTB tokenizer is not needed.
    res = {index: [" ".join(candidate)] for index, candidate in enumerate(candidates)}
    gts = {index: [" ".join(reference) for reference in refs] for index, refs in enumerate(references)}
    with contextlib.redirect_stdout(io.StringIO()):  # their BLEU prints its counts
        their_bleu, _ = bleu_module.Bleu(4).compute_score(gts, res)
    their_cider, their_per_image = cider_module.Cider().compute_score(gts, res)

    assert corpus_bleu(candidates, references) == pytest.approx(their_bleu, rel=1e-9)
    assert cider_d_scores(candidates, references) == pytest.approx(list(their_per_image), rel=1e-9, abs=1e-12)
    scores = caption_scores(COCO_LIKE_PREDICTIONS, COCO_LIKE_REFERENCES)
    assert scores == pytest.approx({"bleu4": 100 * their_bleu[3], "cider": 100 * their_cider}, rel=1e-9)


def test_tokenize_caption_equals_the_java_ptb_tokenizer():
    ptb_module = pytest.importorskip("pycocoevalcap.tokenizer.ptbtokenizer", reason="pycocoevalcap is optional")
    if shutil.which("java") is None:
        pytest.skip("pycocoevalcap's PTBTokenizer needs Java")
    captions = [caption for caption, _ in TOKENIZER_CASES] + COCO_LIKE_PREDICTIONS
    captions += [caption for refs in COCO_LIKE_REFERENCES for caption in refs]
    theirs = ptb_module.PTBTokenizer().tokenize({index: [{"caption": c}] for index, c in enumerate(captions)})
    for index, caption in enumerate(captions):
        assert " ".join(tokenize_caption(caption)) == theirs[index][0], caption
