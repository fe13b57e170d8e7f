"""The document store of the builder: a JSONL corpus read by byte offset, so memory is constant in its size.

Corpus format, one document per line: `{"id": str, "title": str, "text": str}` (other keys are ignored;
`title` may be omitted). Opening the store scans the file once and writes an sqlite index of
(id, byte offset, length, line); a lookup is one indexed query, one seek and one read. Pass
`index_path` to keep the index and reuse it while the corpus file is unchanged (same size and mtime).
"""

from __future__ import annotations

import logging
import random
import sqlite3
import tempfile
from pathlib import Path
from types import TracebackType
from typing import Protocol

import msgspec

from datagen.dataset import DatasetError

logger = logging.getLogger(__name__)

_INDEX_VERSION = 1


class Doc(msgspec.Struct, frozen=True):
    id: str
    text: str
    title: str = ""


class DocLookup(Protocol):
    """What the builder needs from a corpus."""

    def get(self, doc_id: str) -> Doc | None: ...

    def random_id(self, rng: random.Random) -> str:
        """A uniformly drawn document id (for the optional random fill)."""
        ...

    def __len__(self) -> int: ...


class MemoryDocs:
    """An in-memory corpus (the synthetic worlds and tests)."""

    def __init__(self, docs: list[Doc]) -> None:
        self._docs = {d.id: d for d in docs}
        if len(self._docs) != len(docs):
            raise ValueError("duplicate document ids")
        self._ids = [d.id for d in docs]

    def get(self, doc_id: str) -> Doc | None:
        return self._docs.get(doc_id)

    def random_id(self, rng: random.Random) -> str:
        return self._ids[rng.randrange(len(self._ids))]

    def __len__(self) -> int:
        return len(self._ids)


class DocStore:
    """A JSONL corpus on disk with an sqlite offset index (see the module docstring)."""

    def __init__(self, path: str | Path, index_path: str | Path | None = None) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise DatasetError(self.path, 0, "no such file")
        if self.path.suffix == ".gz":
            raise DatasetError(self.path, 0, "the document store must be uncompressed JSONL (it is read by offset)")
        self._tmpdir: tempfile.TemporaryDirectory[str] | None = None
        if index_path is None:
            self._tmpdir = tempfile.TemporaryDirectory(prefix="longtrace-docs-")
            index_path = Path(self._tmpdir.name) / "index.sqlite"
        self.index_path = Path(index_path)
        self._dec = msgspec.json.Decoder(Doc)
        self._f = self.path.open("rb")
        self._db = sqlite3.connect(str(self.index_path), timeout=30.0)
        if not self._index_is_current():
            self._build_index()
        row = self._db.execute("SELECT COUNT(*) FROM docs").fetchone()
        self._count = int(row[0])

    def _signature(self) -> str:
        st = self.path.stat()
        return f"v{_INDEX_VERSION}:{self.path.resolve()}:{st.st_size}:{st.st_mtime_ns}"

    def _index_is_current(self) -> bool:
        tables = {r[0] for r in self._db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        if not {"docs", "meta"} <= tables:
            return False
        row = self._db.execute("SELECT value FROM meta WHERE key='signature'").fetchone()
        return row is not None and row[0] == self._signature()

    def _build_index(self) -> None:
        db = self._db
        db.execute("DROP TABLE IF EXISTS docs")
        db.execute("DROP TABLE IF EXISTS meta")
        db.execute("CREATE TABLE docs (id TEXT PRIMARY KEY, offset INTEGER, length INTEGER, line INTEGER)")
        db.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT)")
        header = msgspec.json.Decoder(Doc)
        offset = 0
        with self.path.open("rb") as f, db:
            for lineno, raw in enumerate(f, start=1):
                if raw.strip():
                    try:
                        doc = header.decode(raw)
                    except msgspec.DecodeError as e:
                        raise DatasetError(self.path, lineno, f"invalid document: {e}") from None
                    if not doc.id:
                        raise DatasetError(self.path, lineno, "id: empty")
                    try:
                        db.execute("INSERT INTO docs VALUES (?, ?, ?, ?)", (doc.id, offset, len(raw), lineno))
                    except sqlite3.IntegrityError:
                        (first,) = db.execute("SELECT line FROM docs WHERE id=?", (doc.id,)).fetchone()
                        raise DatasetError(
                            self.path, lineno, f"duplicate id {doc.id!r} (first on line {first})"
                        ) from None
                offset += len(raw)
            db.execute("INSERT INTO meta VALUES ('signature', ?)", (self._signature(),))
        logger.info("indexed %s into %s", self.path, self.index_path)

    def get(self, doc_id: str) -> Doc | None:
        row = self._db.execute("SELECT offset, length FROM docs WHERE id=?", (doc_id,)).fetchone()
        if row is None:
            return None
        self._f.seek(row[0])
        return self._dec.decode(self._f.read(row[1]))

    def random_id(self, rng: random.Random) -> str:
        # rowids are 1..count: the index is written once, without deletions.
        (doc_id,) = self._db.execute("SELECT id FROM docs WHERE rowid=?", (rng.randrange(self._count) + 1,)).fetchone()
        return str(doc_id)

    def __len__(self) -> int:
        return self._count

    def close(self) -> None:
        self._db.close()
        self._f.close()
        if self._tmpdir is not None:
            self._tmpdir.cleanup()

    def __enter__(self) -> DocStore:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
