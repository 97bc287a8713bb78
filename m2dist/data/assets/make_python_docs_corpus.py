"""How `python-docs-3.11.txt.gz` was made (provenance; not run by the package).

Input: the reStructuredText sources of the Python 3.11 documentation as Debian ships them
(`apt-get download python3.11-doc && dpkg-deb -x python3.11-doc_*.deb x`, then
`x/usr/share/doc/python3.11/html/_sources`). Output: plain English prose, one page of the docs per
document, documents separated by a blank line, one paragraph per line. Code, doctest sessions,
tables, index entries and directive options are dropped; inline markup is reduced to its text.

    python make_python_docs_corpus.py SOURCES_DIR python-docs-3.11.txt.gz
"""

import gzip
import re
import sys
from pathlib import Path

from m2dist.data.prose import rst_blocks

# Directives whose indented body is prose that belongs to the page.
PROSE_DIRECTIVES = {
    "function", "method", "class", "attribute", "data", "exception", "decorator", "decoratormethod",
    "classmethod", "staticmethod", "abstractmethod", "describe", "note", "warning", "seealso",
    "versionadded", "versionchanged", "deprecated", "deprecated-removed", "impl-detail", "admonition",
    "tip", "important", "attention", "caution", "hint", "topic", "sidebar", "glossary", "opcode",
    "cmdoption", "option", "envvar", "pdbcommand", "c:function", "c:type", "c:member", "c:macro",
    "c:var", "rubric", "availability",
}  # fmt: skip
# Directory parts that hold changelogs, licenses or build-only files rather than prose.
SKIPPED_PARTS = {"includes", "changelog", "license", "copyright", "contents", "about", "bugs"}

ROLE = re.compile(r":[\w:-]+:`([^`]*)`")
REF_WITH_TARGET = re.compile(r"`([^`<]*?)\s*<[^`>]*>`_{0,2}")
LITERAL = re.compile(r"``([^`]*)``")
INTERPRETED = re.compile(r"`([^`]*)`_{0,2}")
EMPHASIS = re.compile(r"\*{1,2}([^*\s][^*]*?)\*{1,2}")
SUBSTITUTION = re.compile(r"\|(\w+)\|")


def reduce_role(match: re.Match) -> str:
    text = match.group(1)
    inner = re.match(r"^(.*?)\s*<[^>]*>$", text)
    if inner:
        return inner.group(1)
    text = text.lstrip("!~")
    return text.rsplit(".", 1)[-1] if match.group(1).startswith("~") else text


def inline_text(paragraph: str) -> str:
    paragraph = ROLE.sub(reduce_role, paragraph)
    paragraph = REF_WITH_TARGET.sub(r"\1", paragraph)
    paragraph = LITERAL.sub(r"\1", paragraph)
    paragraph = INTERPRETED.sub(r"\1", paragraph)
    paragraph = EMPHASIS.sub(r"\1", paragraph)
    paragraph = SUBSTITUTION.sub(r"\1", paragraph)
    paragraph = re.sub(r"\s+", " ", paragraph).strip()
    return paragraph.replace(" ::", "").replace("::", ":")


def is_prose(paragraph: str) -> bool:
    words = paragraph.split()
    if len(paragraph) < 60 or len(words) < 10:
        return False
    letters = sum(c.isalpha() or c.isspace() for c in paragraph)
    code_marks = sum(paragraph.count(c) for c in "{}[]()=_<>/\\$%@")
    return letters >= 0.85 * len(paragraph) and code_marks <= 0.02 * len(paragraph) + 2


def page_paragraphs(text: str) -> list[str]:
    """Prose paragraphs of one reST page, inline markup reduced to its text."""
    blocks = rst_blocks(text.splitlines(), PROSE_DIRECTIVES, ("+-", "|", ">>>", "...", "$ "))
    return [paragraph for paragraph in map(inline_text, blocks) if is_prose(paragraph)]


def main(sources: Path, out: Path) -> None:
    pages = []
    for path in sorted(sources.rglob("*.rst.txt")):
        parts = set(path.relative_to(sources).with_suffix("").with_suffix("").parts)
        if parts & SKIPPED_PARTS:
            continue
        paragraphs = page_paragraphs(path.read_text(encoding="utf-8"))
        if len(paragraphs) >= 2:
            pages.append("\n".join(paragraphs))
    with gzip.GzipFile(out, "wb", mtime=0) as f:
        f.write(("\n\n".join(pages) + "\n").encode("utf-8"))


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
