"""A second, never-tuned-on evaluation corpus: the long descriptions of the installed Python packages.

Technical English with Markdown and code (a different domain from Wikipedia summaries). Each package's
METADATA body (after the headers), over 800 characters, is one document, in sorted file order;
workbench's `.txt` loader then evaluates on the last 10% of the documents.

    .venv/bin/python bench/metadata_corpus.py /tmp/second.txt [bench/results/second_corpus_packages.txt]

The optional list names the `*.dist-info` folders to use (the ones behind BENCHMARKS.md's figures),
since the set of installed packages changes.
"""

from __future__ import annotations

import re
import sys
import sysconfig
from pathlib import Path


def main(out: str, only: str | None = None) -> None:
    site = Path(sysconfig.get_paths()["purelib"])
    wanted = set(Path(only).read_text().split()) if only else None
    docs = []
    for meta in sorted(site.glob("*.dist-info/METADATA")):
        if wanted is not None and meta.parent.name not in wanted:
            continue
        body = meta.read_text(encoding="utf-8", errors="ignore").partition("\n\n")[2].strip()
        body = re.sub(r"\n{3,}", "\n\n", body)
        if len(body) > 800:
            docs.append(body.replace("\n\n", "\n"))  # blank lines separate documents in a .txt corpus
    Path(out).write_text("\n\n".join(docs))
    print(f"{len(docs)} documents, {sum(map(len, docs)):,} characters -> {out}")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else None)
