"""VQA answer normalisation (EvalAI's, as in LLaVA's m4c_evaluator.py) and TextVQA accuracy.

The normaliser reproduces EvalAI's rules including two long-standing quirks, because every
published TextVQA/VQAv2 number carries them: the "period" rule is meant to keep decimal points
but its look-behind is written `(?!<=\\d)` (a look-ahead), so it removes every period that is
not followed by a digit; and `re.UNICODE` is passed as the `count` argument of `re.sub`, so at
most 32 periods are removed. Contraction keys are mostly apostrophe-less ("dont" -> "don't").

Both scoring modes give the same TextVQA number: lmms-eval copies the same processor and the
same leave-one-out formula (it only strips the output first, which the processor does anyway).
Its published numbers differ because its default prompt has no OCR tokens.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

from alignti.eval.formats import EvalQuestion
from alignti.eval.scoring.matching import align, check_mode, percent

_CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's",
    "howd": "how'd", "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm",
    "Ive": "I've", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll",
    "let's": "let's", "maam": "ma'am", "mightnt": "mightn't", "mightnt've": "mightn't've",
    "mightn'tve": "mightn't've", "mightve": "might've", "mustnt": "mustn't", "mustve": "must've",
    "neednt": "needn't", "notve": "not've", "oclock": "o'clock", "oughtnt": "oughtn't",
    "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at", "shant": "shan't",
    "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's", "shouldve": "should've",
    "shouldnt": "shouldn't", "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've",
    "somebody'd": "somebodyd", "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll", "somebodys": "somebody's", "someoned": "someone'd",
    "someoned've": "someone'd've", "someone'dve": "someone'd've", "someonell": "someone'll",
    "someones": "someone's", "somethingd": "something'd", "somethingd've": "something'd've",
    "something'dve": "something'd've", "somethingll": "something'll", "thats": "that's",
    "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've", "therere": "there're",
    "theres": "there's", "theyd": "they'd", "theyd've": "they'd've", "they'dve": "they'd've",
    "theyll": "they'll", "theyre": "they're", "theyve": "they've", "twas": "'twas", "wasnt": "wasn't",
    "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've", "werent": "weren't", "whatll": "what'll",
    "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd",
    "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've",
    "who'dve": "who'd've", "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll",
    "whyre": "why're", "whys": "why's", "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll",
    "y'allll": "y'all'll", "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've",
    "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll", "youre": "you're",
    "youve": "you've",
}
_NUMBERS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
            "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = {"a", "an", "the"}
_PUNCTUATION = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",",
                "?", "!"]
_PERIOD = re.compile(r"(?!<=\d)(\.)(?!\d)")  # sic: see the module docstring
_DIGIT_COMMA = re.compile(r"(?<=\d)(\,)+(?=\d)")
_MAX_PERIODS = 32  # sic: re.UNICODE (== 32) passed as re.sub's count in the original


def _punctuation(text: str) -> str:
    """A mark touching a space is deleted, one inside a word becomes a space (tested on the input)."""
    out = text
    glued_number = _DIGIT_COMMA.search(text) is not None
    for p in _PUNCTUATION:
        out = out.replace(p, "" if (p + " " in text or " " + p in text or glued_number) else " ")
    return _PERIOD.sub("", out, count=_MAX_PERIODS)


def normalize_vqa_answer(text: str) -> str:
    """EvalAI's answer processing: lower case, punctuation, number words -> digits, articles
    dropped, contractions restored. `"Two dogs."` -> `"2 dogs"`, `"The cat"` -> `"cat"`."""
    text = text.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
    text = text.replace("\n", " ").replace("\t", " ").strip()
    words = [_NUMBERS.get(w, w) for w in _punctuation(text).lower().split()]
    return " ".join(_CONTRACTIONS.get(w, w) for w in words if w not in _ARTICLES)


def vqa_accuracy(prediction: str, gt_answers: Sequence[str]) -> float:
    """VQA accuracy in [0, 1]: the mean, over the n leave-one-out subsets of the n human
    answers, of min(#matches in the subset / 3, 1). Both sides are normalised."""
    pred = normalize_vqa_answer(prediction)
    gts = [normalize_vqa_answer(a) for a in gt_answers]
    if not gts:
        return 0.0
    hits = sum(g == pred for g in gts)
    # Leaving out a matching answer removes one match from the subset; any other keeps them all.
    return sum(min((hits - (g == pred)) / 3.0, 1.0) for g in gts) / len(gts)


def score_textvqa(questions: Sequence[EvalQuestion], answers: Sequence[Mapping],
                  scoring: str = "llava") -> dict:
    """TextVQA: mean VQA accuracy in percent under "score"; a missing answer scores 0."""
    check_mode(scoring)
    m = align(questions, answers)
    accs = []
    for q, out in zip(questions, m.outputs):
        text = "" if out is None else (out.strip() if scoring == "lmms-eval" else out)
        accs.append(vqa_accuracy(text, q.answer))
    return {"benchmark": "textvqa", "scoring": scoring, "score": percent(sum(accs), len(accs)),
            "accuracy": percent(sum(accs), len(accs)), **m.counts()}
