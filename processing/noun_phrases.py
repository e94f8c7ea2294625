"""Noun phrases of a caption, as the phrases a teacher GLIP grounds when it pseudo-labels image-caption pairs (GLIP's
self-training: a teacher predicts boxes for the noun phrases of web captions, a student trains on them).

One interface, `NounPhraseExtractor(method)(caption, phrases=None) -> List[Entity]`, three sources of phrases:

* `phrases` given by the caller (e.g. a dataset column): each phrase is located at every whole-word, case-insensitive
  occurrence in the caption; a phrase that does not occur is reported in `missing`, never silently used.
* `method="spacy"`: the `noun_chunks` of an installed English spaCy pipeline (`spacy_model`, default
  "en_core_web_sm"; spaCy is an optional dependency and pipelines are separate packages), without pronoun chunks
  ("it", "they"), as GLIP's own phrase grammar has no pronouns.
* `method="rules"`: a built-in chunker that needs no model, in the spirit of the original demo's NLTK grammar
  `NP: {<DT>?<JJ.*>*<NN.*>+}` (`predictor_glip.find_noun_phrases`), but without a part-of-speech tagger: a phrase is
  a maximal run of words between punctuation and closed-class words (prepositions, conjunctions, pronouns,
  auxiliaries, a short list of common caption verbs and of spatial expressions such as "left of", "in front of");
  a determiner or number word starts a new phrase; a word ending in -ing / -ed (a participle, "a man riding", "a
  car parked") ends the phrase it follows and is dropped from the end of a phrase, unless it is a listed noun
  ("building", "ring"); phrases without a word other than determiners are dropped.
  Its limits, honestly: it does not know parts of speech, so a verb outside its list stays inside a phrase
  ("a dog chases a ball" gives "a dog chases" and "a ball"), an adjective or adverb after the noun joins it
  ("the sky blue"), and a compound joined by "of" is split ("a cup of coffee" gives "a cup" and "coffee"). Use
  spaCy, or give the phrases, when captions are free prose; the rules suit short, nominal captions (alt text,
  "a small red star left of a blue ring").
* `method="auto"`: spaCy when `spacy` and `spacy_model` are installed, else the rules (`self.method` says which).

Equal phrases (case-insensitive, whitespace-normalised) are one `Entity` with every span where they occur, as MDETR /
Flickr30K entities list every mention of an object: a box predicted for "a dog" is grounded to both "a dog"s of
"a dog chases a dog". Entities come in the order of their first mention.
"""

import re
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

from .prompts import phrase_occurrences

NOUN_PHRASE_METHODS = ("auto", "spacy", "rules")
DEFAULT_SPACY_MODEL = "en_core_web_sm"

Span = Tuple[int, int]

# words: letters / digits with inner apostrophes or hyphens ("t-shirt", "man's"); anything else separates words
_WORD = re.compile(r"[^\W_]+(?:['\u2019-][^\W_]+)*")
_NUMBERS = "one two three four five six seven eight nine ten eleven twelve twenty dozen dozens hundreds thousands"
_DETERMINERS = frozenset(
    ("a an the this these those some many several few each every another other both all any no most more much "
     "his her its their our my your " + _NUMBERS).split()
)
_CLOSED_CLASS = frozenset(
    # prepositions
    ("about above across after against along alongside amid among around as at atop before behind below beneath "
     "beside besides between beyond by despite down during except for from in inside into like near of off on onto "
     "opposite out outside over past per since than through throughout till to toward towards under underneath "
     "unlike until up upon via with within without "
     # conjunctions, relative and question words
     "and or but nor so yet while whereas because although though if when where which who whom whose what why how "
     "that whether "
     # pronouns and pro-forms
     "i me you he him she it we us they them myself yourself himself herself itself ourselves themselves someone "
     "somebody something anyone anything everyone everything nobody nothing there here it's there's that's "
     # auxiliaries and copulas
     "is are was were be been being am has have had having do does did doing will would can could should may might "
     "must shall isn't aren't wasn't don't doesn't can't won't "
     # adverbs that do not modify a noun
     "not also just only then very too again together away back while almost "
     # common caption verbs (base, 3rd person, past)
     "sit sits sat stand stands stood lie lies lay lays hold holds held ride rides rode run runs ran walk walks "
     "walked look looks looked play plays played eat eats ate wear wears wore show shows showed see sees saw seen "
     "seem seems appear appears get gets got go goes went take takes took make makes made use uses carry carries "
     "watch watches fly flies flew swim swims jump jumps hang hangs hung sleep sleeps slept").split()
)
# spatial expressions removed before chunking (their words would otherwise become phrases: "the left", "front")
_RELATIONS = re.compile(
    r"(?<!\w)(?:to the (?:left|right) of|on the (?:left|right)(?: side)?(?: of)?|(?:left|right) of|in front of|"
    r"on top of|in the (?:middle|center|centre) of|next to|close to|on either side of)(?!\w)",
    re.IGNORECASE,
)
_PARTICIPLE = re.compile(r"\w{3,}(?:ing|ed)$")
# nouns (and noun-like adjectives) that end like participles
_PARTICIPLE_NOUNS = frozenset(
    ("building buildings ceiling clothing painting paintings drawing drawings morning evening evenings wedding pudding "
     "ring rings king kings wing wings string strings spring swing swings thing things something nothing everything "
     "sibling siblings railing railings awning awnings icing stuffing bedding lighting parking fencing "
     "bed beds sled sleds shed sheds seed seeds weed weeds reed reeds speed steed breed feed tweed").split()
)


@dataclass(frozen=True)
class Entity:
    """One phrase of a caption: `text` as written at its first mention, `spans` every [start, end) character span
    where it is mentioned, in caption order."""

    text: str
    spans: Tuple[Span, ...]


@dataclass
class PhraseResult:
    """`entities` found in a caption, and the given phrases that do not occur in it (`missing`)."""

    entities: List[Entity]
    missing: List[str] = field(default_factory=list)


def _key(text: str) -> str:
    return " ".join(text.lower().split())


def group_spans(caption: str, spans: Sequence[Span]) -> List[Entity]:
    """Spans of phrases -> entities: spans whose text is equal (case-insensitive, whitespace-normalised) are one entity;
    entities in the order of their first span."""
    grouped: Dict[str, List[Span]] = {}
    for start, end in sorted(set(spans)):
        grouped.setdefault(_key(caption[start:end]), []).append((start, end))
    return [Entity(caption[spans[0][0] : spans[0][1]], tuple(spans)) for spans in grouped.values()]


def _is_participle(word: str) -> bool:
    lower = word.lower()
    return bool(_PARTICIPLE.match(lower)) and lower not in _PARTICIPLE_NOUNS


def rule_noun_phrase_spans(caption: str) -> List[Span]:
    """The built-in chunker (see the module docstring): [start, end) spans of the noun phrases, in caption order."""
    masked = _RELATIONS.sub(lambda match: "," * len(match.group()), caption)  # same length: spans stay valid
    phrases: List[List[re.Match]] = []
    current: List[re.Match] = []
    previous = None
    for match in _WORD.finditer(masked):
        word = match.group().lower()
        gap = masked[previous.end() if previous else 0 : match.start()].strip()
        # punctuation between the words separates them, but for the apostrophe of a plural possessive ("dogs' toys")
        separated = gap != "" and not (gap in ("'", "\u2019") and previous is not None and previous.group().lower().endswith("s"))
        previous = match
        only_determiners = all(m.group().lower() in _DETERMINERS for m in current)
        if separated or word in _CLOSED_CLASS:
            phrases.append(current)
            current = [] if word in _CLOSED_CLASS else [match]
        elif word in _DETERMINERS and not only_determiners:
            phrases.append(current)
            current = [match]
        elif _is_participle(word) and not only_determiners:
            phrases.append(current)  # "a man riding": the participle ends "a man" and is dropped
            current = []
        else:
            current.append(match)
    phrases.append(current)
    spans = []
    for words in phrases:
        while words and _is_participle(words[-1].group()):
            words = words[:-1]
        if any(m.group().lower() not in _DETERMINERS for m in words):
            spans.append((words[0].start(), words[-1].end()))
    return spans


def _load_spacy(model: str):
    """The installed spaCy pipeline `model`, or ValueError saying what is missing (nothing is downloaded)."""
    try:
        import spacy
    except ImportError as error:
        raise ValueError("noun phrase method 'spacy' needs the `spacy` package (pip install spacy) and an English pipeline") from error
    try:
        return spacy.load(model, exclude=["ner", "lemmatizer", "textcat"])
    except OSError as error:
        raise ValueError(f"the spaCy pipeline {model!r} is not installed (python -m spacy download {model}): {error}") from error


class NounPhraseExtractor:
    """Caption -> its entities (see the module docstring).

    Args:
        method: "auto", "spacy" or "rules".
        spacy_model: the spaCy pipeline (an installed package name or a folder) for "spacy" / "auto".

    Raises:
        ValueError: an unknown method; "spacy" when spaCy or the pipeline is not installed.
    """

    def __init__(self, method: str = "auto", spacy_model: str = DEFAULT_SPACY_MODEL):
        if method not in NOUN_PHRASE_METHODS:
            raise ValueError(f"method must be one of {NOUN_PHRASE_METHODS}, got method={method!r}")
        if not isinstance(spacy_model, str) or not spacy_model:
            raise ValueError(f"spacy_model must be a pipeline name or folder, got spacy_model={spacy_model!r}")
        self.spacy_model = spacy_model
        self._nlp = None
        if method in ("spacy", "auto"):
            try:
                self._nlp = _load_spacy(spacy_model)
            except ValueError:
                if method == "spacy":
                    raise
        self.method = "spacy" if self._nlp is not None else "rules"

    def __getstate__(self) -> dict:  # data-loading workers get the settings and load the pipeline themselves
        return {"method": self.method, "spacy_model": self.spacy_model}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["method"], state["spacy_model"])

    def noun_phrase_spans(self, caption: str) -> List[Span]:
        """[start, end) spans of the caption's noun phrases (spaCy noun chunks without pronouns, or the rules)."""
        if self._nlp is None:
            return rule_noun_phrase_spans(caption)
        return [(chunk.start_char, chunk.end_char) for chunk in self._nlp(caption).noun_chunks if chunk.root.pos_ != "PRON"]

    def __call__(self, caption: str, phrases: Optional[Sequence[str]] = None) -> PhraseResult:
        """The entities of `caption`: its noun phrases, or the given `phrases` located in it.

        Raises:
            TypeError: `caption` is not a string, `phrases` not a list of strings.
        """
        if not isinstance(caption, str):
            raise TypeError(f"caption must be a string, got {type(caption).__name__}")
        if phrases is None:
            return PhraseResult(group_spans(caption, self.noun_phrase_spans(caption)))
        if isinstance(phrases, str) or not isinstance(phrases, (list, tuple)) or not all(isinstance(p, str) for p in phrases):
            raise TypeError(f"phrases must be a list of strings, got {phrases!r:.100}")
        spans, missing = [], []
        for phrase in phrases:
            found = phrase_occurrences(caption, phrase.strip(), ignore_case=True) if phrase.strip() else []
            spans += found
            if not found:
                missing.append(phrase)
        return PhraseResult(group_spans(caption, spans), missing)
