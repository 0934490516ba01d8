"""VQA accuracy exactly as the official VQA evaluation (`vqaEval.py`, GT-Vision-Lab/VQA) computes it.

A question has (usually ten) human answers. A predicted answer scores, for each of the leave-one-out subsets of
the humans, ``min(1, #humans in the subset who gave it / 3)``, averaged over the subsets: 1, 2, 3 or 4+ matching
humans out of 10 give 0.3, 0.6, 0.9 or 1.0.

The rules, official by default (``normalization="official"``), quirks included:

- Answers are stripped of surrounding whitespace (newlines and tabs count as spaces), always.
- Everything else happens only when the humans disagree (more than one distinct stripped answer). When all of
  them gave the same answer, neither side is normalised: "Yes" scores 0 against ten "yes".
- Punctuation is the official list ``; / [ ] " { } ( ) = + \\ _ - > < @ ` , ? !``; the apostrophe and the colon
  are kept. A mark is deleted if it touches a space anywhere in the answer, or if the answer has a comma between
  digits ("1,000" -> "1000"); otherwise it becomes a space ("t-shirt" -> "t shirt").
- A period not followed by a digit is deleted ("3.5" stays), at most 32 of them per answer: the official script
  passes ``re.UNICODE`` (= 32) where `re.sub` takes its count.
- Lower-case; the number words zero..ten and "none" become digits; a, an, the are dropped.
- Contractions written without an apostrophe get one from the official table, which writes a straight
  apostrophe: "dont" -> "don't" matches the human "don't". Its keys with a capital ("Im") never match.
- The official script prints its accuracies rounded to 2 decimals; these functions return them unrounded.

Option: ``normalization="always"`` normalises both sides even when the humans agree (useful for raw answers
from other sources). It is not the official number.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Sequence

NORMALIZATIONS = ("official", "always")

# The official punctuation list. No apostrophe, no colon, no period (periods have their own rule).
_PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!")
_COMMA_BETWEEN_DIGITS = re.compile(r"(\d)(,)(\d)")
# The official pattern is "(?!<=\d)(\.)(?!\d)". Its first group is a lookahead, not the intended lookbehind, so it
# never fires: in effect a period goes unless a digit follows it.
_PERIOD_NOT_BEFORE_DIGIT = re.compile(r"\.(?!\d)")
_MAX_PERIODS_REMOVED = int(re.UNICODE)  # 32: the official count argument

_NUMBER_WORDS = {
    "none": "0",
    "zero": "0",
    "one": "1",
    "two": "2",
    "three": "3",
    "four": "4",
    "five": "5",
    "six": "6",
    "seven": "7",
    "eight": "8",
    "nine": "9",
    "ten": "10",
}
_ARTICLES = frozenset({"a", "an", "the"})

# The official contraction table, less the entries that can never change a word: keys with a capital (matching
# happens after lower-casing) and "let's"/"she's", which map to themselves.
_CONTRACTIONS = {
    "aint": "ain't",
    "arent": "aren't",
    "cant": "can't",
    "couldve": "could've",
    "couldnt": "couldn't",
    "couldnt've": "couldn't've",
    "couldn'tve": "couldn't've",
    "didnt": "didn't",
    "doesnt": "doesn't",
    "dont": "don't",
    "hadnt": "hadn't",
    "hadnt've": "hadn't've",
    "hadn'tve": "hadn't've",
    "hasnt": "hasn't",
    "havent": "haven't",
    "hed": "he'd",
    "hed've": "he'd've",
    "he'dve": "he'd've",
    "hes": "he's",
    "howd": "how'd",
    "howll": "how'll",
    "hows": "how's",
    "isnt": "isn't",
    "itd": "it'd",
    "itd've": "it'd've",
    "it'dve": "it'd've",
    "itll": "it'll",
    "maam": "ma'am",
    "mightnt": "mightn't",
    "mightnt've": "mightn't've",
    "mightn'tve": "mightn't've",
    "mightve": "might've",
    "mustnt": "mustn't",
    "mustve": "must've",
    "neednt": "needn't",
    "notve": "not've",
    "oclock": "o'clock",
    "oughtnt": "oughtn't",
    "ow's'at": "'ow's'at",
    "'ows'at": "'ow's'at",
    "'ow'sat": "'ow's'at",
    "shant": "shan't",
    "shed've": "she'd've",
    "she'dve": "she'd've",
    "shouldve": "should've",
    "shouldnt": "shouldn't",
    "shouldnt've": "shouldn't've",
    "shouldn'tve": "shouldn't've",
    "somebody'd": "somebodyd",  # (sic)
    "somebodyd've": "somebody'd've",
    "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll",
    "somebodys": "somebody's",
    "someoned": "someone'd",
    "someoned've": "someone'd've",
    "someone'dve": "someone'd've",
    "someonell": "someone'll",
    "someones": "someone's",
    "somethingd": "something'd",
    "somethingd've": "something'd've",
    "something'dve": "something'd've",
    "somethingll": "something'll",
    "thats": "that's",
    "thered": "there'd",
    "thered've": "there'd've",
    "there'dve": "there'd've",
    "therere": "there're",
    "theres": "there's",
    "theyd": "they'd",
    "theyd've": "they'd've",
    "they'dve": "they'd've",
    "theyll": "they'll",
    "theyre": "they're",
    "theyve": "they've",
    "twas": "'twas",
    "wasnt": "wasn't",
    "wed've": "we'd've",
    "we'dve": "we'd've",
    "weve": "we've",
    "werent": "weren't",
    "whatll": "what'll",
    "whatre": "what're",
    "whats": "what's",
    "whatve": "what've",
    "whens": "when's",
    "whered": "where'd",
    "wheres": "where's",
    "whereve": "where've",
    "whod": "who'd",
    "whod've": "who'd've",
    "who'dve": "who'd've",
    "wholl": "who'll",
    "whos": "who's",
    "whove": "who've",
    "whyll": "why'll",
    "whyre": "why're",
    "whys": "why's",
    "wont": "won't",
    "wouldve": "would've",
    "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've",
    "wouldn'tve": "wouldn't've",
    "yall": "y'all",
    "yall'll": "y'all'll",
    "y'allll": "y'all'll",
    "yall'd've": "y'all'd've",
    "y'alld've": "y'all'd've",
    "y'all'dve": "y'all'd've",
    "youd": "you'd",
    "youd've": "you'd've",
    "you'dve": "you'd've",
    "youll": "you'll",
    "youre": "you're",
    "youve": "you've",
}

# Each human's answer is left out once; the prediction needs this many of the others to score 1.
_HUMANS_FOR_FULL_CREDIT = 3


def _process_punctuation(text: str) -> str:
    """The official `processPunctuation`: delete or space out punctuation, then drop periods not before a digit.

    Both conditions (a mark touching a space, a comma between digits) look at the input text, not the partly
    edited one, as in the official script.
    """
    delete_all = _COMMA_BETWEEN_DIGITS.search(text) is not None
    out = text
    for mark in _PUNCTUATION:
        touches_space = mark + " " in text or " " + mark in text
        out = out.replace(mark, "" if delete_all or touches_space else " ")
    return _PERIOD_NOT_BEFORE_DIGIT.sub("", out, count=_MAX_PERIODS_REMOVED)


def _process_digits_and_articles(text: str) -> str:
    """The official `processDigitArticle`: lower-case, number words to digits, drop articles, add apostrophes."""
    words = [_NUMBER_WORDS.get(word, word) for word in text.lower().split()]
    words = [_CONTRACTIONS.get(word, word) for word in words if word not in _ARTICLES]
    return " ".join(words)


def _strip(text: str) -> str:
    return text.replace("\n", " ").replace("\t", " ").strip()


def normalize_vqa_answer(text: str) -> str:
    """Normalise one answer as the official script does when the humans disagree (punctuation, periods, case,
    number words, articles, contractions).

    >>> normalize_vqa_answer("Two dogs.")
    '2 dogs'
    >>> normalize_vqa_answer("the 1,000 people")
    '1000 people'
    >>> normalize_vqa_answer("dont")
    "don't"
    """
    if not isinstance(text, str):
        raise TypeError(f"a VQA answer must be a string, got {type(text).__name__}: {text!r}")
    return _process_digits_and_articles(_process_punctuation(_strip(text)))


def _check_human_answers(human_answers: Sequence[str], where: str) -> None:
    if isinstance(human_answers, str):
        raise TypeError(f"{where} must be a list of the human answers, got the single string {human_answers!r}")
    if len(human_answers) == 0:
        raise ValueError(f"{where} is empty: every question needs its human answers (10 in VQA v2)")
    for answer in human_answers:
        if not isinstance(answer, str):
            raise TypeError(f"{where} holds {answer!r} ({type(answer).__name__}); every human answer is a string")


def _check_normalization(normalization: str) -> None:
    if normalization not in NORMALIZATIONS:
        raise ValueError(f"normalization must be one of {NORMALIZATIONS}, got {normalization!r}")


def vqa_score(prediction: str, human_answers: Sequence[str], *, normalization: str = "official") -> float:
    """Score one predicted answer against the human answers of its question, in [0, 1].

    The mean over the leave-one-out subsets of the humans of ``min(1, matches in the subset / 3)``, after the
    normalisation the module docstring lists. ``normalization="official"`` (the default) normalises only when
    the humans disagree, as the official script; ``"always"`` normalises both sides every time.

    >>> vqa_score("yes!", ["yes"] * 5 + ["no"] * 5)
    1.0
    >>> vqa_score("Yes", ["yes"] * 10)  # the humans agree: nothing is normalised (official)
    0.0
    """
    _check_normalization(normalization)
    _check_human_answers(human_answers, "human_answers")
    if not isinstance(prediction, str):
        raise TypeError(f"a VQA answer must be a string, got {type(prediction).__name__}: {prediction!r}")
    predicted = _strip(prediction)
    humans = [_strip(answer) for answer in human_answers]
    if normalization == "always" or len(set(humans)) > 1:
        predicted = normalize_vqa_answer(predicted)
        humans = [normalize_vqa_answer(answer) for answer in humans]
    matches = [answer == predicted for answer in humans]
    subset_scores = [
        min(1.0, (sum(matches) - matches[left_out]) / _HUMANS_FOR_FULL_CREDIT) for left_out in range(len(matches))
    ]
    return sum(subset_scores) / len(subset_scores)


def _scores(predictions, answers, normalization) -> list[float]:
    if len(predictions) != len(answers):
        raise ValueError(f"got {len(predictions)} predictions for {len(answers)} questions; pass one per question")
    if len(predictions) == 0:
        raise ValueError("no questions to score: predictions and answers are empty")
    for index, human_answers in enumerate(answers):
        _check_human_answers(human_answers, f"answers[{index}]")
    return [vqa_score(p, h, normalization=normalization) for p, h in zip(predictions, answers)]


def vqa_accuracy(
    predictions: Sequence[str], answers: Sequence[Sequence[str]], *, normalization: str = "official"
) -> float:
    """The official VQA accuracy (x100) of ``predictions[i]`` given the human answers ``answers[i]``.

    Args:
        predictions: one predicted answer per question.
        answers: per question, the answers of all its annotators (10 in VQA v2), duplicates included: how
            many humans gave an answer is what the score counts.
        normalization: "official" (default) or "always" (see the module docstring).

    Returns:
        The mean of `vqa_score` over the questions, times 100 (the official "overall").
    """
    scores = _scores(predictions, answers, normalization)
    return 100.0 * sum(scores) / len(scores)


def vqa_accuracy_per_answer_type(
    predictions: Sequence[str],
    answers: Sequence[Sequence[str]],
    answer_types: Sequence[str],
    *,
    normalization: str = "official",
) -> dict[str, float]:
    """The official "perAnswerType" accuracy (x100): the mean score of the questions of each answer type.

    VQA v2's types are "yes/no", "number" and "other"; a type with no question is absent from the result.

    >>> vqa_accuracy_per_answer_type(["yes", "2"], [["yes"] * 10, ["3"] * 10], ["yes/no", "number"])
    {'yes/no': 100.0, 'number': 0.0}
    """
    scores = _scores(predictions, answers, normalization)
    if len(answer_types) != len(scores):
        raise ValueError(f"got {len(answer_types)} answer types for {len(scores)} questions; pass one per question")
    by_type: dict[str, list[float]] = defaultdict(list)
    for answer_type, score in zip(answer_types, scores):
        by_type[answer_type].append(score)
    return {answer_type: 100.0 * sum(values) / len(values) for answer_type, values in by_type.items()}
