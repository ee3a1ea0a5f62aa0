"""Sub-topics by keyword lexicon: the labels a Dirichlet-skewed federated split draws on.

Each document gets the topic whose lexicon stems occur most often in its text (ties go to the topic
listed first; no hit at all gives "other"). A lexicon is transparent and reproducible, which matters
more here than accuracy: the split only needs devices whose data differ in a describable way.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from functools import lru_cache

__all__ = ["FINANCE_TOPICS", "FINANCE_WORDS", "MEDICAL_TOPICS", "assign_topic", "count_stems"]

# Stems match at a word start ("cardi" matches "cardiac" and "cardiology").
MEDICAL_TOPICS: Mapping[str, tuple[str, ...]] = {
    "oncology": (
        "cancer",
        "tumor",
        "tumour",
        "carcinom",
        "neoplas",
        "lymphoma",
        "leukemi",
        "metasta",
        "oncolog",
    ),
    "cardiovascular": ("cardi", "heart", "coronary", "hypertens", "myocardi", "atrial", "vascular", "aort"),
    "infection": (
        "infect",
        "viral",
        "virus",
        "bacteri",
        "covid",
        "sars",
        "hiv",
        "antibiot",
        "vaccin",
        "pathogen",
    ),
    "neuro-psychiatry": (
        "brain",
        "neuro",
        "cognit",
        "alzheimer",
        "parkinson",
        "depress",
        "psychiatr",
        "anxiety",
        "schizophren",
        "stroke",
    ),
    "metabolism": ("diabet", "obes", "insulin", "metabol", "lipid", "glucose", "cholesterol", "nutrition"),
    "genetics-cell": ("gene", "genom", "protein", "cell", "mutation", "express", "molecul", "receptor"),
}

FINANCE_TOPICS: Mapping[str, tuple[str, ...]] = {
    "markets": ("stock", "share", "market", "investor", "index", "bond", "trading", "exchange"),
    "macro": (
        "economy",
        "economic",
        "growth",
        "inflation",
        "interest rate",
        "central bank",
        "gdp",
        "deficit",
        "unemployment",
        "budget",
    ),
    "corporate": (
        "profit",
        "revenue",
        "sales",
        "takeover",
        "merger",
        "chief executive",
        "firm",
        "earnings",
        "acquisition",
    ),
    "trade-energy": ("oil", "export", "import", "trade", "tariff", "currency", "dollar", "euro", "yen"),
}

# Words whose density marks a news article as finance-heavy (see `FINANCE_MIN_HITS` in sources.py).
FINANCE_WORDS: tuple[str, ...] = (
    "econom",
    "market",
    "stock",
    "share",
    "investor",
    "profit",
    "revenue",
    "bank",
    "inflation",
    "interest rate",
    "gdp",
    "trade",
    "tariff",
    "export",
    "currency",
    "dollar",
    "earnings",
    "compan",
    "billion",
    "percent",
    "fiscal",
    "budget",
    "debt",
    "tax",
)


@lru_cache(maxsize=64)
def _pattern(stems: tuple[str, ...]) -> re.Pattern[str]:
    return re.compile(r"\b(?:" + "|".join(re.escape(stem) for stem in stems) + ")", re.IGNORECASE)


def count_stems(text: str, stems: tuple[str, ...]) -> int:
    return len(_pattern(stems).findall(text))


def assign_topic(text: str, lexicon: Mapping[str, tuple[str, ...]]) -> str:
    best, best_hits = "other", 0
    for topic, stems in lexicon.items():
        hits = count_stems(text, stems)
        if hits > best_hits:
            best, best_hits = topic, hits
    return best
