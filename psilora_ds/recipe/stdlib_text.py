"""Real text with no download: two domains that ship with every Python installation.

* **Python source** (:func:`python_source_documents`): a fixed list of pure-Python standard-library
  modules, one document per file (about 2.6 MB on CPython 3.11). The built-in base
  (``builtin:stdlib-llama``) is pretrained on it (:mod:`psilora_ds.recipe.pretrain`). Larger bases train on
  :func:`stdlib_source_documents`: every pure-Python file of the standard library but tests and the held-out
  modules (about 11 MB on 3.11), evaluated on the same held-out modules.
* **The Python language reference in English** (:func:`python_reference_documents`): the topics of
  ``pydoc_data/topics.py`` (what ``help("if")`` prints; 79 topics, 465 KB on 3.11), one document per
  topic. The default fine-tuning task (``builtin:python-reference``): prose about the language with code
  in it, a different domain from the source files. Its held-out split is fixed: every tenth topic in sorted
  order (8 topics), so runs with different seeds are evaluated on the same text; a training topic with the
  text of a held-out one is dropped.

Both are read from the running interpreter, so the exact text depends on its version (the figures in
docs/ were taken on CPython 3.11). The text is the Python Software Foundation's (PSF licence).
"""

from __future__ import annotations

import os
import sysconfig

# pure-Python modules present as single files from CPython 3.10 to 3.13; a missing one is skipped
SOURCE_MODULES = (
    "argparse ast base64 bisect calendar cmd code codecs configparser contextlib copy csv dataclasses difflib dis "
    "doctest enum filecmp fileinput fnmatch fractions ftplib functools getopt gettext glob gzip heapq hmac imaplib "
    "inspect ipaddress locale mailbox netrc numbers operator optparse pickle pkgutil platform plistlib poplib pprint "
    "queue quopri random reprlib sched secrets selectors shlex shutil smtplib socket statistics string subprocess "
    "tarfile tempfile textwrap threading timeit tokenize trace traceback types typing uuid warnings wave weakref"
).split()
HELD_OUT_EVERY = 10  # every tenth document (sorted order) is held out for evaluation


def python_source_documents() -> tuple[list[str], list[str]]:
    """``(train, eval)`` source files of :data:`SOURCE_MODULES` (every tenth module held out)."""
    lib = sysconfig.get_paths()["stdlib"]
    docs = []
    for name in SOURCE_MODULES:
        path = os.path.join(lib, f"{name}.py")
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as f:
                docs.append(f.read())
    if len(docs) < HELD_OUT_EVERY:
        raise FileNotFoundError(f"only {len(docs)} of the standard-library source files were found under {lib}")
    return split_held_out(docs)


# folders of the standard library left out of the larger corpus: tests, bundled wheels, demos, build files
SKIPPED_FOLDERS = ("test", "tests", "idle_test", "idlelib", "lib2to3", "ensurepip", "turtledemo", "site-packages",
                   "__pycache__")


def stdlib_source_documents() -> tuple[list[str], list[str]]:
    """``(train, eval)``: every ``.py`` file of the standard library outside :data:`SKIPPED_FOLDERS` and the
    ``config-*`` build folder, in sorted path order, with :func:`python_source_documents`' held-out modules (and any
    file with their text) taken out of training; ``eval`` is exactly that function's held-out split."""
    _, held = python_source_documents()
    lib = sysconfig.get_paths()["stdlib"]
    held_text, paths = set(held), []
    for folder, dirs, files in os.walk(lib):
        dirs[:] = sorted(d for d in dirs if d not in SKIPPED_FOLDERS and not d.startswith("config-"))
        paths += [os.path.join(folder, f) for f in files if f.endswith(".py")]
    train = []
    for path in sorted(paths):
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
        except (UnicodeDecodeError, OSError):
            continue  # (a few test-data files are not UTF-8)
        if text.strip() and text not in held_text:
            train.append(text)
    return train, held


def python_reference_documents() -> tuple[list[str], list[str]]:
    """``(train, eval)`` topics of the English language reference (``pydoc_data.topics``), sorted by
    topic name; every tenth topic is held out."""
    from pydoc_data.topics import topics

    return split_held_out([topics[k] for k in sorted(topics)])


def split_held_out(docs: list[str]) -> tuple[list[str], list[str]]:
    """Every tenth document held out; a training document identical to a held-out one (or to an earlier one)
    is dropped (pydoc's topics "else" and "if" share one text)."""
    held = [d for i, d in enumerate(docs) if not i % HELD_OUT_EVERY]
    seen = set(held)
    train = []
    for i, d in enumerate(docs):
        if i % HELD_OUT_EVERY and d not in seen:
            train.append(d)
            seen.add(d)
    return train, held
