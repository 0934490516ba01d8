"""VQA accuracy as the official VQA evaluation (`vqaEval.py`, GT-Vision-Lab/VQA) computes it.

A question has (usually ten) human answers. A predicted answer scores, for each of the leave-one-out subsets of
the humans, ``min(1, #humans in the subset who gave it / 3)``, averaged over the subsets. Both the prediction and
the human answers are normalised first (punctuation, number words, articles, contractions).

Where this differs from the official script, on purpose:

- The official script normalises only the prediction fully. It strips punctuation from the human answers, and
  only when they disagree, because the released annotations are already normalised. Here both sides go through
  the same full normalisation: on already normalised answers it is meant to change nothing, and it makes raw
  answers from other sources comparable.
- Contractions are expanded with the typographic apostrophe (’) throughout. The official table mixes in a
  straight one (``"cant" -> "can't"``), which its own punctuation step would strip on a second pass. With one
  apostrophe, `normalize_vqa_answer` is idempotent.
- The official period rule removes at most 32 periods, because it passes ``re.UNICODE`` as the ``count``
  argument. Here every period not followed by a digit is removed.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

# Characters that the official script removes or turns into a space (see `_process_punctuation`).
_PUNCTUATION = (";", ":", "/", "'", "[", "]", '"', "(", ")", "=", "+", "\\", "_", ">", "<", "@", "`", ",", "?")
_COMMA_BETWEEN_DIGITS = re.compile(r"(\d)(,)(\d)")
# The official pattern is "(?!<=\d)(\.)(?!\d)". Its first group is a lookahead, not the intended lookbehind,
# so it never fires: in effect a period goes unless a digit follows it ("3.5" stays, "yes." -> "yes").
_PERIOD_NOT_BEFORE_DIGIT = re.compile(r"\.(?!\d)")

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

# The official contraction table, as far as its keys can match. Matching happens after lower-casing and after
# straight apostrophes were removed, so the official keys with capitals or a straight apostrophe never match
# and are left out. "somebody’d" -> "somebodyd" is the official entry (sic).
_CONTRACTIONS = {
    "aint": "ain’t",
    "arent": "aren’t",
    "cant": "can’t",
    "couldve": "could’ve",
    "couldnt": "couldn’t",
    "couldnt’ve": "couldn’t’ve",
    "didnt": "didn’t",
    "doesnt": "doesn’t",
    "dont": "don’t",
    "hadnt": "hadn’t",
    "hadnt’ve": "hadn’t’ve",
    "hasnt": "hasn’t",
    "havent": "haven’t",
    "hed": "he’d",
    "hed’ve": "he’d’ve",
    "he’dve": "he’d’ve",
    "hes": "he’s",
    "howd": "how’d",
    "howll": "how’ll",
    "hows": "how’s",
    "isnt": "isn’t",
    "itd": "it’d",
    "itd’ve": "it’d’ve",
    "it’dve": "it’d’ve",
    "itll": "it’ll",
    "maam": "ma’am",
    "mightnt": "mightn’t",
    "mightnt’ve": "mightn’t’ve",
    "mightn’tve": "mightn’t’ve",
    "mightve": "might’ve",
    "mustnt": "mustn’t",
    "mustve": "must’ve",
    "neednt": "needn’t",
    "notve": "not’ve",
    "oclock": "o’clock",
    "oughtnt": "oughtn’t",
    "ow’s’at": "’ow’s’at",
    "’ows’at": "’ow’s’at",
    "’ow’sat": "’ow’s’at",
    "shant": "shan’t",
    "shed’ve": "she’d’ve",
    "she’dve": "she’d’ve",
    "shouldve": "should’ve",
    "shouldnt": "shouldn’t",
    "shouldnt’ve": "shouldn’t’ve",
    "shouldn’tve": "shouldn’t’ve",
    "somebody’d": "somebodyd",
    "somebodyd’ve": "somebody’d’ve",
    "somebody’dve": "somebody’d’ve",
    "somebodyll": "somebody’ll",
    "somebodys": "somebody’s",
    "someoned": "someone’d",
    "someoned’ve": "someone’d’ve",
    "someone’dve": "someone’d’ve",
    "someonell": "someone’ll",
    "someones": "someone’s",
    "somethingd": "something’d",
    "somethingd’ve": "something’d’ve",
    "something’dve": "something’d’ve",
    "somethingll": "something’ll",
    "thats": "that’s",
    "thered": "there’d",
    "thered’ve": "there’d’ve",
    "there’dve": "there’d’ve",
    "therere": "there’re",
    "theres": "there’s",
    "theyd": "they’d",
    "theyd’ve": "they’d’ve",
    "they’dve": "they’d’ve",
    "theyll": "they’ll",
    "theyre": "they’re",
    "theyve": "they’ve",
    "twas": "’twas",
    "wasnt": "wasn’t",
    "wed’ve": "we’d’ve",
    "we’dve": "we’d’ve",
    "weve": "we’ve",
    "werent": "weren’t",
    "whatll": "what’ll",
    "whatre": "what’re",
    "whats": "what’s",
    "whatve": "what’ve",
    "whens": "when’s",
    "whered": "where’d",
    "wheres": "where’s",
    "whereve": "where’ve",
    "whod": "who’d",
    "whod’ve": "who’d’ve",
    "who’dve": "who’d’ve",
    "wholl": "who’ll",
    "whos": "who’s",
    "whove": "who’ve",
    "whyll": "why’ll",
    "whyre": "why’re",
    "whys": "why’s",
    "wont": "won’t",
    "wouldve": "would’ve",
    "wouldnt": "wouldn’t",
    "wouldnt’ve": "wouldn’t’ve",
    "wouldn’tve": "wouldn’t’ve",
    "yall": "y’all",
    "yall’ll": "y’all’ll",
    "y’allll": "y’all’ll",
    "yall’d’ve": "y’all’d’ve",
    "y’alld’ve": "y’all’d’ve",
    "y’all’dve": "y’all’d’ve",
    "youd": "you’d",
    "youd’ve": "you’d’ve",
    "you’dve": "you’d’ve",
    "youll": "you’ll",
    "youre": "you’re",
    "youve": "you’ve",
}

# Each human's answer is left out once; the prediction needs this many of the others to score 1.
_HUMANS_FOR_FULL_CREDIT = 3


def _process_punctuation(text: str) -> str:
    """The official `processPunctuation`: delete or space out punctuation, drop periods not before a digit.

    A punctuation mark is deleted when it touches a space somewhere in the text ("yes ?" -> "yes "), or when the
    text has a comma between digits anywhere ("1,000" -> "1000"). Otherwise it becomes a space ("red/white" ->
    "red white"). As in the official script, both conditions look at the input text, not the partly edited one.
    """
    delete_all = _COMMA_BETWEEN_DIGITS.search(text) is not None
    out = text
    for mark in _PUNCTUATION:
        touches_space = mark + " " in text or " " + mark in text
        out = out.replace(mark, "" if delete_all or touches_space else " ")
    return _PERIOD_NOT_BEFORE_DIGIT.sub("", out)


def _process_digits_and_articles(text: str) -> str:
    """The official `processDigitArticle`: lower-case, number words to digits, drop articles, expand contractions."""
    words = [_NUMBER_WORDS.get(word, word) for word in text.lower().split()]
    words = [_CONTRACTIONS.get(word, word) for word in words if word not in _ARTICLES]
    return " ".join(words)


def normalize_vqa_answer(text: str) -> str:
    """Normalise an answer the way the official VQA evaluation does. Idempotent.

    >>> normalize_vqa_answer("Two dogs.")
    '2 dogs'
    >>> normalize_vqa_answer("the 1,000 people")
    '1000 people'
    """
    if not isinstance(text, str):
        raise TypeError(f"a VQA answer must be a string, got {type(text).__name__}: {text!r}")
    text = text.replace("\n", " ").replace("\t", " ").strip()
    return _process_digits_and_articles(_process_punctuation(text))


def _check_human_answers(human_answers: Sequence[str], where: str) -> None:
    if isinstance(human_answers, str):
        raise TypeError(f"{where} must be a list of the human answers, got the single string {human_answers!r}")
    if len(human_answers) == 0:
        raise ValueError(f"{where} is empty: every question needs its human answers (10 in VQA v2)")


def vqa_score(prediction: str, human_answers: Sequence[str]) -> float:
    """Score one predicted answer against the human answers of its question, in [0, 1].

    The mean over the leave-one-out subsets of the humans of ``min(1, matches in the subset / 3)``, after
    normalising every answer with `normalize_vqa_answer`. With 10 humans, an answer that 1, 2, 3 or 4+ of them
    gave scores 0.3, 0.6, 0.9 or 1.0.
    """
    _check_human_answers(human_answers, "human_answers")
    predicted = normalize_vqa_answer(prediction)
    matches = [normalize_vqa_answer(answer) == predicted for answer in human_answers]
    subset_scores = []
    for left_out in range(len(matches)):
        matches_in_subset = sum(matches) - matches[left_out]
        subset_scores.append(min(1.0, matches_in_subset / _HUMANS_FOR_FULL_CREDIT))
    return sum(subset_scores) / len(subset_scores)


def vqa_accuracy(predictions: Sequence[str], answers: Sequence[Sequence[str]]) -> float:
    """The official VQA accuracy (x100) of ``predictions[i]`` given the human answers ``answers[i]``.

    Args:
        predictions: one predicted answer per question.
        answers: per question, the answers of all its annotators (10 in VQA v2), duplicates included: how
            many humans gave an answer is what the score counts.

    Returns:
        The mean of `vqa_score` over the questions, times 100.
    """
    if len(predictions) != len(answers):
        raise ValueError(f"got {len(predictions)} predictions for {len(answers)} questions; pass one per question")
    if len(predictions) == 0:
        raise ValueError("no questions to score: predictions and answers are empty")
    for index, human_answers in enumerate(answers):
        _check_human_answers(human_answers, f"answers[{index}]")
    total = sum(vqa_score(prediction, human_answers) for prediction, human_answers in zip(predictions, answers))
    return 100.0 * total / len(predictions)
