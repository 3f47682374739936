"""The VQA answer normalisation of the VQA challenge (EvalAI), as LLaVA's TextVQA evaluator applies it, and the VQA
soft accuracy over ten human answers.

The rules (see specs/evaluation.md) reproduce the reference bit for bit, including two accidents of it: the period
rule removes at most 32 periods (the reference passes ``re.UNICODE``, which is 32, as the substitution count) and its
look-behind is written as a look-ahead that never fires, so a period after a digit is removed too (unless a digit
follows it).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

__all__ = ["normalize_answer", "soft_scores", "vqa_accuracy"]

# Number words become digits; articles are dropped (after the number mapping).
_NUMBERS = {w: str(i) for i, w in enumerate("zero one two three four five six seven eight nine ten".split())}
_NUMBERS["none"] = "0"
_ARTICLES = frozenset(("a", "an", "the"))

# Contractions written without their apostrophe (and a few variants) -> the VQA challenge's spelling. Pairs are
# "written=normalised"; keys are matched against lower-cased words, so only lower-case keys can ever apply.
_CONTRACTION_PAIRS = """
aint=ain't arent=aren't cant=can't couldve=could've couldnt=couldn't couldn'tve=couldn't've couldnt've=couldn't've
didnt=didn't doesnt=doesn't dont=don't hadnt=hadn't hadnt've=hadn't've hadn'tve=hadn't've hasnt=hasn't
havent=haven't hed=he'd hed've=he'd've he'dve=he'd've hes=he's howd=how'd howll=how'll hows=how's isnt=isn't
itd=it'd itd've=it'd've it'dve=it'd've itll=it'll let's=let's maam=ma'am mightnt=mightn't mightnt've=mightn't've
mightn'tve=mightn't've mightve=might've mustnt=mustn't mustve=must've neednt=needn't notve=not've oclock=o'clock
oughtnt=oughtn't ow's'at='ow's'at 'ows'at='ow's'at 'ow'sat='ow's'at shant=shan't shed've=she'd've she'dve=she'd've
she's=she's shouldve=should've shouldnt=shouldn't shouldnt've=shouldn't've shouldn'tve=shouldn't've
somebody'd=somebodyd somebodyd've=somebody'd've somebody'dve=somebody'd've somebodyll=somebody'll
somebodys=somebody's someoned=someone'd someoned've=someone'd've someone'dve=someone'd've someonell=someone'll
someones=someone's somethingd=something'd somethingd've=something'd've something'dve=something'd've
somethingll=something'll thats=that's thered=there'd thered've=there'd've there'dve=there'd've therere=there're
theres=there's theyd=they'd theyd've=they'd've they'dve=they'd've theyll=they'll theyre=they're theyve=they've
twas='twas wasnt=wasn't wed've=we'd've we'dve=we'd've weve=we've werent=weren't whatll=what'll whatre=what're
whats=what's whatve=what've whens=when's whered=where'd wheres=where's whereve=where've whod=who'd whod've=who'd've
who'dve=who'd've wholl=who'll whos=who's whove=who've whyll=why'll whyre=why're whys=why's wont=won't
wouldve=would've wouldnt=wouldn't wouldnt've=wouldn't've wouldn'tve=wouldn't've yall=y'all yall'll=y'all'll
y'allll=y'all'll yall'd've=y'all'd've y'alld've=y'all'd've y'all'dve=y'all'd've youd=you'd youd've=you'd've
you'dve=you'd've youll=you'll youre=you're youve=you've
"""
_CONTRACTIONS = dict(pair.split("=", 1) for pair in _CONTRACTION_PAIRS.split())

# Punctuation handled one mark at a time, in this order: deleted when it touches a space, else replaced by a space.
_PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?",
                "!")
_DIGIT_COMMA_DIGIT = re.compile(r"(?<=\d),+(?=\d)")
_PERIOD = re.compile(r"\.(?!\d)")
_MAX_PERIODS = 32  # the reference's substitution count (re.UNICODE == 32)


def _punctuation(text: str) -> str:
    out = text
    # Decided on the text as it came in, not as it is being rewritten (as the reference does).
    number_commas = _DIGIT_COMMA_DIGIT.search(text) is not None
    for mark in _PUNCTUATION:
        touches_space = f"{mark} " in text or f" {mark}" in text
        out = out.replace(mark, "" if touches_space or number_commas else " ")
    return _PERIOD.sub("", out, count=_MAX_PERIODS)


def _words(text: str) -> str:
    kept = []
    for word in text.lower().split():
        word = _NUMBERS.get(word, word)
        if word not in _ARTICLES:
            kept.append(word)
    return " ".join(_CONTRACTIONS.get(word, word) for word in kept)


def normalize_answer(text: str) -> str:
    """An answer as the VQA challenge compares it (lower case, punctuation, number words, articles, contractions)."""
    text = text.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
    text = text.replace("\n", " ").replace("\t", " ").strip()
    return _words(_punctuation(text))


def soft_scores(answers: Sequence[str]) -> dict[str, float]:
    """VQA accuracy of every distinct (normalised) human answer: the mean over the leave-one-out subsets of
    ``min(1, matches among the other answers / 3)``."""
    normed = [normalize_answer(a) for a in answers]
    scores = {}
    for candidate in dict.fromkeys(normed):
        total = 0
        for left_out in range(len(normed)):
            matches = sum(1 for j, a in enumerate(normed) if j != left_out and a == candidate)
            total += min(1, matches / 3)
        scores[candidate] = total / len(normed)
    return scores


def vqa_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """The VQA accuracy (0..1) of one predicted answer against the human answers."""
    return soft_scores(answers).get(normalize_answer(prediction), 0.0)
