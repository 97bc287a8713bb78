"""An English prose corpus built from Debian 12 (bookworm) `main` packages: dictionaries (GCIDE,
WordNet, FOLDOC, Jargon File, The Devil's Dictionary), a book (An Anarchist FAQ) and manuals
(Linux kernel, Python and its scientific libraries, Perl, PostgreSQL, Rust, Java SE, Qt, Racket,
SageMath, GHC, OpenStack, Erlang, Boost, Debian's handbooks, Linux and FreeBSD man pages, GNU info
manuals...).

`build_english_corpus` downloads the packages of `PACKAGES` with `apt-get download` (cached: a
re-run fetches nothing), unpacks them with `dpkg-deb -x`, extracts prose paragraphs
(`m2dist.data.prose`), drops exact-duplicate paragraphs, packs the paragraphs of each source
document into passages of at most `passage_words` words (a pad-mode sample of 128 tokens holds
about 95 words), and writes `train.jsonl` and `val.jsonl` ({"text", "source"} per passage; a source
document goes wholly to one split, by a hash of its id) with `SOURCES.md` and `sources.json`: each
package's version, licence (from its copyright file, or the package table where that file is not
machine-readable), documents, passages, words and bytes.
"""

from __future__ import annotations

import fnmatch
import gzip
import hashlib
import json
import re
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

from m2dist.data.prose import EXTRACTORS, dict_entries, dict_entry_text, is_english_prose
from m2dist.errors import DataError, OutputExistsError

# Word pieces per word of English prose with the bert-base-uncased vocabulary; `build_english_corpus`
# measures it on the validation split and reports the token count from it.
TOKENS_PER_WORD_GUESS = 1.3
# Consecutive dictionary entries grouped into one source document, so that short entries share
# passages and the split keeps neighbouring entries together.
DICT_ENTRIES_PER_DOCUMENT = 64


@dataclass(frozen=True)
class Package:
    """A Debian package and the files of it that hold English prose."""

    name: str
    # fnmatch patterns on paths inside the package ('*' crosses '/'), each with its format: a key
    # of m2dist.data.prose.EXTRACTORS, or "dict" for a dictd database (`*.dict.dz`).
    files: tuple[tuple[str, str], ...]
    # fnmatch patterns of paths to leave out (indexes, changelogs, other languages).
    exclude: tuple[str, ...] = ()
    description: str = ""
    # The licence, for a package whose copyright file is not machine-readable (DEP-5): read by a
    # person from that file, as short names ("GPL-2+", "PSF-2.0").
    licence: str = ""


DICT = (("usr/share/dictd/*.dict.dz", "dict"),)
INFO = ("usr/share/info/*", "info")
MAN = ("usr/share/man/man*/*", "man")
# Sphinx HTML output: the generated pages hold the API docstrings that `_sources` lacks; module
# source listings, indexes and search pages are not prose.
SPHINX_EXCLUDE = ("*/_modules/*", "*/_sources/*", "*/_static/*", "*genindex*", "*/search.html", "*/py-modindex.html",
                  "*/_downloads/*")  # fmt: skip
RELEASE_NOTES = ("*/whatsnew/*", "*/history/*", "*/releases/*", "*/release-notes/*", "*changelog*", "*/changes*")
JAVADOC_EXCLUDE = ("*/class-use/*", "*/index-files/*", "*/index-all.html", "*-summary.html", "*-tree.html", "*/src-html/*",
                   "*/allclasses*")  # fmt: skip
# Qt's member lists repeat the class pages' signatures.
QT_EXCLUDE = ("*-members.html", "*-obsolete.html")


def _sphinx_html(name: str, doc_folder: str, description: str, licence: str = "") -> Package:
    """A package of Sphinx HTML under usr/share/doc/`doc_folder`, release notes left out."""
    html = ((f"usr/share/doc/{doc_folder}/*.html", "html"),)
    return Package(name, html, SPHINX_EXCLUDE + RELEASE_NOTES, description, licence)


PACKAGES: tuple[Package, ...] = (
    Package("dict-gcide", DICT, description="GNU Collaborative International Dictionary of English (Webster 1913 + WordNet)",
            licence="GPL-2+"),
    Package("dict-wn", DICT, description="WordNet 3.0 glosses"),
    Package("dict-foldoc", DICT, description="Free On-line Dictionary of Computing", licence="GFDL-NIV-1.1+"),
    Package("dict-jargon", DICT, description="The Jargon File 4.4.7"),
    Package("dict-devil", DICT, description="Ambrose Bierce, The Devil's Dictionary", licence="public-domain"),
    Package("fortunes", (("usr/share/games/fortunes/*", "fortune"),), ("*.dat", "*.u8"), "fortune cookies", "BSD"),
    Package("linux-doc-6.1", (("usr/share/doc/linux-doc-6.1/Documentation/*.rst", "rst"),),
            ("*/translations/*",), "Linux kernel documentation"),
    Package("python3.11-doc", (("usr/share/doc/python3.11/html/_sources/*.rst.txt", "rst"),),
            ("*/whatsnew/changelog*",), "Python 3.11 documentation", "PSF-2.0"),
    Package("perl-doc", (("usr/share/perl/*/pod/*.pod", "pod"),), ("*perl5*delta.pod",), "Perl 5.36 manual"),
    Package("postgresql-doc-15", (("usr/share/doc/postgresql-doc-15/html/*.html", "html"),),
            ("*/release-*",), "PostgreSQL 15 manual"),
    Package("debian-handbook", (("usr/share/doc/debian-handbook/html/en-US/*.html", "html"),),
            description="The Debian Administrator's Handbook"),
    Package("debian-reference-en", (("usr/share/debian-reference/*.en.html", "html"),), description="Debian Reference"),
    Package("debian-policy", (("usr/share/doc/debian-policy/*/_sources/*.rst.txt", "rst"),),
            description="Debian Policy Manual"),
    Package("developers-reference", (("usr/share/developers-reference/_sources/*.rst.txt", "rst"),),
            description="Debian Developer's Reference"),
    Package("maint-guide", (("usr/share/doc/maint-guide/html/*.en.html", "html"),), description="Debian New Maintainers' Guide"),
    Package("debian-history", (("usr/share/doc/debian-history/docs/*.en.html", "html"),),
            description="A Brief History of Debian", licence="GPL-2+"),
    Package("gnu-standards", (INFO,), description="GNU Coding Standards, GNU maintainer information",
            licence="GFDL-NIV-1.3+"),
    Package("autoconf-doc", (INFO,), description="Autoconf manual"),
    Package("bash-doc", (("usr/share/doc/bash/bash.html", "html"),), description="Bash reference manual"),
    Package("octave-doc", (INFO,), description="GNU Octave manual"),
    Package("git-doc", (("usr/share/doc/git-doc/*.html", "html"),), ("*RelNotes*",), "Git manuals"),
    Package("manpages", (("usr/share/man/man*/*", "man"),), description="Linux man-pages: overviews and conventions"),
    Package("manpages-dev", (("usr/share/man/man*/*", "man"),), description="Linux man-pages: system calls and library"),
    Package("libreoffice-help-en-us", (("usr/share/libreoffice/help/en-US/*.html", "html"),),
            description="LibreOffice help"),
    Package("python-django-doc", (("usr/share/doc/python-django-doc/html/*.html", "html"),),
            ("*/_modules/*", "*/releases/*", "*genindex*"), "Django 3.2 documentation"),
    Package("nodejs-doc", (("usr/share/doc/nodejs/api/*.html", "html"),), ("*/all.html",), "Node.js 18 API documentation"),
    Package("sqlite3-doc", (("usr/share/doc/sqlite3/*.html", "html"),), ("*/releaselog/*", "*/syntax/*"),
            "SQLite documentation"),
    Package("cmake-doc", (("usr/share/doc/cmake-data/html/_sources/*.rst.txt", "rst"),), description="CMake documentation"),
    Package("r-doc-html", (("usr/share/R/doc/manual/*.html", "html"),), description="R manuals", licence="GPL-2"),
    Package("gnome-user-docs", (("usr/share/help/C/*.page", "html"),), description="GNOME help"),
    Package("erlang-doc", (("usr/share/doc/erlang-doc/*.html", "html"),), ("*/wx-*", "*/chunks/*"), "Erlang/OTP documentation"),
    Package("libboost1.74-doc", (("usr/share/doc/libboost1.74-doc/*.html", "html"),), ("*/example*",),
            "Boost 1.74 documentation"),
    Package("openjdk-17-doc", (("usr/share/doc/openjdk-17-jre-headless/api/*.html", "html"),),
            ("*/class-use/*", "*/index-files/*", "*-summary.html", "*-tree.html", "*/src-html/*"),
            "Java SE 17 API documentation"),
    Package("rust-doc", (("usr/share/doc/rust-doc/html/*.html", "html"),),
            ("*/core/*", "*/src/*", "*/implementors/*", "*/arch/*", "*/alloc/*", "*/test/*", "*/proc_macro/*",
             "*/all.html", "*/print.html"), "Rust 1.63 books, reference and standard library documentation"),
    Package("freebsd-manpages", (MAN,), description="FreeBSD 12 man pages: devices, kernel interfaces"),
    Package("libssl-doc", (MAN,), description="OpenSSL 3.0 library man pages"),
    Package("tcl8.6-doc", (MAN,), description="Tcl 8.6 man pages", licence="TCL"),
    Package("tk8.6-doc", (MAN,), description="Tk 8.6 man pages", licence="TCL"),
    Package("racket-doc", (("usr/share/doc/racket/*.html", "html"),), ("*/doc-index.html",),
            "Racket 8.7 guides and references", "LGPL-2.1+, MIT"),
    Package("ghc-doc", (("usr/share/doc/ghc-doc/html/*.html", "html"),), ("*/src/*", "*/doc-index*", *SPHINX_EXCLUDE),
            "GHC 9.0 user's guide and library documentation"),
    Package("sagemath-doc", (("usr/share/doc/sagemath/html/en/*.html", "html"),), SPHINX_EXCLUDE + RELEASE_NOTES,
            "SageMath tutorials and reference manual"),
    *(_sphinx_html(name, root, description) for name, root, description in (
        ("python-sklearn-doc", "python-sklearn-doc/html", "scikit-learn documentation"),
        ("python-sympy-doc", "python-sympy-doc/html", "SymPy documentation"),
        ("python-statsmodels-doc", "python-statsmodels-doc/html", "statsmodels documentation"),
        ("python-astropy-doc", "python-astropy-doc/html", "Astropy documentation"),
        ("python-scipy-doc", "python-scipy-doc/html", "SciPy documentation"),
        ("python-pandas-doc", "python-pandas-doc/html", "pandas documentation"),
        ("python-skimage-doc", "python-skimage-doc/html", "scikit-image documentation"),
        ("python-dask-doc", "python-dask-doc/html", "Dask documentation"),
        ("python-celery-doc", "python-celery-doc/html", "Celery documentation"),
        ("python-ipython-doc", "python-ipython-doc/html", "IPython documentation"),
        ("python-pytest-doc", "python-pytest-doc/html", "pytest documentation"),
        ("python-tornado-doc", "python-tornado-doc/html", "Tornado documentation"),
        ("numba-doc", "numba-doc/html", "Numba documentation"),
        ("pylint-doc", "pylint/html", "Pylint documentation"),
        ("twisted-doc", "twisted-doc/html", "Twisted documentation"),
        ("nova-doc", "nova-doc/html", "OpenStack Nova documentation"),
        ("neutron-doc", "neutron-doc/html", "OpenStack Neutron documentation"),
        ("cinder-doc", "cinder-doc/html", "OpenStack Cinder documentation"),
        ("glance-doc", "glance-doc/html", "OpenStack Glance documentation"),
        ("heat-doc", "heat-doc/html", "OpenStack Heat documentation"),
        ("keystone-doc", "keystone-doc/html", "OpenStack Keystone documentation"),
        ("ironic-doc", "ironic-doc/html", "OpenStack Ironic documentation"),
        ("octavia-doc", "octavia-doc/html", "OpenStack Octavia documentation"),
        ("manila-doc", "manila-doc/html", "OpenStack Manila documentation"),
        ("buildbot-doc", "buildbot/html", "Buildbot documentation"),
        ("borgbackup-doc", "borgbackup/html", "BorgBackup documentation"),
        ("rsyslog-doc", "rsyslog-doc/html", "rsyslog documentation"),
        ("kea-doc", "kea/html", "Kea DHCP administrator reference"),
        ("frr-doc", "frr/html", "FRRouting documentation"),
        ("openvswitch-doc", "openvswitch-doc/html", "Open vSwitch documentation"),
    )),
    _sphinx_html("krb5-doc", "krb5-doc", "MIT Kerberos documentation", licence="MIT"),
    Package("python-sqlalchemy-doc", (("usr/share/doc/python-sqlalchemy-doc/rst/*.rst", "rst"),), ("*changelog*",),
            "SQLAlchemy 1.4 documentation"),
    Package("llvm-15-doc", (("usr/share/doc/llvm-15-doc/html/_sources/*.rst.txt", "rst"),), ("*ReleaseNotes*",),
            "LLVM 15 documentation"),
    Package("clang-15-doc", (("usr/share/doc/clang-15/html/_sources/*.rst.txt", "rst"),),
            ("*ReleaseNotes*", "*AttributeReference*", "*DiagnosticsReference*"), "Clang 15 documentation"),
    Package("sphinx-doc", (("usr/share/doc/sphinx-doc/html/_sources/*.txt", "rst"),), ("*/changes*",), "Sphinx documentation"),
    Package("python-setuptools-doc", (("usr/share/doc/python-setuptools-doc/html/_sources/*.txt", "rst"),), ("*history*",),
            "setuptools documentation", "Expat"),
    Package("python-flask-doc", (("usr/share/doc/python-flask-doc/html/_sources/*.txt", "rst"),), ("*changes*",),
            "Flask documentation"),
    Package("python-pygments-doc", (("usr/share/doc/python-pygments-doc/html/_sources/*.txt", "rst"),), ("*changelog*",),
            "Pygments documentation"),
    Package("mercurial-common", (("usr/lib/python3/dist-packages/mercurial/helptext/*.txt", "rst"),),
            description="Mercurial help topics"),
    Package("ghostscript-doc", (("usr/share/doc/ghostscript/html/_sources/*.rst*", "rst"),), ("*News*", "*History*"),
            "Ghostscript documentation"),
    *(Package(name, (("usr/share/qt5/doc/*.html", "html"),), QT_EXCLUDE, description) for name, description in (
        ("qtbase5-doc-html", "Qt 5.15 core, GUI, widgets and network documentation"),
        ("qtdeclarative5-doc-html", "Qt 5.15 QML and Qt Quick documentation"),
        ("qttools5-doc-html", "Qt 5.15 Designer, Linguist and Help documentation"),
        ("qtmultimedia5-doc-html", "Qt 5.15 Multimedia documentation"),
        ("qtcharts5-doc-html", "Qt 5.15 Charts documentation"),
        ("qtlocation5-doc-html", "Qt 5.15 Location and Positioning documentation"),
        ("qtwebengine5-doc-html", "Qt 5.15 WebEngine documentation"),
        ("qtconnectivity5-doc-html", "Qt 5.15 Bluetooth and NFC documentation"),
        ("qt3d5-doc-html", "Qt 5.15 3D documentation"),
        ("qtquickcontrols2-5-doc-html", "Qt 5.15 Quick Controls documentation"),
        ("qtgraphicaleffects5-doc-html", "Qt 5.15 Graphical Effects documentation"),
        ("qtdatavisualization5-doc-html", "Qt 5.15 Data Visualization documentation"),
        ("qtsensors5-doc-html", "Qt 5.15 Sensors documentation"),
        ("qtxmlpatterns5-doc-html", "Qt 5.15 XML Patterns documentation"),
    )),
    Package("qtcreator-doc", (("usr/share/qtcreator/doc/*.html", "html"),), QT_EXCLUDE, "Qt Creator manual"),
    Package("wx3.2-doc", (("usr/share/doc/wx3.2-doc/html/*.html", "html"),),
            ("*_8h.html", "*_source.html", "*-members.html", "*/search/*"), "wxWidgets 3.2 documentation"),
    Package("libstdc++-12-doc", (("usr/share/doc/gcc-12-base/libstdc++/*.html", "html"),), ("*_source.html",),
            "GNU C++ library manual and API documentation"),
    Package("libgtk-3-doc", (("usr/share/gtk-doc/html/*.html", "html"),), description="GTK 3 reference manual"),
    Package("libglib2.0-doc", (("usr/share/gtk-doc/html/*.html", "html"),), description="GLib, GObject and GIO reference manuals"),
    Package("doxygen-doc", (("usr/share/doc/doxygen/html/*.html", "html"),), description="Doxygen manual"),
    Package("derby-doc", (("usr/share/doc/derby-doc/javadoc/*.html", "html"),), JAVADOC_EXCLUDE, "Apache Derby API documentation"),
    Package("ant-doc", (("usr/share/doc/ant/*.html", "html"),), JAVADOC_EXCLUDE, "Apache Ant manual and API documentation"),
    Package("gradle-doc", (("usr/share/doc/gradle/*.html", "html"),), JAVADOC_EXCLUDE, "Gradle API documentation"),
    Package("db5.3-doc", (("usr/share/doc/db5.3-doc/*.html", "html"),), JAVADOC_EXCLUDE, "Berkeley DB 5.3 documentation"),
    Package("fp-docs-3.2.2", (("usr/share/doc/fp-docs/3.2.2/*.html", "html"),), description="Free Pascal 3.2 documentation"),
    Package("cppreference-doc-en-html", (("usr/share/cppreference/doc/html/en/*.html", "html"),),
            description="cppreference.com C and C++ reference"),
    Package("lilypond-doc-html", (("usr/share/doc/lilypond/html/Documentation/*.html", "html"),),
            ("*/Documentation/??/*", "*-big-page.html", "*/snippets/*"), "LilyPond 2.24 manuals (English)"),
    Package("gimp-help-en", (("usr/share/gimp/2.0/help/en/*.html", "html"),), description="GIMP 2.10 user manual"),
    Package("kicad-doc-en", (("usr/share/doc/kicad/help/en/*.html", "html"),), description="KiCad 6 manuals"),
    Package("gnucash-docs", (("usr/share/help/C/*.xml", "html"),), description="GnuCash tutorial and help (DocBook)"),
    Package("mate-user-guide", (("usr/share/help/C/mate-user-guide/*.xml", "html"),), description="MATE desktop user guide"),
    Package("apache2-doc", (("usr/share/doc/apache2-doc/manual/en/*.html", "html"),), description="Apache HTTP Server 2.4 manual"),
    Package("exim4-doc-html", (("usr/share/doc/exim4-doc-html/*.html", "html"),), description="Exim 4 specification",
            licence="GPL-2+"),
    Package("postfix-doc", (("usr/share/doc/postfix/html/*.html", "html"),), description="Postfix documentation",
            licence="EPL-2.0, IPL-1.0"),
    Package("bind9-doc", (("usr/share/doc/bind9-doc/arm/*.html", "html"),), ("*/_static/*", "*genindex*", "*notes*"),
            "BIND 9 administrator reference manual"),
    Package("maxima-doc", (("usr/share/doc/maxima-doc/html/*.html", "html"),), description="Maxima manual", licence="GPL-2"),
    Package("gap-doc", (("usr/share/gap/doc/*.html", "html"),), ("*_mj.html",), "GAP 4.12 tutorial and reference",
            "GPL-2+"),
    Package("grass-doc", (("usr/share/doc/grass-doc/html/*.html", "html"),), description="GRASS GIS 8.2 manual"),
    Package("installation-guide-amd64", (("usr/share/doc/installation-guide-amd64/en/*.html", "html"),),
            description="Debian 12 installation guide (English)", licence="GPL-2"),
    Package("debian-edu-doc-en", (("usr/share/doc/debian-edu-doc-en/*bookworm*.html", "html"),),
            description="Debian Edu manual"),
    Package("harden-doc", (("usr/share/doc/harden-doc/html/en-US/*.html", "html"),), description="Securing Debian Manual"),
    Package("abs-guide", (("usr/share/doc/abs-guide/html/*.html", "html"),), description="Advanced Bash-Scripting Guide"),
    Package("gnuplot-doc", (("usr/share/doc/gnuplot/htmldocs/*.html", "html"),), description="gnuplot 5.4 manual"),
    Package("haskell98-report", (("usr/share/doc/haskell98-report/html/*.html", "html"),), description="The Haskell 98 Report"),
    Package("xorg-docs", (("usr/share/doc/xorg-docs/*.html", "html"),), description="X Window System protocols and conventions",
            licence="MIT"),
    Package("flex-doc", (("usr/share/doc/flex-doc/html/*.html", "html"),), description="flex manual"),
    Package("m4-doc", (("usr/share/doc/m4/*.html", "html"),), ("*-index.html", "*License.html"), "GNU m4 manual",
            "GFDL-NIV-1.3+"),
    Package("libtool-doc", (INFO,), description="GNU Libtool manual"),
    Package("guile-3.0-doc", (INFO,), description="Guile 3.0 reference manual", licence="GFDL-NIV-1.3+"),
    Package("binutils-doc", (INFO,), description="GNU assembler, linker and binutils manuals", licence="GFDL-NIV-1.3+"),
    Package("zsh-doc", (INFO,), description="Zsh manual"),
    Package("mit-scheme-doc", (INFO,), description="MIT/GNU Scheme reference and user manuals", licence="GPL-2+"),
    Package("ada-reference-manual-2020", (("usr/share/info/arm2020.info*", "info"),), description="Ada 2022 reference manual"),
    Package("swi-prolog-doc", (("usr/share/swi-prolog/doc/*.html", "html"),), ("*DocIndex*",), "SWI-Prolog manual"),
    Package("imagemagick-6-doc", (("usr/share/doc/imagemagick-6-common/html/www/*.html", "html"),),
            description="ImageMagick 6 documentation"),
    Package("ffmpeg-doc", (("usr/share/doc/ffmpeg/manual/*.html", "html"),), ("*-all.html",), "FFmpeg manuals"),
    Package("csound-doc", (("usr/share/doc/csound-doc/html/*.html", "html"),), ("*/examples/*",), "Csound manual"),
    Package("pacemaker-doc", (("usr/share/doc/pacemaker/*.html", "html"),),
            ("*/singlehtml/*", "usr/share/doc/pacemaker/html/*", *SPHINX_EXCLUDE), "Pacemaker cluster manuals"),
    Package("wireshark-doc", (("usr/share/doc/wireshark/*.html", "html"),), description="Wireshark user's and developer's guides"),
    Package("weechat-doc", (("usr/share/doc/weechat-doc/html/*.en.html", "html"),), description="WeeChat documentation (English)"),
    Package("graphviz-doc", (("usr/share/doc/graphviz/html/*.html", "html"),), description="Graphviz documentation"),
    Package("png-definitive-guide", (("usr/share/doc/png-definitive-guide/html/*.html", "html"),), ("*book-index*",),
            "PNG: The Definitive Guide"),
    Package("live-manual-html", (("usr/share/doc/live-manual/html/live-manual/*.en.html", "html"),),
            description="Debian Live manual (English)"),
    Package("slurm-wlm-doc", (("usr/share/doc/slurm-wlm/html/*.html", "html"),), description="Slurm documentation"),
    Package("postgis-doc", (("usr/share/doc/postgis-doc/*.html", "html"),), description="PostGIS manual"),
    Package("povray-doc", (("usr/share/doc/povray/html/*.html", "html"),), ("*idx*",), "POV-Ray manual"),
    Package("freedombox-doc-en", (("usr/share/freedombox/manual/en/*.html", "html"),), description="FreedomBox manual"),
    Package("anarchism", (("usr/share/doc/anarchism/html/*.html", "html"),), description="An Anarchist FAQ (a book)"),
    Package("fortune-anarchism", (("usr/share/games/fortunes/*", "fortune"),), ("*.dat",), "anarchist quotations"),
)  # fmt: skip


@dataclass
class SourceStats:
    """What one package contributed to the corpus."""

    package: str
    version: str
    licence: str
    description: str
    documents: int = 0
    passages: int = 0
    words: int = 0
    bytes: int = 0
    duplicate_paragraphs: int = 0


@dataclass
class CorpusReport:
    """Totals of a built corpus; `tokens_per_word` is measured on the validation split when the
    tokenizer could be loaded, else TOKENS_PER_WORD_GUESS."""

    out_dir: str
    sources: list[SourceStats] = field(default_factory=list)
    split_passages: dict[str, int] = field(default_factory=dict)
    split_words: dict[str, int] = field(default_factory=dict)
    tokens_per_word: float = TOKENS_PER_WORD_GUESS

    @property
    def documents(self) -> int:
        return sum(s.documents for s in self.sources)

    @property
    def passages(self) -> int:
        return sum(s.passages for s in self.sources)

    @property
    def words(self) -> int:
        return sum(s.words for s in self.sources)

    @property
    def bytes(self) -> int:
        return sum(s.bytes for s in self.sources)

    @property
    def estimated_tokens(self) -> int:
        return round(self.words * self.tokens_per_word)

    def summary(self) -> str:
        splits = ", ".join(f"{k}: {v:,} passages" for k, v in self.split_passages.items())
        return (
            f"{self.out_dir}: {self.documents:,} documents, {self.passages:,} passages ({splits}), "
            f"{self.bytes / 1e6:.1f} MB, {self.words:,} words, ~{self.estimated_tokens / 1e6:.1f}M tokens "
            f"at {self.tokens_per_word:.3f} tokens/word"
        )


def apt_download(package: str, cache_dir: Path) -> Path:
    """The package's .deb in `cache_dir`, fetched with `apt-get download` unless already there."""
    cached = sorted(cache_dir.glob(f"{package}_*.deb"))
    if cached:
        return cached[-1]
    cache_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache_dir) as tmp:
        done = subprocess.run(["apt-get", "download", package], cwd=tmp, capture_output=True, text=True)
        if done.returncode != 0:
            raise DataError(f"apt-get download {package} failed: {done.stderr.strip()}")
        (deb,) = Path(tmp).glob("*.deb")
        return Path(shutil.move(str(deb), cache_dir / deb.name))


def unpack_deb(deb: Path, into: Path) -> tuple[Path, str]:
    """Unpack `deb` once into `into/<file stem>` with dpkg-deb; (folder, package version)."""
    version = subprocess.run(["dpkg-deb", "-f", str(deb), "Version"], capture_output=True, text=True, check=True)
    target = into / deb.stem
    if not (target / ".unpacked").is_file():
        shutil.rmtree(target, ignore_errors=True)
        target.mkdir(parents=True)
        subprocess.run(["dpkg-deb", "-x", str(deb), str(target)], check=True)
        (target / ".unpacked").touch()
    return target, version.stdout.strip()


# A machine-readable (DEP-5) copyright file opens with a `Format:` line naming the specification.
DEP5_FORMAT = re.compile(r"\A\s*Format(?:-Specification)?:\s*\S*(?:copyright-format|dep5)", flags=re.IGNORECASE)
# Licence expressions join short names with "or", "and" and commas ("GPL-1+ or Artistic, and Unicode").
LICENCE_SEPARATORS = re.compile(r"\s*,\s*(?:(?:or|and)\s+)?|\s+(?:or|and)\s+", flags=re.IGNORECASE)
# A licence's short name has a few words at most ("GPL-3+ with Autoconf exception"), an expression
# of them a few more; a longer first line is licence text put on the `License:` line itself.
MAX_LICENCE_NAME_WORDS = 4
MAX_LICENCE_EXPRESSION_WORDS = 8


def is_machine_readable(copyright_text: str) -> bool:
    return DEP5_FORMAT.match(copyright_text) is not None


def dep5_licences(copyright_text: str) -> list[str]:
    """The licence short names of a machine-readable (DEP-5) copyright file, in first-seen order:
    the first line of each `License:` field, split on "or", "and" and commas; a first line that
    reads as a sentence (licence text, not a name) is dropped."""
    names: list[str] = []
    for line in re.findall(r"^License:[ \t]*(\S[^\n]*)$", copyright_text, flags=re.MULTILINE):
        parts = [part for part in LICENCE_SEPARATORS.split(line.strip()) if part]
        if not _is_sentence(line.strip(), parts):
            names.extend(part for part in dict.fromkeys(parts) if part not in names)
    return names


def _is_sentence(line: str, parts: list[str]) -> bool:
    return (
        not line[0].isalnum()
        or line.endswith((".", ",", ";", ":"))
        or len(line.split()) > MAX_LICENCE_EXPRESSION_WORDS
        or any(len(part.split()) > MAX_LICENCE_NAME_WORDS for part in parts)
    )


def read_licence(copyright_text: str, fallback: str = "") -> str:
    """The licences of a Debian copyright file: the short names of its `License:` fields when it is
    machine-readable (DEP-5), else `fallback` (the package table's licence, read by a person from
    the free-form file)."""
    names = dep5_licences(copyright_text) if is_machine_readable(copyright_text) else []
    if names:
        return ", ".join(names)
    if fallback:
        return fallback
    raise DataError(
        "the copyright file is not machine-readable (DEP-5) or names no licence: give the package's "
        "licence in its Package(licence=...) entry"
    )


def package_licence(root: Path, package: Package) -> str:
    doc_dir = root / "usr/share/doc" / package.name
    if doc_dir.is_symlink():
        # Debian links the doc folder of a package to that of another binary package of the same
        # source, which holds the copyright file.
        return f"as {Path(doc_dir.readlink()).name} (same source package)"
    path = doc_dir / "copyright"
    if not path.is_file():
        candidates = sorted(root.glob("usr/share/doc/*/copyright"))
        if not candidates:
            raise DataError(f"{package.name}: no usr/share/doc/*/copyright in the package; its licence is unknown")
        path = candidates[0]
    try:
        return read_licence(path.read_text(encoding="utf-8", errors="replace"), package.licence)
    except DataError as error:
        raise DataError(f"{package.name}: {error}") from None


def read_text_file(path: Path) -> str:
    data = path.read_bytes()
    if data[:2] == b"\x1f\x8b":
        data = gzip.decompress(data)
    return data.decode("utf-8", errors="replace")


def package_documents(root: Path, package: Package) -> Iterator[tuple[str, list[str]]]:
    """(document id, prose paragraphs) of each prose file of an unpacked package, in path order;
    a dictionary gives one document per DICT_ENTRIES_PER_DOCUMENT consecutive entries."""
    for path in sorted(p for p in root.rglob("*") if p.is_file() and not p.is_symlink()):
        relative = path.relative_to(root).as_posix()
        # Patterns name files as installed: `page.rst` also matches the compressed `page.rst.gz`.
        name = relative.removesuffix(".gz") if not relative.endswith(".dict.dz") else relative
        if any(fnmatch.fnmatch(name, pattern) for pattern in package.exclude):
            continue
        kind = next((k for pattern, k in package.files if fnmatch.fnmatch(name, pattern)), None)
        if kind is None:
            continue
        doc_id = f"{package.name}/{relative}"
        if kind == "dict":
            index = path.with_name(path.name.removesuffix(".dict.dz") + ".index")
            entries = dict_entries(read_text_file(path), index.read_text(encoding="utf-8", errors="replace"))
            # WordNet repeats a synset's gloss under each of its words: keep the first entry of a body.
            texts, bodies = [], set()
            for _, entry in entries:
                body = paragraph_key(entry.split("\n", 1)[-1])
                text = dict_entry_text(entry)
                if body not in bodies and is_english_prose(text, min_words=5):
                    bodies.add(body)
                    texts.append(text)
            for start in range(0, len(texts), DICT_ENTRIES_PER_DOCUMENT):
                yield f"{doc_id}#{start // DICT_ENTRIES_PER_DOCUMENT}", texts[start : start + DICT_ENTRIES_PER_DOCUMENT]
        else:
            yield doc_id, EXTRACTORS[kind](read_text_file(path))


def _sentences(paragraph: str) -> list[str]:
    return re.split(r"(?<=[.!?])\s+(?=[A-Z(\"'])", paragraph)


def pack_passages(paragraphs: list[str], passage_words: int) -> list[str]:
    """Consecutive paragraphs joined into passages of at most `passage_words` words; a longer
    paragraph is cut between sentences, a longer sentence between words."""
    if passage_words < 1:
        raise ValueError(f"passage_words must be >= 1, got {passage_words}")
    pieces: list[list[str]] = []
    for paragraph in paragraphs:
        for sentence in _sentences(paragraph):
            words = sentence.split()
            pieces.extend(words[i : i + passage_words] for i in range(0, len(words), passage_words))
        pieces.append([])  # paragraph boundary
    passages, current = [], []
    for piece in pieces:
        if current and len(current) + len(piece) > passage_words:
            passages.append(" ".join(current))
            current = []
        current.extend(piece)
    if current:
        passages.append(" ".join(current))
    return passages


def is_validation(doc_id: str, val_fraction: float) -> bool:
    """True when the first 8 bytes of SHA-256(doc_id), as a fraction of 2**64, are below
    `val_fraction`: the same documents go to validation on every run and machine."""
    digest = hashlib.sha256(doc_id.encode("utf-8")).digest()[:8]
    return int.from_bytes(digest, "little") < val_fraction * 2.0**64


def paragraph_key(paragraph: str) -> bytes:
    return hashlib.blake2b(paragraph.lower().encode("utf-8"), digest_size=12).digest()


def write_sources(out_dir: Path, report: CorpusReport) -> None:
    """SOURCES.md (a table for people) and sources.json (the same, for programs)."""
    (out_dir / "sources.json").write_text(
        json.dumps({"sources": [asdict(s) for s in report.sources], "split_passages": report.split_passages,
                    "split_words": report.split_words, "tokens_per_word": report.tokens_per_word}, indent=1) + "\n"
    )  # fmt: skip
    lines = [
        "# Sources of the English corpus",
        "",
        "Debian 12 (bookworm) `main` packages; each licence is read from the package's "
        "`usr/share/doc/<package>/copyright`, which holds the full terms.",
        "",
        "| package | version | licence | content | documents | passages | words | MB |",
        "|---|---|---|---|---:|---:|---:|---:|",
    ]
    for s in report.sources:
        lines.append(
            f"| {s.package} | {s.version} | {s.licence} | {s.description} | {s.documents:,} | {s.passages:,} "
            f"| {s.words:,} | {s.bytes / 1e6:.2f} |"
        )
    lines += ["", report.summary(), ""]
    (out_dir / "SOURCES.md").write_text("\n".join(lines))


def measure_tokens_per_word(path: Path, tokenizer_path: str | Path | None = None, max_passages: int = 20_000) -> float:
    """Word pieces per word over the first `max_passages` passages of a JSONL split."""
    from m2dist.data.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(tokenizer_path)
    texts = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            texts.append(json.loads(line)["text"])
            if len(texts) == max_passages:
                break
    words = sum(len(t.split()) for t in texts)
    if not words:
        return TOKENS_PER_WORD_GUESS
    return sum(len(ids) for ids in tokenizer.encode_batch(texts)) / words


def build_english_corpus(
    out_dir: str | Path,
    packages: tuple[Package, ...] = PACKAGES,
    *,
    cache_dir: str | Path | None = None,
    val_fraction: float = 0.01,
    passage_words: int = 90,
    download: Callable[[str, Path], Path] = apt_download,
    overwrite: bool = False,
    measure_tokens: bool = True,
    progress: bool = True,
) -> CorpusReport:
    """Build the corpus into `out_dir` (train.jsonl, val.jsonl, SOURCES.md, sources.json);
    downloaded .deb files and their unpacked trees stay in `cache_dir` (default out_dir/cache).
    `download(package, cache_dir)` returns a .deb path (tests pass a fake)."""
    from tqdm import tqdm

    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    out_dir = Path(out_dir)
    cache = Path(cache_dir) if cache_dir else out_dir / "cache"
    outputs = {"train": out_dir / "train.jsonl", "val": out_dir / "val.jsonl"}
    existing = [str(p) for p in outputs.values() if p.exists()]
    if existing and not overwrite:
        raise OutputExistsError(f"{', '.join(existing)} exist; pass overwrite=True (--overwrite) to rebuild")
    out_dir.mkdir(parents=True, exist_ok=True)
    report = CorpusReport(str(out_dir), split_passages={"train": 0, "val": 0}, split_words={"train": 0, "val": 0})
    seen: set[bytes] = set()
    files = {split: open(path, "w", encoding="utf-8") for split, path in outputs.items()}
    try:
        for package in tqdm(packages, desc="packages", unit=" pkg", disable=not progress):
            deb = download(package.name, cache / "debs")
            root, version = unpack_deb(deb, cache / "unpacked")
            stats = SourceStats(package.name, version, package_licence(root, package), package.description)
            for doc_id, paragraphs in package_documents(root, package):
                unique = []
                for paragraph in paragraphs:
                    key = paragraph_key(paragraph)
                    if key in seen:
                        stats.duplicate_paragraphs += 1
                        continue
                    seen.add(key)
                    unique.append(paragraph)
                if not unique:
                    continue
                split = "val" if is_validation(doc_id, val_fraction) else "train"
                stats.documents += 1
                for passage in pack_passages(unique, passage_words):
                    record = json.dumps({"text": passage, "source": doc_id}, ensure_ascii=False)
                    files[split].write(record + "\n")
                    words = len(passage.split())
                    stats.passages += 1
                    stats.words += words
                    stats.bytes += len(passage.encode("utf-8"))
                    report.split_passages[split] += 1
                    report.split_words[split] += words
            report.sources.append(stats)
    finally:
        for f in files.values():
            f.close()
    if measure_tokens and report.split_passages["val"]:
        report.tokens_per_word = measure_tokens_per_word(outputs["val"])
    write_sources(out_dir, report)
    return report
