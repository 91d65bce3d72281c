"""Read and verify a bundle: the folder `export.bundle.build` writes (json, hashlib, numpy only).

A bundle is refused when its format is unknown, when a file listed in the manifest is missing, or when a file's
sha256 differs from the manifest's; the error names the file. Layout and manifest fields: docs/export.md.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np

FORMAT = "m3d-edge-bundle/1"
MANIFEST = "manifest.json"
_CHUNK = 1 << 20


class BundleError(ValueError):
    """A bundle that cannot be used as it is; the message names the file and what to do."""


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def read_manifest(root: str | Path) -> dict[str, Any]:
    root = Path(root)
    file = root / MANIFEST
    if not file.is_file():
        raise BundleError(f"{root}: not a bundle (no {MANIFEST}); build one with `m3d-edge export`")
    try:
        manifest = json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise BundleError(f"{file}: not valid JSON ({e}); the bundle is damaged, export it again") from e
    fmt = manifest.get("format")
    if fmt != FORMAT:
        raise BundleError(f"{file}: bundle format {fmt!r} is not known to this runtime (it reads {FORMAT!r}); "
                          f"export the bundle again with this version of m3d-edge")
    return manifest


def verify_files(root: str | Path, manifest: Mapping[str, Any]) -> None:
    """Every file listed under `files` exists and has its sha256. Raises BundleError naming the first bad file."""
    root = Path(root)
    files = manifest.get("files") or {}
    if not files:
        raise BundleError(f"{root / MANIFEST}: lists no files; the bundle is damaged, export it again")
    for name, entry in sorted(files.items()):
        path = root / name
        if Path(name).is_absolute() or ".." in Path(name).parts:
            raise BundleError(f"{root / MANIFEST}: file entry {name!r} points outside the bundle")
        if not path.is_file():
            raise BundleError(f"{path}: listed in the manifest but missing; copy the whole bundle folder again")
        digest = sha256_file(path)
        if digest != entry["sha256"]:
            raise BundleError(f"{path}: sha256 {digest[:16]}... does not match the manifest "
                              f"({entry['sha256'][:16]}...); the file is corrupted or was changed, copy it again")


@dataclass(frozen=True)
class Bundle:
    root: Path
    manifest: Mapping[str, Any]

    def component(self, name: str) -> Mapping[str, Any]:
        comps = self.manifest["components"]
        if name not in comps:
            raise BundleError(f"{self.root / MANIFEST}: no component {name!r} (has {', '.join(sorted(comps))})")
        return comps[name]

    def has(self, name: str) -> bool:
        return name in self.manifest["components"]

    def path(self, name: str) -> Path:
        """The file of component `name` (vision, seg_encoder, seg_decoder, decoder, embeddings, tokenizer)."""
        return self.root / self.component(name)["file"]

    @property
    def tokens(self) -> Mapping[str, Any]:
        return self.manifest["tokens"]

    @property
    def decoder(self) -> Mapping[str, Any]:
        return self.manifest["decoder"]

    def embeddings(self) -> "NpyRows":
        """The token embedding table [V, H] (float16 as stored), rows read from the file when looked up."""
        return NpyRows(self.path("embeddings"))


class NpyRows:
    """Rows of a 2-D .npy file, read on demand (pread): `rows[ids]` -> [len(ids), H] array; `.shape`, `.dtype`.

    Why not np.load(mmap_mode="r"): the kernel maps up to 64 KB of already-cached file around every faulting
    page ("fault-around"; MADV_RANDOM does not stop it on this 6.18 kernel), and the bundle's sha256 check has
    just cached the whole file, so each token looked up made ~64 KB resident: phantom-small's 57 MB table showed
    30 MB of RSS after four answers. A pread per row (1.2 KB here, one per decode step) keeps none resident."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        with open(self.path, "rb") as f:
            try:
                version = np.lib.format.read_magic(f)
                read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                               else np.lib.format.read_array_header_2_0)
                shape, fortran_order, dtype = read_header(f)
            except ValueError as e:
                raise BundleError(f"{self.path}: not a .npy array ({e}); export the bundle again") from e
            self._offset = f.tell()
        if len(shape) != 2 or fortran_order or dtype.hasobject:
            raise BundleError(f"{self.path}: expected a C-order 2-D numeric array, found shape {shape} "
                              f"{'Fortran order ' if fortran_order else ''}{dtype}; export the bundle again")
        self.shape, self.dtype = tuple(shape), dtype
        self._row_bytes = shape[1] * dtype.itemsize
        self._file = open(self.path, "rb", buffering=0)
        self._seek_lock = threading.Lock()  # only where os.preadv is missing (Windows): seek + read must pair up

    def __getitem__(self, ids) -> np.ndarray:
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        if ids.size and (ids.min() < 0 or ids.max() >= self.shape[0]):
            raise IndexError(f"token ids must be in [0, {self.shape[0]}), got {ids.min()}..{ids.max()}")
        out = np.empty((ids.size, self.shape[1]), self.dtype)
        if not out.size:
            return out
        view = memoryview(out.reshape(-1)).cast("B")
        n = self._row_bytes
        for i, row in enumerate(ids.tolist()):
            if self._read_into(view[i * n:(i + 1) * n], self._offset + row * n) != n:
                raise BundleError(f"{self.path}: row {row} could not be read in full (truncated file?)")
        return out

    def _read_into(self, buffer: memoryview, offset: int) -> int:
        if hasattr(os, "preadv"):  # positional: threads need no lock
            return os.preadv(self._file.fileno(), [buffer], offset)
        with self._seek_lock:
            self._file.seek(offset)
            return self._file.readinto(buffer)

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        """The whole table (for tests and tools; the runtime looks rows up)."""
        return self[np.arange(self.shape[0])].astype(dtype or self.dtype, copy=False)


def load(root: str | Path, *, verify: bool = True) -> Bundle:
    """Open a bundle; with `verify` (the default) check the format and every file's sha256 first."""
    root = Path(root)
    manifest = read_manifest(root)
    if verify:
        verify_files(root, manifest)
    return Bundle(root, manifest)

