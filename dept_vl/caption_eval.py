"""Caption metrics as the COCO caption evaluation (pycocoevalcap) computes them: BLEU-4 and CIDEr-D.

- `corpus_bleu` is pycocoevalcap's ``Bleu(4)``: corpus-level n-gram precisions with counts clipped by the
  references, the "closest" reference length for the brevity penalty, and its smoothing constants.
- `cider_d_scores` is CIDEr-D (Vedantam et al., 2015, with the ``-D`` changes). That is pycocoevalcap's ``Cider``
  class, and ``CiderD`` in the original CIDEr code. It builds tf-idf n-gram vectors, n = 1..4. The document
  frequencies come from the references of the evaluated corpus. The candidate weights are clipped by the
  reference weights, a gaussian length penalty is applied (sigma = 6), and the result is scaled by 10.
- `tokenize_caption` stands in for pycocoevalcap's ``PTBTokenizer``, which needs Java (Stanford CoreNLP 3.4.1).
  See its docstring for what it matches and where it differs.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence

Tokens = Sequence[str]

_BLEU_MAX_ORDER = 4
_CIDER_MAX_ORDER = 4
_CIDER_SCALE = 10.0
# pycocoevalcap's smoothing: an order with no match gives a tiny precision, not a zero division or log(0).
_TINY = 1e-15
_SMALL = 1e-9

# Contraction suffixes that the PTB tokenizer splits off: "don't" -> "do n't", "dog's" -> "dog 's".
_CONTRACTION_SUFFIX = re.compile(r"(?<=\w)(n't|'s|'re|'ve|'ll|'d|'m)\b")
# Abbreviations that PTB keeps with their period, even at the end of a caption ("on the st." -> "st.").
_ABBREVIATIONS = "mr|mrs|ms|dr|st|jr|sr|vs|mt|ft|ave|co|inc|ltd|etc"
_TOKEN = re.compile(
    rf"""
      [a-z](?:\.[a-z])*\.(?!\w)      # letter-dot abbreviations and initials: u.s., a.m., b.
    | (?:{_ABBREVIATIONS})\.(?!\w)   # known abbreviations: mr., st.
    | no\.(?=\s*\d)                  # "no." before a number
    | \d+(?:[.,:]\d+)+               # numbers with separators: 3.5, 1,000, 10:30
    | n't | '(?:s|re|ve|ll|d|m)\b    # the contraction suffixes split off above
    | \w+(?:[-'/.]\w+)*              # words, joined by - ' / or . inside: black-and-white, o'clock, and/or
    | [#@][^\W\d_]\w*                # hashtags and handles: #tag, @user (but "#1" is "#", "1")
    | -(?:lrb|rrb|lsb|rsb|lcb|rcb)-  # already-escaped brackets stay, as in PTB
    | [?!]+ | \.+ | -+               # runs of these marks are one token
    | \S                             # any other character is a token of its own
    """,
    re.VERBOSE,
)
# PTB writes brackets as -LRB- etc. pycocoevalcap means to drop them, but its list has them in upper case while
# ``-lowerCase`` lower-cases them, so in practice they stay, lower-cased.
_BRACKETS = {"(": "-lrb-", ")": "-rrb-", "[": "-lsb-", "]": "-rsb-", "{": "-lcb-", "}": "-rcb-"}
# pycocoevalcap's punctuation list, in the raw characters that PTB turns into those tokens (quotes become `` '').
_DROPPED_TOKENS = frozenset(["'", "`", '"', "“", "”", "‘", "?", "!", ",", ":", ";", "…"])


def _is_dropped(token: str) -> bool:
    return token in _DROPPED_TOKENS or set(token) == {"."} or set(token) == {"-"}


def tokenize_caption(text: str) -> list[str]:
    """Tokenise a caption like pycocoevalcap's PTBTokenizer (``-lowerCase``), then drop its punctuation tokens.

    It follows the Java tokenizer (Stanford CoreNLP 3.4.1): lower case; punctuation split off and dropped;
    contractions split ("don't" -> ["do", "n't"], "dog's" -> ["dog", "'s"]); words joined by hyphens, slashes or
    inner periods, numbers such as "3.5", "1,000" and "10:30", and abbreviations such as "u.s." and "mr." kept
    whole; brackets kept as "-lrb-", "-rrb-", ... (pycocoevalcap's list fails to drop them); runs such as "?!"
    kept. Symbols such as "&", "$" and "%" are tokens of their own. ``tests/vl/test_metrics.py`` compares it
    with the Java tokenizer where Java is installed.

    Known differences, all rare in captions: PTB decides whether "no." and single-letter initials ("A.") keep
    their period from what follows (a sentence end or not); here "no." keeps it only before a number and an
    initial always does. Only a short list of other abbreviations keeps its period. "'90s" is split, "y'all" and
    "rock'n'roll" stay whole, "-5" and ".5" lose their sign or period, and typographic apostrophes count as
    straight ones. Words glued to punctuation without spaces ("dog's,cat") may split differently.

    >>> tokenize_caption("A man's dog, sitting on the U.S. flag.")
    ['a', 'man', "'s", 'dog', 'sitting', 'on', 'the', 'u.s.', 'flag']
    """
    if not isinstance(text, str):
        raise TypeError(f"a caption must be a string, got {type(text).__name__}: {text!r}")
    text = text.lower().replace("’", "'")
    text = _CONTRACTION_SUFFIX.sub(r" \1", text)
    tokens = (_BRACKETS.get(token, token) for token in _TOKEN.findall(text))
    return [token for token in tokens if not _is_dropped(token)]


def _ngram_counts(tokens: Tokens, max_order: int) -> Counter[tuple[str, ...]]:
    """Counts of every n-gram of ``tokens`` for n = 1..max_order."""
    counts: Counter[tuple[str, ...]] = Counter()
    for order in range(1, max_order + 1):
        for start in range(len(tokens) - order + 1):
            counts[tuple(tokens[start : start + order])] += 1
    return counts


def _check_corpus(candidates: Sequence, references: Sequence[Sequence], item: str) -> None:
    if len(candidates) != len(references):
        raise ValueError(
            f"got {len(candidates)} candidates for {len(references)} reference sets; pass one of each per image"
        )
    if len(candidates) == 0:
        raise ValueError("no captions to score: the candidates and references are empty")
    for index, refs in enumerate(references):
        if isinstance(refs, str) or len(refs) == 0:
            raise ValueError(f"references[{index}] must be a non-empty list of {item}, got {refs!r}")


def _closest_reference_length(candidate_length: int, reference_lengths: Sequence[int]) -> int:
    """The reference length closest to the candidate's; the shorter one on a tie (pycocoevalcap's "closest")."""
    return min(reference_lengths, key=lambda length: (abs(length - candidate_length), length))


def corpus_bleu(
    candidates: Sequence[Tokens], references: Sequence[Sequence[Tokens]], max_order: int = 4
) -> list[float]:
    """Corpus BLEU-1..max_order in [0, 1], as pycocoevalcap's ``Bleu(max_order).compute_score`` returns it.

    Args:
        candidates: one tokenised candidate per image.
        references: per image, its tokenised reference captions (at least one).
        max_order: the longest n-gram.

    Returns:
        ``[BLEU-1, ..., BLEU-max_order]``. BLEU-n is the geometric mean of the clipped n-gram precisions of
        orders 1..n, summed over the corpus, times the brevity penalty ``exp(1 - r / c)`` when the total
        candidate length c is below the total closest-reference length r.
    """
    _check_corpus(candidates, references, "tokenised captions")
    matches = [0] * max_order
    totals = [0] * max_order
    candidate_length = reference_length = 0
    for candidate, refs in zip(candidates, references):
        counts = _ngram_counts(candidate, max_order)
        max_reference_counts: Counter[tuple[str, ...]] = Counter()
        for reference in refs:
            max_reference_counts |= _ngram_counts(reference, max_order)  # | keeps the larger count
        for ngram, count in counts.items():
            matches[len(ngram) - 1] += min(count, max_reference_counts[ngram])
        for order in range(1, max_order + 1):
            totals[order - 1] += max(0, len(candidate) - order + 1)
        candidate_length += len(candidate)
        reference_length += _closest_reference_length(len(candidate), [len(reference) for reference in refs])

    length_ratio = (candidate_length + _TINY) / (reference_length + _SMALL)
    brevity_penalty = math.exp(1 - 1 / length_ratio) if length_ratio < 1 else 1.0
    scores = []
    precision_product = 1.0
    for order in range(1, max_order + 1):
        precision_product *= (matches[order - 1] + _TINY) / (totals[order - 1] + _SMALL)
        scores.append(precision_product ** (1 / order) * brevity_penalty)
    return scores


class _TfIdf:
    """The tf-idf n-gram vectors of one caption, by order, with their norms and the caption's length in bigrams."""

    def __init__(self, counts: Counter[tuple[str, ...]], log_idf: dict[tuple[str, ...], float], log_num_images: float):
        self.weights: list[dict[tuple[str, ...], float]] = [{} for _ in range(_CIDER_MAX_ORDER)]
        for ngram, term_frequency in counts.items():
            # An n-gram that no reference has counts as if one image had it: idf = log(N / 1).
            self.weights[len(ngram) - 1][ngram] = term_frequency * (log_num_images - log_idf.get(ngram, 0.0))
        self.norms = [math.sqrt(sum(w * w for w in weights.values())) for weights in self.weights]
        # The reference implementation measures the length for the penalty in bigrams; kept for equal scores.
        self.length = sum(count for ngram, count in counts.items() if len(ngram) == 2)


def _cider_d_similarity(candidate: _TfIdf, reference: _TfIdf, sigma: float) -> list[float]:
    """Per order, the clipped cosine similarity of candidate and reference, times the gaussian length penalty."""
    length_penalty = math.exp(-((candidate.length - reference.length) ** 2) / (2 * sigma**2))
    similarities = []
    for order in range(_CIDER_MAX_ORDER):
        reference_weights = reference.weights[order]
        dot = 0.0
        for ngram, weight in candidate.weights[order].items():
            reference_weight = reference_weights.get(ngram, 0.0)
            dot += min(weight, reference_weight) * reference_weight  # clipping: repeating an n-gram earns nothing
        if candidate.norms[order] != 0 and reference.norms[order] != 0:
            dot /= candidate.norms[order] * reference.norms[order]
        similarities.append(dot * length_penalty)
    return similarities


def cider_d_scores(
    candidates: Sequence[Tokens], references: Sequence[Sequence[Tokens]], sigma: float = 6.0
) -> list[float]:
    """Per-image CIDEr-D in [0, 10]; the corpus score is their mean.

    The document frequency of an n-gram is the number of images whose references contain it, over this corpus,
    and the idf is ``log(N / df)`` with N the number of images. So a corpus of one image scores 0, and the score
    of an image depends on the rest of the corpus.

    Args:
        candidates: one tokenised candidate per image.
        references: per image, its tokenised reference captions (at least one).
        sigma: the width of the gaussian length penalty.
    """
    _check_corpus(candidates, references, "tokenised captions")
    reference_counts = [[_ngram_counts(reference, _CIDER_MAX_ORDER) for reference in refs] for refs in references]
    document_frequency: Counter[tuple[str, ...]] = Counter()
    for counts_of_image in reference_counts:
        document_frequency.update(set().union(*counts_of_image))
    log_idf = {ngram: math.log(frequency) for ngram, frequency in document_frequency.items()}
    log_num_images = math.log(len(references))

    scores = []
    for candidate, counts_of_image in zip(candidates, reference_counts):
        candidate_vector = _TfIdf(_ngram_counts(candidate, _CIDER_MAX_ORDER), log_idf, log_num_images)
        similarity_sums = [0.0] * _CIDER_MAX_ORDER
        for counts in counts_of_image:
            reference_vector = _TfIdf(counts, log_idf, log_num_images)
            for order, similarity in enumerate(_cider_d_similarity(candidate_vector, reference_vector, sigma)):
                similarity_sums[order] += similarity
        mean_over_orders = sum(similarity_sums) / _CIDER_MAX_ORDER
        scores.append(_CIDER_SCALE * mean_over_orders / len(counts_of_image))
    return scores


def _tokenized_corpus(predictions: Sequence[str], references: Sequence[Sequence[str]]):
    _check_corpus(predictions, references, "reference captions")
    candidates = [tokenize_caption(prediction) for prediction in predictions]
    return candidates, [[tokenize_caption(reference) for reference in refs] for refs in references]


def _bleu4(candidates: Sequence[Tokens], references: Sequence[Sequence[Tokens]]) -> float:
    return 100.0 * corpus_bleu(candidates, references, _BLEU_MAX_ORDER)[-1]


def _cider_d(candidates: Sequence[Tokens], references: Sequence[Sequence[Tokens]]) -> float:
    per_image = cider_d_scores(candidates, references)
    return 100.0 * sum(per_image) / len(per_image)


def bleu4_score(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """Corpus BLEU-4 (x100, in [0, 100]) of predicted captions, after `tokenize_caption`."""
    return _bleu4(*_tokenized_corpus(predictions, references))


def cider_d_score(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """Corpus CIDEr-D (x100, in [0, 1000]: the mean of `cider_d_scores`) of predicted captions, after
    `tokenize_caption`."""
    return _cider_d(*_tokenized_corpus(predictions, references))


def caption_scores(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> dict[str, float]:
    """BLEU-4 and CIDEr-D (both x100) of predicted captions, after `tokenize_caption`, tokenised once.

    Args:
        predictions: one generated caption per image.
        references: per image, its human captions (5 in COCO Karpathy test).

    Returns:
        ``{"bleu4": ..., "cider": ...}``, as `bleu4_score` and `cider_d_score`. BLEU-4 lies in [0, 100];
        CIDEr-D lies in [0, 1000], because of its built-in factor 10 (published COCO numbers such as
        "CIDEr 112" are on this scale).
    """
    tokens = _tokenized_corpus(predictions, references)
    return {"bleu4": _bleu4(*tokens), "cider": _cider_d(*tokens)}
