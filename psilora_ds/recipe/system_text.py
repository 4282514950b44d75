"""A second real-text domain with no download: the GNU manuals that Debian-based systems ship in Info format
(``/usr/share/info``): English prose about command-line tools with examples in it, unlike both the Python source
the built-in base was pretrained on and the Python reference (``builtin:python-reference``).

``builtin:gnu-manuals``: the nodes (sections) of the manuals in :data:`MANUALS` found on the machine, one document per
node, in manual then node order; nodes shorter than :data:`MIN_NODE_CHARS` (menus, indices, the tag table) are
dropped. Held-out split: every tenth node (:func:`~psilora_ds.recipe.stdlib_text.split_held_out`, as for the Python reference). A machine without them is one
error line (Debian: ``apt-get install grep sed diffutils gzip bzip2`` with their documentation kept).
"""

from __future__ import annotations

import gzip
import os

from .stdlib_text import split_held_out

INFO_DIR = "/usr/share/info"
MANUALS = ("grep", "sed", "diffutils", "gzip", "bzip2", "bc", "ed", "time")
MIN_NODE_CHARS = 400
NODE_SEPARATOR = "\x1f"


def gnu_manual_documents(info_dir: str = INFO_DIR) -> tuple[list[str], list[str]]:
    """``(train, eval)`` nodes of the GNU manuals (every tenth held out); FileNotFoundError naming what is missing
    when fewer than half of :data:`MANUALS` are present."""
    nodes, found = [], []
    for name in MANUALS:
        path = os.path.join(info_dir, f"{name}.info.gz")
        if not os.path.isfile(path):
            continue
        found.append(name)
        with gzip.open(path, "rt", encoding="utf-8", errors="replace") as f:
            text = f.read()
        for node in text.split(NODE_SEPARATOR)[1:]:  # (the first part is the file's preamble)
            node = node.strip()
            if len(node) >= MIN_NODE_CHARS and not node.startswith(("Tag Table:", "Indirect:")):
                nodes.append(node)
    if len(found) < len(MANUALS) / 2:
        raise FileNotFoundError(f"builtin:gnu-manuals needs the GNU Info manuals under {info_dir} (found "
                                f"{len(found)} of {', '.join(MANUALS)}): install the packages with their documentation, "
                                "or choose another dataset")
    return split_held_out(nodes)
