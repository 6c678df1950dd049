"""Optional prose sources from Debian packages, where ``apt-get download`` works (no root, no install).

- ``austen``: six Jane Austen novels (public domain) from ``r-cran-janeaustenr`` (MIT). The text is
  an R lazy-load database (``data/Rdata.rdb`` + ``.rdx``); we decode R's XDR serialization here,
  without R.
- ``bible``: the World English Bible (public domain) from ``sword-text-web``: SWORD zText blocks
  (zlib), read in canonical verse order, OSIS markup stripped.

Each package is downloaded with ``apt-get download`` and unpacked with ``dpkg -x`` into a temporary
folder; only the decoded text is kept in ``$LONGREACH_CACHE/corpus/<name>``.
"""

from __future__ import annotations

import gzip
import html
import re
import shutil
import struct
import subprocess
import tempfile
import zlib
from pathlib import Path

from ..paths import cache_dir
from .prose import CorpusError, normalise, write_atomic

PACKAGES = {"austen": "r-cran-janeaustenr", "bible": "sword-text-web"}
AUSTEN_BOOKS = ("sensesensibility", "prideprejudice", "mansfieldpark", "emma", "northangerabbey", "persuasion")


def load_debian(name: str) -> dict[str, str]:
    if name not in PACKAGES:
        raise CorpusError(f"unknown corpus '{name}': use canterbury, {', '.join(PACKAGES)} or synthetic")
    folder = cache_dir() / "corpus" / name
    if not (folder / ".complete").exists():
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory() as tmp:
            root = _download(PACKAGES[name], Path(tmp))
            docs = _austen(root) if name == "austen" else _bible(root)
            for doc, text in docs.items():
                write_atomic(folder / f"{doc}.txt", text)
        (folder / ".complete").write_text(PACKAGES[name])
    return {p.stem: p.read_text() for p in sorted(folder.glob("*.txt"))}


def _download(package: str, tmp: Path) -> Path:
    if not shutil.which("apt-get") or not shutil.which("dpkg"):
        raise CorpusError(f"the '{package}' corpus needs Debian's apt-get and dpkg; use --corpus canterbury")
    done = subprocess.run(["apt-get", "download", package], cwd=tmp, capture_output=True, text=True)
    debs = list(tmp.glob("*.deb"))
    if done.returncode != 0 or not debs:
        last = (done.stderr.strip().splitlines() or ["apt-get failed"])[-1]
        raise CorpusError(f"apt-get download {package} failed ({last}); use --corpus canterbury")
    subprocess.run(["dpkg", "-x", str(debs[0]), str(tmp / "x")], check=True, capture_output=True)
    return tmp / "x"


# ---- Jane Austen: R lazy-load database ----

def _austen(root: Path) -> dict[str, str]:
    found = list(root.rglob("janeaustenr/data/Rdata.rdx"))
    if not found:
        raise CorpusError("r-cran-janeaustenr has no data/Rdata.rdx; the package layout changed")
    index = RReader(gzip.decompress(found[0].read_bytes())).read()
    blob = found[0].with_suffix(".rdb").read_bytes()
    variables = index["variables"]  # name -> [offset, length] in the .rdb
    out = {}
    for name in AUSTEN_BOOKS:
        if name not in variables:
            continue
        offset, length = variables[name]
        raw = blob[offset:offset + length]
        lines = RReader(zlib.decompress(raw[4:])).read()  # 4-byte big-endian length, then zlib
        out[name] = normalise("\n".join(line or "" for line in lines))
    if len(out) != len(AUSTEN_BOOKS):
        raise CorpusError(f"janeaustenr holds {sorted(out)}, expected {list(AUSTEN_BOOKS)}")
    return out


class RReader:
    """Just enough of R's XDR serialization (format 2/3) for vectors, lists and their names."""

    def __init__(self, data: bytes):
        if data[:2] not in (b"X\n",):
            raise CorpusError("not an R XDR serialization")
        self.data, self.pos, self.refs = data, 2, []
        version = self.int()
        self.int(), self.int()  # writer and minimal reader R versions
        if version == 3:
            n = self.int()
            self.pos += n  # skip the native encoding name

    def int(self) -> int:
        (value,) = struct.unpack_from(">i", self.data, self.pos)
        self.pos += 4
        return value

    def read(self):
        flags = self.int()
        kind, has_attr, has_tag = flags & 0xFF, flags & (1 << 9), flags & (1 << 10)
        if kind in (254, 242, 241, 253, 252, 251, 247):  # NULL and special environments/values
            return None
        if kind == 255:  # reference to an earlier symbol
            index = flags >> 8 or self.int()
            return self.refs[index - 1]
        if kind == 1:  # symbol
            name = self.read()
            self.refs.append(name)
            return name
        if kind == 2:  # pairlist: attributes, tag, car, cdr
            items = {}
            while kind == 2:
                if has_attr:
                    self.read()
                tag = self.read() if has_tag else None
                items[tag] = self.read()
                flags = self.int()
                kind, has_attr, has_tag = flags & 0xFF, flags & (1 << 9), flags & (1 << 10)
            return items
        if kind == 9:  # CHARSXP
            n = self.int()
            if n == -1:
                return None
            text = self.data[self.pos:self.pos + n].decode("utf-8", errors="replace")
            self.pos += n
            return text
        n = self.int()
        if kind in (10, 13):  # logical, integer
            value = list(struct.unpack_from(f">{n}i", self.data, self.pos))
            self.pos += 4 * n
        elif kind == 14:  # double
            value = list(struct.unpack_from(f">{n}d", self.data, self.pos))
            self.pos += 8 * n
        elif kind in (16, 19, 20):  # character vector, list, expression
            value = [self.read() for _ in range(n)]
        else:
            raise CorpusError(f"unsupported R object type {kind}")
        if has_attr:
            attrs = self.read()
            if kind == 19 and attrs and "names" in attrs:
                return dict(zip(attrs["names"], value, strict=True)) | {"names": attrs["names"]}
        return value


# ---- World English Bible: SWORD zText ----

def _bible(root: Path) -> dict[str, str]:
    out = {}
    for part, title in (("ot", "old-testament"), ("nt", "new-testament")):
        found = list(root.rglob(f"modules/texts/ztext/*/{part}.bzz"))
        if not found:
            raise CorpusError(f"sword-text-web has no {part}.bzz; the package layout changed")
        base = found[0].with_suffix("")
        blocks_index = base.with_suffix(".bzs").read_bytes()
        compressed = base.with_suffix(".bzz").read_bytes()
        blocks = []
        for i in range(0, len(blocks_index), 12):
            offset, size, _ = struct.unpack_from("<III", blocks_index, i)
            blocks.append(zlib.decompress(compressed[offset:offset + size]) if size else b"")
        verses_index = base.with_suffix(".bzv").read_bytes()
        verses = []
        for i in range(0, len(verses_index) - 9, 10):
            block, offset, size = struct.unpack_from("<IIH", verses_index, i)
            if size and block < len(blocks):
                verses.append(_plain(blocks[block][offset:offset + size].decode("utf-8", errors="replace")))
        out[title] = normalise("\n".join(v for v in verses if v))
    return out


def _plain(osis: str) -> str:
    """Verse text without OSIS markup (footnotes dropped, paragraph marks kept as line breaks)."""
    text = re.sub(r"<note\b.*?</note>", " ", osis, flags=re.S)  # a note often stands in for a space
    text = re.sub(r"<(?:p|lb|div)\b[^>]*/?>", "\n", text)
    text = re.sub(r"<[^>]+>", "", text)
    return re.sub(r" ([,.;:!?])", r"\1", " ".join(html.unescape(text).split()))
