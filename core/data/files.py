"""Reading a user's files, as every modality does: entries and bad samples, manifests (CSV / JSONL), class
folders, content hashes and hash splits, paths kept inside the dataset root; and the one atomic write."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import stat
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO


from tessera.core.errors import UserError


class BadSample(Exception):
    """One sample cannot be used; the message is the reason recorded in the quarantine report."""


@dataclass
class Entry:
    """One sample as a dataset lists it, before it is opened.

    source: the sample as listed (a file path, or "file:line"); reports name it by `relative_source`; path: the file
    holding the sample, if any;
    payload: what the listing itself carries (a sentence, COCO boxes); error: why the listing is unusable;
    split: the split a manifest's `split` column names, if any (else the hash of the content chooses).
    """

    source: str
    label: str | None
    path: Path | None = None
    payload: Any = None
    error: str | None = None
    split: str | None = None


SPLITS = ("train", "val", "test")
UNLABELLED = "unlabelled"  # the split of an unlabelled source's samples (prepare.sources.<m>.unlabelled): pretraining's
ESCAPES = "path escapes the dataset root (its source's folder), by ../, an absolute path or a link"


def relative_source(source: str, root: Path | str) -> str:
    """A sample's source ("path" or "path:line", as an Entry lists it) relative to `root` (prepare.root, which holds
    every source): the one way quarantine.jsonl, prepare's messages and the shards name a sample, whatever the
    format, so that a name reads the same in every clone and on every machine. The path is matched as written (made
    absolute), then with links resolved (a manifest's files are listed resolved); one outside root stays as it is."""
    for base in (os.path.abspath(root), os.path.realpath(root)):
        prefix = base.rstrip(os.sep) + os.sep
        for path in (os.path.abspath(source), os.path.realpath(source)):
            if path.startswith(prefix):
                return path[len(prefix):]
    return source


def split_column(row: dict) -> str | None:
    """A manifest row's `split` (train / val / test, as many public datasets ship them), or None without one."""
    value = str(row.get("split") or "").strip().lower()
    if value and value not in SPLITS:
        raise BadSample(f"split {value!r} is not one of {list(SPLITS)}")
    return value or None


def sorted_labels(labels) -> list[str]:
    """Class names in a stable order: numerically where every name is a number ("2" before "10")."""
    labels = set(labels)
    numeric = all(s.lstrip("-").isdigit() for s in labels)
    return sorted(labels, key=int) if numeric else sorted(labels)


def list_class_folders(root: Path) -> tuple[list[str], Iterator[Entry]]:
    """root/<class>/<file> (ImageFolder layout, for images and audio alike): the class names, and every file
    below a class folder as an entry. Dotfiles are skipped. As in manifests and COCO files, nothing outside the
    root is read: a file that links out of it is quarantined, and a class folder that does is no class (its files
    are quarantined)."""
    if not root.is_dir():
        raise UserError(f"{root}: no such folder; a folder source holds one sub-folder per class")
    folders = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    inside = [d for d in folders if d.resolve().is_relative_to(root.resolve())]
    classes = sorted_labels(d.name for d in inside)
    if not classes:
        raise UserError(f"{root}: no class folders; put each class's files in {root}/<class>/")

    real_root = root.resolve()
    real_dirs: dict[Path, Path] = {}  # each folder resolved once: a file that is no link lies where its folder does

    def entries() -> Iterator[Entry]:
        for d in [root / c for c in classes] + [d for d in folders if d not in inside]:
            for f in sorted(d.rglob("*")):
                if f.name.startswith(".") or (f.is_dir() and not f.is_symlink()):
                    continue
                if f.is_dir():  # rglob does not enter a linked folder: say so, rather than leave its files out
                    yield Entry(str(f), None, error="a link to a folder, whose files are not read; copy or link the files themselves")
                    continue
                if f.parent not in real_dirs:
                    real_dirs[f.parent] = f.parent.resolve()
                real = f.resolve() if f.is_symlink() else real_dirs[f.parent] / f.name
                if real.is_relative_to(real_root):
                    yield Entry(str(f), d.name, real)
                else:
                    yield Entry(str(f), None, error=ESCAPES)

    return classes, entries()


def source_file(path: str, key: str) -> Path:
    """The source file `path` that params.yaml's prepare.sources.`key` names, if it is a regular file; else a
    UserError naming it. is_file() reads metadata only: a FIFO is refused here, never opened."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"{p}: {'not a regular file' if p.exists() else 'no such file'} (prepare.sources.{key})")
    return p


def refuse_label(row: dict, column: str, source: str, modality: str) -> None:
    """A row of an unlabelled source that has the label column: a UserError for the whole file, not a quarantined
    row. A label there means the file was meant for `train` (or the column was left in by mistake), and either way
    the user decides; pretraining would drop it silently."""
    if column in row:
        raise UserError(f"{source}: column {column!r} holds labels, but prepare.sources.{modality}.unlabelled is a "
                        "source without labels; drop the column, or declare the file as "
                        f"prepare.sources.{modality}.train")


def list_flat_folder(root: Path, modality: str) -> Iterator[Entry]:
    """root/<file>: the unlabelled form of a folder of classes (images or clips, no labels), every file directly in
    it an entry without a label. A sub-folder is refused: it is a class folder, i.e. a label. As in
    `list_class_folders`, a file that links out of the root is quarantined."""
    if not root.is_dir():
        raise UserError(f"{root}: no such folder (prepare.sources.{modality}.unlabelled); an unlabelled folder holds "
                        "the files themselves")
    folders = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if folders:
        shown = ", ".join(f"{d}/" for d in folders[:3]) + (", ..." if len(folders) > 3 else "")
        raise UserError(f"{root}: holds sub-folders ({shown}), which are class folders, i.e. labels, but "
                        f"prepare.sources.{modality}.unlabelled is a folder without labels; move the files up into "
                        f"{root}, or declare the folder as prepare.sources.{modality}.train")
    real_root = root.resolve()
    files = sorted(f for f in root.iterdir() if not f.name.startswith("."))  # now: the checks above hold for these

    def entries() -> Iterator[Entry]:
        for f in files:
            real = f.resolve()
            yield Entry(str(f), None, real) if real.is_relative_to(real_root) else Entry(str(f), None, error=ESCAPES)

    return entries()


def open_binary(source: Path | bytes) -> BinaryIO:
    """A user's input opened for reading: its bytes in memory (an upload), or its file. A path that is missing or no
    regular file is BadSample: a FIFO or a device would block or never end, and is refused from its metadata."""
    if isinstance(source, bytes):
        return io.BytesIO(source)
    if not source.is_file():
        raise BadSample("missing file" if not source.exists() else "not a regular file")
    try:
        return open(source, "rb")
    except OSError as e:  # its message would name the file by its absolute path: the report names it already
        raise BadSample(f"cannot open the file ({e.strerror})") from None


def read_rows(source: Path | bytes, name: str | None = None) -> Iterator[tuple[int, dict | None, str | None]]:
    """A CSV (with a header) or JSONL table, a file or its bytes -> (line number, row or None, error or None) per
    record. `name` (default: the path) gives the format by its suffix and names the table in messages.

    Bytes that are not UTF-8 are kept as surrogates so that one bad row, not the file, is rejected; a leading
    byte-order mark (Excel's "CSV UTF-8") is dropped. A CSV row with more fields than the header is an error row.
    """
    name = name or str(source)
    if isinstance(source, Path) and not source.is_file():
        raise UserError(f"{name}: {'not a regular file' if source.exists() else 'no such file'}")
    suffix = Path(name).suffix.lower()
    if suffix not in (".jsonl", ".csv", ".tsv"):
        raise UserError(f"{name}: a manifest must end in .csv, .tsv or .jsonl")
    raw = io.BytesIO(source) if isinstance(source, bytes) else open(source, "rb")
    with io.TextIOWrapper(raw, encoding="utf-8-sig", errors="surrogateescape", newline="") as f:
        if suffix == ".jsonl":
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    yield n, None, f"not valid JSON ({e.msg})"
                    continue
                yield (n, row, None) if isinstance(row, dict) else (n, None, "not a JSON object")
        else:
            reader = csv.DictReader(f, delimiter="\t" if suffix == ".tsv" else ",")
            header = reader.fieldnames or []
            if len(set(header)) < len(header):
                twice = sorted({h for h in header if header.count(h) > 1})
                raise UserError(f"{name}: the header names {twice} more than once; give each column its own name")
            for row in reader:
                if None in row:  # DictReader keeps the surplus under None
                    yield reader.line_num, None, f"{len(header) + len(row[None])} fields, the header has {len(header)}"
                else:
                    yield reader.line_num, row, None


def field(row: dict, name: str) -> str:
    value = row.get(name)
    if value is None:
        raise BadSample(f"missing field {name!r}")
    if str(value).strip() == "":
        raise BadSample(f"empty {name}")
    value = str(value).strip()
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise BadSample(f"field {name!r} is not valid UTF-8") from None
    return value


def file_hash(path: Path) -> str:
    """sha256 of a file's bytes (hex). Raises BadSample when the file is missing or not a regular file (a FIFO
    or a device would block or never end: it is refused from its metadata, never opened)."""
    h = hashlib.sha256()
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            raise BadSample("is a directory, not a file" if path.is_dir() else "not a regular file (a FIFO, device or socket)")
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    except FileNotFoundError:
        raise BadSample("missing file") from None
    except IsADirectoryError:
        raise BadSample("is a directory, not a file") from None
    except OSError as e:  # unreadable (its mode): the message would name the file by its absolute path
        raise BadSample(f"cannot open the file ({e.strerror})") from None
    return h.hexdigest()


def text_hash(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def hash_fraction(digest: str) -> float:
    """A content hash mapped to [0, 1): assigning splits by it keeps every sample's split when files are added."""
    return int(digest[:12], 16) / 16**12


def hash_split(declared: str, digest: str, val_fraction: float, test_fraction: float, has_test: bool) -> str:
    """The split of a sample listed in the `declared` source (train / test), by its content hash: a test source's
    samples are test; of train's, a val_fraction share is val, and where no test source exists a test_fraction
    share is test."""
    if declared == "test":
        return "test"
    u = hash_fraction(digest)
    if u < val_fraction:
        return "val"
    if not has_test and u < val_fraction + test_fraction:
        return "test"
    return "train"


def resolve_inside(root: Path, relative: str) -> Path:
    """root / relative, refusing a path that escapes root (../, absolute paths, links pointing out)."""
    path = (root / relative).resolve()
    if not path.is_relative_to(root.resolve()):
        raise BadSample(ESCAPES)
    return path


def atomic_write(path: Path, write: Callable[[Path], object]) -> None:
    """`write(tmp)` into a temporary file beside `path`, fsync, rename over `path`: a reader sees the old file or the
    new one, never half of one. The temporary name keeps the suffix (torch.export's loader checks it). Every
    writer of a result file goes through here."""
    path = Path(path)
    tmp = path.with_name(f"{path.stem}.tmp{path.suffix}")
    write(tmp)
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    atomic_write(path, lambda tmp: tmp.write_bytes(data))


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def expand(paths: list[Path], suffixes: frozenset[str]) -> list[Path]:
    """Files as given, and the files below each folder whose suffix is one of `suffixes`, sorted."""
    files = []
    for p in paths:
        if p.is_dir():
            files += sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in suffixes)
        else:
            files.append(p)
    return files
