"""The English corpus builder on hand-written inputs: extraction of each format, cleaning, packing,
the deterministic split and the SOURCES listing. No network: the download is a fake that builds a
.deb with dpkg-deb, or the pure functions are called directly."""

import gzip
import json
import shutil
import subprocess

import pytest

from m2dist.data import prose
from m2dist.data.english_corpus import (
    Package, build_english_corpus, is_validation, pack_passages, read_licence,
)  # fmt: skip
from m2dist.errors import DataError, OutputExistsError

PROSE = "The quick brown fox jumps over the lazy dog and then it runs into the forest with the others."
OTHER = "A second paragraph of plain English text that is long enough to pass the filter for prose."


def test_html_drops_code_tables_and_scripts():
    page = f"""<html><head><title>t</title><script>var x = 1;</script></head><body>
    <nav><p>{OTHER} nav</p></nav>
    <p>{PROSE}</p>
    <pre>for (int i = 0; i &lt; n; i++) {{ the_loop(i); }}</pre>
    <div class="highlight-python"><p>print('the code is not prose but has words in it for the test')</p></div>
    <table><tr><td>{OTHER} cell</td></tr></table>
    <ul><li>{OTHER} &amp; more</li></ul></body></html>"""
    assert prose.html_paragraphs(page) == [PROSE, OTHER + " & more"]


def test_rst_drops_literal_blocks_and_directives():
    page = f"""Title
=====

{PROSE[:40]}
{PROSE[40:]} Use ``git`` and :func:`os.path.join`::

    def f():
        return 1

.. code-block:: python

   print("the example code here is dropped from the text")

.. note::

   {OTHER}

.. toctree::
   the index of other pages with enough words to look like prose
"""
    paragraphs = prose.rst_paragraphs(page)
    assert paragraphs == [PROSE + " Use git and os.path.join:", OTHER]


def test_info_drops_headers_menus_and_examples():
    info = f"""\x1f
File: foo.info,  Node: Top,  Next: Intro,  Up: (dir)

{PROSE}
*Note Other Node::, for the details of it.

     $ ./configure --prefix=/usr && make all of the things here

* Menu:

* Intro::       An introduction with enough words to be a paragraph of prose.
\x1f
Tag Table:
Node: Top76
"""
    assert prose.info_paragraphs(info) == [PROSE + " Other Node, for the details of it."]


def test_man_page_keeps_text_drops_synopsis_and_examples():
    page = f""".TH LS 1
.SH NAME
ls \\- list directory contents
.SH SYNOPSIS
.B ls
[\\fIOPTION\\fR]... [\\fIFILE\\fR]... and many more words to fill this line up
.SH DESCRIPTION
{PROSE[:30]}
.B brown fox
{PROSE[40:]}
.EX
ls -l the example is dropped from the output of this page entirely
.EE
.PP
{OTHER}
"""
    assert prose.man_paragraphs(page) == [PROSE[:30] + " brown fox " + PROSE[40:], OTHER]


def test_mdoc_man_page_reduces_macros_to_words():
    page = f""".\\" a comment with the words of a paragraph that is long enough
.Dd August 21, 2019
.Dt AHCI 4
.Sh NAME
.Nm ahci
.Nd Serial ATA Advanced Host Controller Interface driver
.Sh SYNOPSIS
To compile this driver into the kernel, place the following lines in your kernel file:
.Sh DESCRIPTION
The
.Nm
driver provides the
.Xr CAM 4
subsystem with native access to the ports
.Pq see Fl v .
{PROSE}
.Bd -literal -offset indent
ahci_load="YES" and the other settings of the example that are dropped
.Ed
.Bl -tag -width 4n
.It Va hint.ahci. Ns Ar X Ns Va .msi
{OTHER}
.El
The
.Nm
driver first appeared in
.Fx 8.0 .
"""
    assert prose.man_paragraphs(page) == [
        "The ahci driver provides the CAM(4) subsystem with native access to the ports see -v. " + PROSE,
        OTHER,
        "The ahci driver first appeared in FreeBSD 8.0.",
    ]


def test_pod_drops_commands_and_verbatim():
    pod = f"""=head1 NAME

perlfoo - the thing

=head1 DESCRIPTION

{PROSE} See L<the manual|perlfunc> and C<< $x->y >>.

    my $x = "verbatim code with the words in it and some more to be long";

=cut

sub f {{ return "after cut, code with the words of a long enough paragraph"; }}
"""
    assert prose.pod_paragraphs(pod) == [PROSE + " See the manual and $x->y."]


def _b64(n: int) -> str:
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    digits = ""
    while True:
        digits = alphabet[n % 64] + digits
        n //= 64
        if n == 0:
            return digits


def _dictd(entries: list[tuple[str, str]]) -> tuple[str, str]:
    data, index, offset = "", [], 0
    for head, body in entries:
        index.append(f"{head}\t{_b64(offset)}\t{_b64(len(body.encode()))}")
        data += body
        offset += len(body.encode())
    return data, "\n".join(index)


GCIDE_APPLE = """Apple \\Ap"ple\\, n. [OE. appel, AS. [ae]ppel.]
   1. The fleshy pome or fruit of a rosaceous tree (Pyrus malus)
      cultivated in numberless varieties in the temperate zones.
      [1913 Webster]
   2. Any tree genus {Malus}; an apple tree. [syn: {apple tree}]
      [PJC]
"""


def test_dictionary_entries_are_cleaned():
    data, index = _dictd([("00-database-info", "This file was converted\n"), ("Apple", GCIDE_APPLE)])
    entries = prose.dict_entries(data, index)
    assert [head for head, _ in entries] == ["Apple"]
    assert prose.dict_entry_text(entries[0][1]) == (
        "Apple , n. 1. The fleshy pome or fruit of a rosaceous tree (Pyrus malus) "
        "cultivated in numberless varieties in the temperate zones. 2. Any tree genus Malus; an apple tree."
    )


def test_fortunes_and_plain_text():
    fortunes = f"{PROSE}\n\t-- Somebody\n%\nshort one\n%\n{OTHER}\n"
    assert prose.fortune_paragraphs(fortunes) == [PROSE, OTHER]
    text = f"{PROSE}\n\n    indented example with the words of a long enough code block\n\n{OTHER}\n=====\n"
    assert prose.text_paragraphs(text) == [PROSE]


def test_english_filter():
    assert prose.is_english_prose(PROSE)
    assert not prose.is_english_prose("too short to count")
    assert not prose.is_english_prose("x = foo(bar[1], baz{2}) + qux<3> / 4 % 5 $ 6 @ 7 # 8 and the end")
    assert not prose.is_english_prose("Der schnelle braune Fuchs springt über den faulen Hund und läuft weg")


def test_pack_passages_limits_words_and_keeps_order():
    paragraphs = [PROSE, OTHER, " ".join(["word"] * 25)]
    passages = pack_passages(paragraphs, passage_words=20)
    assert all(len(p.split()) <= 20 for p in passages)
    assert " ".join(passages).split() == " ".join(paragraphs).split()
    with pytest.raises(ValueError, match="passage_words"):
        pack_passages(paragraphs, 0)


def test_split_is_deterministic_and_near_fraction():
    ids = [f"pkg/file{i}.html" for i in range(20_000)]
    val = [i for i in ids if is_validation(i, 0.01)]
    assert val == [i for i in ids if is_validation(i, 0.01)]
    assert 150 < len(val) < 250
    assert not any(is_validation(i, 0.0) for i in ids[:1000])


DEP5_HEADER = "Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/\n\n"


def test_licence_short_names_of_a_machine_readable_copyright():
    dep5 = DEP5_HEADER + """Files: *
License: GPL-1+ or Artistic, and Unicode

Files: b
License: GPL-2+-or-X11

Files: c
License: BSD-3-clause
 Redistribution and use in source and binary forms, with or without
 modification, are permitted provided that the following conditions are met.

Files: d
License: Redistribution and use in source and binary forms, with or without
 modification, are permitted provided that the following conditions are met.

Files: e
License: MIT OR Apache-2.0 with LLVM exception
"""
    assert read_licence(dep5) == "GPL-1+, Artistic, Unicode, GPL-2+-or-X11, BSD-3-clause, MIT, Apache-2.0 with LLVM exception"


def test_licence_of_a_free_form_copyright_comes_from_the_package_table():
    free_form = """This package was debianized by someone.

License:

Python License
==============

License: Permission to use, copy, modify, and distribute this software and
 its documentation for any purpose and without fee is hereby granted.
"""
    assert read_licence(free_form, fallback="PSF-2.0") == "PSF-2.0"
    with pytest.raises(DataError, match="licence="):
        read_licence(free_form)
    with pytest.raises(DataError, match="licence="):
        read_licence(DEP5_HEADER + "Files: *\nCopyright: nobody\n")


@pytest.mark.skipif(shutil.which("dpkg-deb") is None, reason="needs dpkg-deb")
def test_build_from_fake_packages(tmp_path):
    """Two fake .deb packages (HTML manual, dictd database) through the whole builder."""

    def make_deb(name: str, files: dict[str, bytes]) -> None:
        root = tmp_path / "src" / name
        for relative, data in files.items():
            (root / relative).parent.mkdir(parents=True, exist_ok=True)
            (root / relative).write_bytes(data)
        control = root / "DEBIAN" / "control"
        control.parent.mkdir(parents=True)
        control.write_text(f"Package: {name}\nVersion: 1.0-1\nArchitecture: all\nMaintainer: x <x@y>\nDescription: d\n")
        subprocess.run(["dpkg-deb", "--build", "--root-owner-group", str(root), str(tmp_path / f"{name}_1.0-1_all.deb")],
                       check=True, capture_output=True)  # fmt: skip

    pages = {f"usr/share/doc/man/html/p{i}.html": f"<p>{PROSE} Page {i}.</p><p>{OTHER}</p>".encode() for i in range(40)}
    make_deb("fake-manual", {**pages, "usr/share/doc/fake-manual/copyright": (DEP5_HEADER + "Files: *\nLicense: GFDL-NIV-1.3+\n").encode()})
    data, index = _dictd([("Apple", GCIDE_APPLE), ("Pear", GCIDE_APPLE.replace("Apple", "Pear"))])
    make_deb("fake-dict", {
        "usr/share/dictd/fake.dict.dz": gzip.compress(data.encode()), "usr/share/dictd/fake.index": index.encode(),
        "usr/share/doc/fake-dict/copyright": b"This dictionary is in the public domain.\n",
    })  # fmt: skip
    fetched = []

    def fake_download(name, cache_dir):
        fetched.append(name)
        return tmp_path / f"{name}_1.0-1_all.deb"

    packages = (
        Package("fake-manual", (("usr/share/doc/man/html/*.html", "html"),), description="a manual"),
        Package("fake-dict", (("usr/share/dictd/*.dict.dz", "dict"),), description="a dictionary", licence="public-domain"),
    )
    out = tmp_path / "out"
    report = build_english_corpus(out, packages, val_fraction=0.2, download=fake_download,
                                  measure_tokens=False, progress=False)  # fmt: skip
    assert fetched == ["fake-manual", "fake-dict"]
    train = [json.loads(line) for line in (out / "train.jsonl").open()]
    val = [json.loads(line) for line in (out / "val.jsonl").open()]
    # OTHER is on every page: kept once, packed with the first page's own paragraph; one dictionary passage.
    texts = [r["text"] for r in train + val]
    assert sum(OTHER in t for t in texts) == 1
    assert len(texts) == 40 + 1
    assert 0 < len(val) < 20 and not {r["source"] for r in train} & {r["source"] for r in val}
    manual, dictionary = report.sources
    assert (manual.licence, manual.version, manual.documents, manual.duplicate_paragraphs) == ("GFDL-NIV-1.3+", "1.0-1", 40, 39)
    assert (dictionary.licence, dictionary.documents, dictionary.passages) == ("public-domain", 1, 1)
    sources_md = (out / "SOURCES.md").read_text()
    assert "| fake-manual | 1.0-1 | GFDL-NIV-1.3+ | a manual | 40 |" in sources_md
    assert json.loads((out / "sources.json").read_text())["sources"][1]["package"] == "fake-dict"
    with pytest.raises(OutputExistsError, match="train.jsonl"):
        build_english_corpus(out, packages, download=fake_download, measure_tokens=False, progress=False)
    rebuilt = build_english_corpus(out, packages, val_fraction=0.2, download=fake_download, overwrite=True,
                                   measure_tokens=False, progress=False)  # fmt: skip
    assert rebuilt.split_passages == report.split_passages
