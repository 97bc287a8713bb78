"""Prose paragraphs out of documentation formats, with the standard library only: HTML (and the
XML of Mallard help pages), reStructuredText, GNU info, man pages (roff), Perl POD, dictd
dictionary entries, fortune files and plain text. Every extractor returns the paragraphs that pass
`is_english_prose`, with code blocks, tables and markup dropped and whitespace collapsed.
"""

from __future__ import annotations

import re
from html.parser import HTMLParser

# Common English function words: a paragraph with too few of them is code, a list of names, or
# another language.
STOPWORDS = frozenset(
    "a an the and or but if of to in on at by for with from as is are was were be been being it its this "
    "that these those which who whom what when where how not no can may must should will would do does "
    "than then there their they them he she his her we you your our has have had into also such each "
    "any all some one two more most other only so".split()
)
MIN_WORDS = 8


def collapse(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


def is_english_prose(paragraph: str, min_words: int = MIN_WORDS) -> bool:
    """True for a paragraph of at least `min_words` words that reads as English text: mostly
    letters, few code marks, mostly ASCII, and a share of English function words."""
    words = paragraph.split()
    if len(words) < min_words:
        return False
    length = len(paragraph)
    letters = sum(c.isalpha() or c.isspace() for c in paragraph)
    code_marks = sum(paragraph.count(c) for c in "{}[]()=_<>/\\$%@#|;*`~^")
    ascii_share = sum(c.isascii() for c in paragraph) / length
    function_words = sum(w.strip(".,:;!?\"'()").lower() in STOPWORDS for w in words)
    return (
        letters >= 0.8 * length
        and code_marks <= 0.03 * length + 1
        and ascii_share >= 0.97
        and function_words >= 0.12 * len(words)
    )


def _keep(paragraphs: list[str]) -> list[str]:
    kept = []
    for paragraph in paragraphs:
        paragraph = collapse(paragraph)
        if is_english_prose(paragraph):
            kept.append(paragraph)
    return kept


class _HTMLProse(HTMLParser):
    """Text of block elements; pre/code listings, tables, scripts, navigation and headers skipped."""

    BLOCKS = frozenset(
        "p div li dd dt h1 h2 h3 h4 h5 h6 blockquote section article td th tr br caption figcaption "
        "title item note tip listing".split()
    )
    SKIPPED = frozenset("pre script style table nav header footer code-block screen programlisting synopsis "
                        "head select textarea svg math object".split())  # fmt: skip
    VOID = frozenset("br img hr meta link input area base col embed param source track wbr".split())

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.paragraphs: list[str] = []
        self.current: list[str] = []
        self.skip_depth = 0

    def flush(self) -> None:
        if self.current:
            self.paragraphs.append("".join(self.current))
            self.current = []

    def handle_starttag(self, tag: str, attrs: list) -> None:
        if tag in self.VOID:
            if tag == "br":
                self.flush()
            return
        classes = dict(attrs).get("class") or ""
        if self.skip_depth or tag in self.SKIPPED or "highlight" in classes or "sidebar" in classes:
            self.skip_depth += 1
            return
        if tag in self.BLOCKS:
            self.flush()

    def handle_endtag(self, tag: str) -> None:
        if tag in self.VOID:
            return
        if self.skip_depth:
            self.skip_depth -= 1
            return
        if tag in self.BLOCKS:
            self.flush()

    def handle_data(self, data: str) -> None:
        if not self.skip_depth:
            self.current.append(data)


def html_paragraphs(text: str) -> list[str]:
    """Prose paragraphs of an HTML or XML page."""
    parser = _HTMLProse()
    parser.feed(text)
    parser.close()
    parser.flush()
    return _keep(parser.paragraphs)


RST_ADORNMENT = re.compile(r"^\s*([=\-~^\"'*+#`:.])\1{2,}\s*$")
RST_DIRECTIVE = re.compile(r"^(\s*)\.\.\s+([\w:-]+)::(.*)$")
RST_COMMENT = re.compile(r"^(\s*)\.\.(\s|$)")
RST_BULLET = re.compile(r"^(\s*)([*+\-]|#\.|\d+\.|\(\w\))\s+")
RST_ROLE = re.compile(r":[\w:-]+:`([^`<]*?)(?:\s*<[^`>]*>)?`")
RST_REF = re.compile(r"`([^`<]*?)\s*<[^`>]*>`_{0,2}")
RST_LITERAL = re.compile(r"``([^`]*)``")
RST_INTERPRETED = re.compile(r"`([^`]*)`_{0,2}")
RST_EMPHASIS = re.compile(r"\*{1,2}([^*\s][^*]*?)\*{1,2}")
# Directives whose indented body is prose; every other directive's body (code, tables, toctrees,
# images, options) is dropped.
RST_PROSE_DIRECTIVES = frozenset(
    "note warning seealso tip important attention caution hint topic sidebar admonition versionadded "
    "versionchanged deprecated function method class attribute data exception describe glossary".split()
)


def _rst_inline(paragraph: str) -> str:
    paragraph = RST_ROLE.sub(lambda m: m.group(1).lstrip("!~"), paragraph)
    paragraph = RST_REF.sub(r"\1", paragraph)
    paragraph = RST_LITERAL.sub(r"\1", paragraph)
    paragraph = RST_INTERPRETED.sub(r"\1", paragraph)
    paragraph = RST_EMPHASIS.sub(r"\1", paragraph)
    return paragraph.replace(" ::", "").replace("::", ":")


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip(" "))


# Lines that start a table, a doctest session, a shell or comment line: not prose.
RST_SKIPPED_PREFIXES = ("+-", "|", ">>>", "...", "$ ", "# ")


def rst_blocks(lines: list[str], prose_directives: frozenset[str] | set[str], skipped_prefixes: tuple[str, ...]) -> list[str]:
    """The paragraphs of reStructuredText lines, each its lines joined by spaces, inline markup
    still in: literal blocks (after `::`), the bodies of comments and of directives not in
    `prose_directives`, section adornments, field lists and lines starting with `skipped_prefixes`
    dropped; a bullet starts a paragraph."""
    paragraphs: list[str] = []
    current: list[str] = []
    skip_deeper_than: int | None = None

    def flush() -> None:
        if current:
            paragraphs.append(" ".join(current))
            current.clear()

    for line in lines:
        stripped = line.strip()
        if skip_deeper_than is not None:
            if not stripped or _indent(line) > skip_deeper_than:
                continue
            skip_deeper_than = None
        if not stripped:
            flush()
            continue
        directive = RST_DIRECTIVE.match(line)
        if directive or RST_COMMENT.match(line):
            flush()
            if not directive or directive.group(2) not in prose_directives:
                skip_deeper_than = _indent(line)
            continue
        if RST_ADORNMENT.match(line) or stripped.startswith(skipped_prefixes):
            flush()
            continue
        if re.match(r"^:[\w -]+:", stripped):
            flush()
            continue
        bullet = RST_BULLET.match(line)
        if bullet:
            flush()
            stripped = line[bullet.end() :].strip()
        current.append(stripped)
        if stripped.endswith("::"):
            flush()
            skip_deeper_than = _indent(line)
    flush()
    return paragraphs


def rst_paragraphs(text: str) -> list[str]:
    """Prose paragraphs of a reStructuredText page: literal blocks (after `::`), code and table
    directives, comments, tables and field lists dropped; inline markup reduced to its text."""
    blocks = rst_blocks(text.expandtabs(8).splitlines(), RST_PROSE_DIRECTIVES, RST_SKIPPED_PREFIXES)
    return _keep([_rst_inline(block) for block in blocks])


def info_paragraphs(text: str) -> list[str]:
    """Prose paragraphs of a GNU info file: node headers, menus, index tables and indented
    examples dropped."""
    paragraphs: list[str] = []
    for node in text.split("\x1f"):
        if node.lstrip().startswith(("Tag Table:", "End Tag Table", "Indirect:")):
            continue
        in_menu = False
        current: list[str] = []
        for line in node.splitlines():
            stripped = line.strip()
            if line.startswith(("File: ", "* Menu:")) or RST_ADORNMENT.match(line):
                in_menu = line.startswith("* Menu:")
                paragraphs.append(" ".join(current))
                current = []
                continue
            if not stripped:
                paragraphs.append(" ".join(current))
                current = []
                in_menu = False
                continue
            # Examples and display blocks are indented by 5 or more spaces; menu items start with '* '.
            if in_menu or line.startswith("* ") or _indent(line) >= 5:
                continue
            current.append(stripped)
        paragraphs.append(" ".join(current))
    cleaned = [re.sub(r"\*[Nn]ote\s+([^:]*?)::?", r"\1", p).replace("'", "'").replace("`", "'") for p in paragraphs]
    return _keep(cleaned)


ROFF_ESCAPES = [
    (re.compile(r"\\f(\[[^\]]*\]|\(..|.)"), ""),
    (re.compile(r"\\\((em|en)"), " - "),
    (re.compile(r"\\\((lq|rq|dq)"), '"'),
    (re.compile(r"\\\((oq|cq|aq)"), "'"),
    (re.compile(r"\\\(..|\\\[[^\]]*\]"), ""),
    (re.compile(r"\\[-]"), "-"),
    (re.compile(r"\\[&|^%:]|\\c$"), ""),
    (re.compile(r"\\e"), "\\\\"),
    (re.compile(r"\\s[+-]?\d"), ""),
    (re.compile(r"\\ "), " "),
]
ROFF_TEXT_MACROS = re.compile(r"^\.(B|I|BR|BI|IB|IR|RB|RI|SM|SB)\s+(.*)$")


def _roff_text(line: str) -> str:
    for pattern, replacement in ROFF_ESCAPES:
        line = pattern.sub(replacement, line)
    return line


def man_paragraphs(text: str) -> list[str]:
    """Prose paragraphs of a man page in roff: no-fill blocks (.nf/.EX), tables (.TS) and the
    SYNOPSIS section dropped; font macros reduced to their words. A page in the mdoc macros
    (BSD's, with `.Sh` sections) goes to `mdoc_paragraphs`."""
    if MDOC_SECTION.search(text):
        return mdoc_paragraphs(text)
    paragraphs: list[str] = []
    current: list[str] = []
    skipping = False
    in_synopsis = False
    for line in text.splitlines():
        if line.startswith((".nf", ".EX", ".TS", ".ig", ".de")):
            paragraphs.append(" ".join(current))
            current = []
            skipping = True
            continue
        if line.startswith((".fi", ".EE", ".TE", "..")):
            skipping = False
            continue
        if skipping or line.startswith(('.\\"', "'\\\"", '\\"')):
            continue
        macro = ROFF_TEXT_MACROS.match(line)
        if macro:
            words = [w.strip('"') for w in re.findall(r'"[^"]*"|\S+', macro.group(2))]
            # .B and .I set their words in one font; .BR, .IR... alternate fonts between words
            # written without a space.
            text_line = (" " if macro.group(1) in ("B", "I", "SM", "SB") else "").join(words)
            if not in_synopsis:
                current.append(_roff_text(text_line))
            continue
        if line.startswith((".", "'")):
            name = line[1:].split(maxsplit=1)[0] if len(line) > 1 and line[1:].split() else ""
            if name in ("SH", "SS"):
                in_synopsis = "SYNOPSIS" in line.upper()
            if name in ("SH", "SS", "PP", "LP", "P", "TP", "IP", "HP", "RS", "RE", "sp", "br", "TH", "TQ", "in"):
                paragraphs.append(" ".join(current))
                current = []
            continue
        if not in_synopsis:
            if not line.strip():
                paragraphs.append(" ".join(current))
                current = []
            else:
                current.append(_roff_text(line))
    paragraphs.append(" ".join(current))
    return _keep(paragraphs)


MDOC_SECTION = re.compile(r"^\.Sh\s", flags=re.MULTILINE)
MDOC_MACRO_LINE = re.compile(r"^\.([A-Z][a-z][a-z]?)\b[ \t]*(.*)$")
# Macros that end a paragraph; their own arguments (section titles, list tags) are not prose.
MDOC_BREAKS = frozenset("Sh Ss Pp Lp It Bl El Nd Dd Dt Os Rs Re".split())
# Inline macros whose name is dropped and whose arguments are words of the sentence.
MDOC_INLINE = frozenset(
    "Nm Va Ar Cm Pa Em Sy Dq Sq Pq Qq Tn Li Fn Fa Fo Fc Ft Ic Ev Er Dv Cd Ql Op Oo Oc Ao Ac Aq Bq Bo Bc "
    "Brq Bro Brc Do Dc Qo Qc So Sc Po Pc Xo Xc Ad An Lb Vt Ot Ta No Pf Sx In Ms Mt Lk Eo Ec Ef Es En".split()
)
MDOC_SYSTEMS = {"Bx": "BSD", "Bsx": "BSD/OS", "Fx": "FreeBSD", "Nx": "NetBSD", "Ox": "OpenBSD", "Ux": "UNIX", "At": "AT&T UNIX"}
MDOC_CLOSING_PUNCTUATION = frozenset(". , : ; ) ] ? !".split())


def _mdoc_text(arguments: str, page_name: str) -> str:
    """The words of an mdoc macro line: macro names dropped, `Xr name section` as name(section),
    `Fl x` as -x, a bare `Nm` as the page's name, `Ns` and closing punctuation without a space."""
    tokens = [t.strip('"') for t in re.findall(r'"[^"]*"|\S+', arguments)]
    words: list[str] = []
    join_next = False
    i = 0
    while i < len(tokens):
        token, i = tokens[i], i + 1
        if token == "Ns":
            join_next = True
            continue
        if token == "Xr" and i + 1 < len(tokens):
            token, i = f"{tokens[i]}({tokens[i + 1]})", i + 2
        elif token == "Fl":
            token = "-" + (tokens[i] if i < len(tokens) and tokens[i] not in MDOC_INLINE else "")
            i += token != "-"
        elif token == "Nm" and (i == len(tokens) or tokens[i] in MDOC_INLINE or tokens[i] in MDOC_CLOSING_PUNCTUATION):
            token = page_name
        elif token in MDOC_SYSTEMS:
            token = MDOC_SYSTEMS[token]
        elif token in MDOC_INLINE:
            continue
        if words and (join_next or token in MDOC_CLOSING_PUNCTUATION):
            words[-1] += token
        else:
            words.append(token)
        join_next = False
    return " ".join(words)


def mdoc_paragraphs(text: str) -> list[str]:
    """Prose paragraphs of a man page in the mdoc macros: displays (.Bd/.Ed, .Dl), the SYNOPSIS
    section, section titles and list tags dropped; inline macros reduced to their words."""
    paragraphs: list[str] = []
    current: list[str] = []
    page_name = ""
    in_display = in_synopsis = False

    def flush() -> None:
        paragraphs.append(" ".join(current))
        current.clear()

    for line in text.splitlines():
        if line.startswith(('.\\"', "'\\\"", '\\"')):
            continue
        macro = MDOC_MACRO_LINE.match(line)
        name, arguments = macro.groups() if macro else ("", line)
        if in_display:
            in_display = name != "Ed"
            continue
        if name in ("Bd", "Ed", "Dl", "D1"):
            flush()
            in_display = name == "Bd"
        elif name in MDOC_BREAKS:
            flush()
            if name in ("Sh", "Ss"):
                in_synopsis = "SYNOPSIS" in arguments.upper()
        elif in_synopsis:
            if name == "Nm" and not page_name:
                page_name = arguments.split()[0] if arguments.split() else ""
        elif macro or not line.startswith((".", "'")):
            if name == "Nm" and not page_name:
                page_name = arguments.split()[0] if arguments.split() else ""
            words = _mdoc_text(f"{name} {arguments}" if name else arguments, page_name)
            if not words:
                flush()
            else:
                current.append(_roff_text(words))
    flush()
    return _keep(paragraphs)


POD_CODES = re.compile(r"[BICFSXZE]<(?:<+\s(.*?)\s>+|([^<>]*))>")
POD_LINK = re.compile(r"L<(?:([^|<>]*)\|)?([^<>]*)>")


def _pod_inline(paragraph: str) -> str:
    paragraph = POD_LINK.sub(lambda m: m.group(1) or m.group(2).strip('"/'), paragraph)
    for _ in range(3):
        paragraph = POD_CODES.sub(lambda m: m.group(1) or m.group(2) or "", paragraph)
    return paragraph


def pod_paragraphs(text: str) -> list[str]:
    """Prose paragraphs of Perl POD: commands (=head, =item, =over...) and verbatim (indented)
    paragraphs dropped, formatting codes reduced to their text."""
    paragraphs = []
    in_pod = True
    for block in re.split(r"\n\s*\n", text):
        if not block.strip():
            continue
        if block.startswith("=cut"):
            in_pod = False
            continue
        if block.startswith("=pod") or block.startswith("=head"):
            in_pod = True
        if not in_pod or block.startswith("=") or block[0].isspace():
            continue
        paragraphs.append(_pod_inline(block))
    return _keep(paragraphs)


DICT_TAGS = re.compile(r"\[(?:1913 Webster|PJC|WordNet 1\.5|Century Dict\.|Webster 1913 Suppl\.|[A-Z]{2,4})\]")
DICT_PRONUNCIATION = re.compile(r"\\[^\\\n]{1,60}\\")
DICT_CROSS_REFS = re.compile(r"\[(?:syn|ant|also|see|Syn|Ant):[^\]]*\]")


def dict_entry_text(entry: str) -> str:
    """One dictd entry as a line of prose: the headword line kept, editorial tags, pronunciations,
    etymologies and synonym lists dropped, `{links}` reduced to their text, sense numbers kept inline."""
    entry = DICT_TAGS.sub("", entry)
    entry = DICT_CROSS_REFS.sub("", entry)
    # GCIDE writes ligatures as [ae], [oe]; what remains in brackets is etymology.
    entry = re.sub(r"\[(ae|oe|AE|OE)\]", r"\1", entry)
    entry = re.sub(r"\[[^\[\]]*\]", "", entry)
    entry = DICT_PRONUNCIATION.sub("", entry)
    entry = re.sub(r"[{}]", "", entry)
    entry = re.sub(r"<?(?:https?|ftp)://\S+>?", "", entry)
    return collapse(entry)


def dict_entries(data: str, index: str) -> list[tuple[str, str]]:
    """(headword, entry text) of each entry of a dictd database, from its uncompressed `.dict`
    text and its `.index` (headword, base64 offset, base64 length per line); the database's own
    `00-database-*` entries skipped."""
    entries = []
    raw = data.encode("utf-8")
    for line in index.splitlines():
        parts = line.split("\t")
        if len(parts) < 3 or parts[0].startswith(("00-database", "00database")):
            continue
        offset, length = _b64_number(parts[1]), _b64_number(parts[2])
        entries.append((parts[0], raw[offset : offset + length].decode("utf-8", errors="replace")))
    return entries


def _b64_number(digits: str) -> int:
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    value = 0
    for digit in digits:
        value = value * 64 + alphabet.index(digit)
    return value


def fortune_paragraphs(text: str) -> list[str]:
    """Each fortune of a fortune file (entries separated by a '%' line) as one paragraph; the
    attribution lines ('-- Author') dropped."""
    fortunes = []
    for fortune in re.split(r"^%\s*$", text, flags=re.MULTILINE):
        lines = [line for line in fortune.splitlines() if not line.strip().startswith("--")]
        fortunes.append(" ".join(line.strip() for line in lines))
    return _keep(fortunes)


def text_paragraphs(text: str) -> list[str]:
    """Prose paragraphs of plain text: blank-line paragraphs, indented blocks (examples) and
    lines of drawing characters dropped."""
    paragraphs = []
    for block in re.split(r"\n\s*\n", text):
        lines = [line for line in block.splitlines() if line.strip() and _indent(line.expandtabs(8)) < 4]
        if lines and not any(RST_ADORNMENT.match(line) for line in lines):
            paragraphs.append(" ".join(line.strip() for line in lines))
    return _keep(paragraphs)


EXTRACTORS = {
    "html": html_paragraphs,
    "rst": rst_paragraphs,
    "info": info_paragraphs,
    "man": man_paragraphs,
    "pod": pod_paragraphs,
    "fortune": fortune_paragraphs,
    "text": text_paragraphs,
}
