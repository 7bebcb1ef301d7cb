"""Offline text for the transformers figures: Python's own documentation strings.

What it is. Every docstring written in Python source (``__doc__`` of the object itself, never
inherited) of the public and single-underscore functions, classes and methods defined in a fixed
list of standard-library modules of the running interpreter. Nothing is downloaded; the result
depends only on the Python version (recorded in ``manifest.json``, with each file's SHA-256).

- ``retrieval.jsonl``: ``--pairs`` (query, document) pairs from the `EVAL_MODULES`. The query is
  a docstring's first sentence; the document is the object's qualified name, a colon and the rest
  of that docstring (the first sentence left out, so the query is not copied into its document).
  Queries of at least `MIN_QUERY_CHARS` and 4 words, documents of at least `MIN_REST_CHARS` after
  the name, the query not repeated in the document. Deduplicated: a query or a document text
  that occurs twice is dropped everywhere (two identical queries would have two right answers).
  Rows also say ``name`` and ``module``.
- ``calib.txt``: ``--calib-docs`` whole docstrings from the `CALIB_MODULES`, one per line, at least
  `MIN_CALIB_CHARS` long, deduplicated and none equal to an evaluation query or document.

Calibration and evaluation come from disjoint module lists, so no object's text is in both. Lines
are whitespace-collapsed and cut at a word boundary to `MAX_CHARS` characters (about 250 word
pieces: under a BERT's 512 positions). Which rows are kept, when there are more than asked for, is
fixed by the SHA-256 of the qualified name, not by the order of discovery.

    python scripts/text_corpus.py --out .cache/text
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import inspect
import json
import re
import sys
import warnings
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import ModuleType

#: Modules of the retrieval set (import failures, e.g. modules a later Python removed, are listed
#: in the manifest and skipped).
EVAL_MODULES = (  # noqa: SIM905 (a word list reads better than 150 quoted names)
    "_pydecimal argparse asyncio.base_events asyncio.base_subprocess asyncio.events "
    "asyncio.futures asyncio.locks asyncio.protocols asyncio.queues asyncio.runners "
    "asyncio.selector_events asyncio.sslproto asyncio.streams asyncio.subprocess "
    "asyncio.taskgroups asyncio.tasks asyncio.timeouts asyncio.transports asyncio.unix_events "
    "aifc calendar cgi chunk codecs collections compileall concurrent.futures._base "
    "concurrent.futures.process concurrent.futures.thread configparser ctypes dis "
    "email._header_value_parser email._policybase email.base64mime email.charset "
    "email.contentmanager email.encoders email.feedparser email.generator email.header "
    "email.headerregistry email.iterators email.message email.mime.multipart email.parser "
    "email.policy email.quoprimime email.utils filecmp ftplib getopt gettext graphlib "
    "html.parser http.client http.cookiejar http.cookies http.server imaplib imghdr "
    "importlib._bootstrap importlib._bootstrap_external importlib.abc importlib.metadata "
    "importlib.util inspect io ipaddress logging logging.config logging.handlers mailbox "
    "mailcap mimetypes modulefinder multiprocessing.connection multiprocessing.managers "
    "multiprocessing.pool multiprocessing.queues multiprocessing.shared_memory "
    "multiprocessing.synchronize nntplib os pathlib pickle pipes pkgutil platform poplib "
    "pyclbr runpy shelve shutil smtplib sndhdr socket socketserver ssl subprocess sunau "
    "symtable tarfile telnetlib tempfile threading tomllib._parser tracemalloc typing "
    "unittest.async_case unittest.case unittest.loader unittest.mock unittest.result "
    "unittest.runner unittest.suite urllib.parse urllib.request urllib.robotparser uu warnings "
    "wsgiref.handlers wsgiref.headers xdrlib xml.dom.expatbuilder xml.dom.minidom "
    "xml.dom.pulldom xml.dom.xmlbuilder xml.etree.ElementPath xml.sax.expatreader "
    "xml.sax.handler xml.sax.saxutils xml.sax.xmlreader xmlrpc.client xmlrpc.server zipapp "
    "zipfile zoneinfo._zoneinfo"
).split()

#: Modules of the calibration text (none is in `EVAL_MODULES`).
CALIB_MODULES = (  # noqa: SIM905
    "abc ast base64 bdb binascii bisect bz2 cmd code contextlib copy dataclasses difflib "
    "doctest enum fileinput fractions functools glob gzip hashlib heapq hmac json json.decoder "
    "json.encoder locale lzma netrc numbers optparse pdb plistlib pprint pydoc queue random re "
    "sched selectors shlex sqlite3 statistics string sysconfig textwrap timeit tokenize trace "
    "traceback uuid wave weakref xml.etree.ElementTree zipimport"
).split()

MIN_QUERY_CHARS = 20
MIN_REST_CHARS = 60
MIN_CALIB_CHARS = 80
MAX_CHARS = 1000

#: The end of a first sentence: . ! or ? then whitespace then an upper-case letter, a quote or a
#: bracket ("e.g. the" does not end one).
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z`'\"(\[])")


def collapse(text: str) -> str:
    """One line: runs of whitespace as one space."""
    return " ".join(text.split())


def clip(text: str, limit: int = MAX_CHARS) -> str:
    """``text`` cut at the last word boundary within ``limit`` characters."""
    if len(text) <= limit:
        return text
    return text[:limit].rsplit(" ", 1)[0]


def _own_doc(obj: object) -> str | None:
    doc = getattr(obj, "__doc__", None)
    return inspect.cleandoc(doc) if isinstance(doc, str) and doc.strip() else None


def _documented(module: ModuleType, name: str) -> Iterator[tuple[str, str]]:
    """(qualified name under the import name ``name``, docstring) of the functions, classes and
    methods defined in ``module`` (no dunder names but ``__init__``), in name order."""
    for attr, obj in sorted(vars(module).items()):
        # _pydecimal calls itself "decimal": compare with the module's own idea of its name.
        if attr.startswith("__") or getattr(obj, "__module__", None) != module.__name__:
            continue
        if not (inspect.isfunction(obj) or inspect.isclass(obj)):
            continue
        doc = _own_doc(obj)
        if doc:
            yield f"{name}.{attr}", doc
        if not inspect.isclass(obj):
            continue
        for method_name, method in sorted(vars(obj).items()):
            if method_name.startswith("__") and method_name != "__init__":
                continue
            function = getattr(method, "__func__", method)  # classmethod, staticmethod
            if inspect.isfunction(function) and (doc := _own_doc(function)):
                yield f"{name}.{attr}.{method_name}", doc


def docstrings(modules: Sequence[str]) -> tuple[list[tuple[str, str, str]], list[str]]:
    """(module, qualified name, docstring) of every documented object of ``modules`` and the
    modules that could not be imported."""
    found, missing = [], []
    for module_name in modules:
        with warnings.catch_warnings():  # deprecated modules (and typing.io) warn on access
            warnings.simplefilter("ignore", DeprecationWarning)
            try:
                module = importlib.import_module(module_name)
            except ImportError:
                missing.append(module_name)
                continue
            found += [
                (module_name, qualname, doc) for qualname, doc in _documented(module, module_name)
            ]
    return found, missing


def split_first_sentence(doc: str) -> tuple[str, str] | None:
    """(first sentence, the rest) of a one-line docstring, or None when it has one sentence."""
    parts = _SENTENCE_END.split(doc, maxsplit=1)
    return (parts[0], parts[1]) if len(parts) == 2 else None


def _order(qualname: str) -> str:
    return hashlib.sha256(qualname.encode()).hexdigest()


def retrieval_pairs(entries: Sequence[tuple[str, str, str]], count: int) -> list[dict[str, str]]:
    """``count`` (query, document) rows, unique queries and documents (see the module text)."""
    rows = []
    for module, qualname, doc in entries:
        split = split_first_sentence(collapse(doc))
        if split is None:
            continue
        query, rest = split
        if len(query) < MIN_QUERY_CHARS or len(query.split()) < 4 or len(rest) < MIN_REST_CHARS:
            continue
        if query.casefold() in rest.casefold():  # docstrings that repeat their first line
            continue
        query = clip(query)
        document = clip(f"{qualname}: {rest}")
        rows.append({"query": query, "document": document, "name": qualname, "module": module})
    queries = Counter(row["query"].casefold() for row in rows)
    rests = Counter(row["document"].split(": ", 1)[1].casefold() for row in rows)
    unique = [
        row
        for row in rows
        if queries[row["query"].casefold()] == 1
        and rests[row["document"].split(": ", 1)[1].casefold()] == 1
    ]
    if len(unique) < count:
        raise SystemExit(
            f"only {len(unique)} distinct retrieval pairs in this Python's docstrings; "
            f"asked for {count} (--pairs)"
        )
    return sorted(unique, key=lambda row: _order(row["name"]))[:count]


def calibration_lines(
    entries: Sequence[tuple[str, str, str]], count: int, held_out: set[str]
) -> list[str]:
    """``count`` whole docstrings, one line each, distinct and none in ``held_out`` (casefolded
    evaluation texts)."""
    seen: dict[str, tuple[str, str]] = {}
    for _, qualname, doc in sorted(entries, key=lambda entry: _order(entry[1])):
        text = clip(collapse(doc))
        key = text.casefold()
        if len(text) < MIN_CALIB_CHARS or key in held_out or key in seen:
            continue
        seen[key] = (qualname, text)
    if len(seen) < count:
        raise SystemExit(
            f"only {len(seen)} calibration docstrings; asked for {count} (--calib-docs)"
        )
    return [text for _, text in list(seen.values())[:count]]


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def build(out: Path, pairs: int = 1000, calib_docs: int = 512) -> dict[str, object]:
    """Write ``calib.txt``, ``retrieval.jsonl`` and ``manifest.json`` into ``out``."""
    if set(EVAL_MODULES) & set(CALIB_MODULES):
        raise AssertionError("calibration and evaluation modules must be disjoint")
    eval_entries, eval_missing = docstrings(EVAL_MODULES)
    calib_entries, calib_missing = docstrings(CALIB_MODULES)
    rows = retrieval_pairs(eval_entries, pairs)
    held_out = {row["query"].casefold() for row in rows}
    held_out |= {row["document"].split(": ", 1)[1].casefold() for row in rows}
    held_out |= {clip(collapse(doc)).casefold() for _, _, doc in eval_entries}
    lines = calibration_lines(calib_entries, calib_docs, held_out)
    out.mkdir(parents=True, exist_ok=True)
    retrieval_path, calib_path = out / "retrieval.jsonl", out / "calib.txt"
    retrieval_path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    calib_path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    manifest: dict[str, object] = {
        "what": "Python standard-library docstrings (scripts/text_corpus.py)",
        "python": sys.version.split()[0],
        "retrieval": {
            "file": retrieval_path.name,
            "pairs": len(rows),
            "modules": sorted({row["module"] for row in rows}),
            "modules_not_importable": eval_missing,
            "sha256": _sha256(retrieval_path),
        },
        "calibration": {
            "file": calib_path.name,
            "documents": len(lines),
            "modules": list(CALIB_MODULES),
            "modules_not_importable": calib_missing,
            "sha256": _sha256(calib_path),
        },
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return manifest


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path(".cache/text"))
    parser.add_argument("--pairs", type=int, default=1000, help="retrieval pairs (default 1000)")
    parser.add_argument(
        "--calib-docs", type=int, default=512, help="calibration documents (default 512)"
    )
    args = parser.parse_args(argv)
    manifest = build(args.out, args.pairs, args.calib_docs)
    print(json.dumps(manifest, indent=2))


if __name__ == "__main__":
    main()
