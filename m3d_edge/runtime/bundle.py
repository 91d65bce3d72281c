"""Read and verify a bundle: the folder `export.bundle.build` writes (json, hashlib, numpy only).

A bundle is refused when its format is unknown, when a file listed in the manifest is missing, or when a file's
sha256 differs from the manifest's; the error names the file. Layout and manifest fields: docs/export.md.
"""

from __future__ import annotations

import hashlib
import json
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

    def embeddings(self) -> np.ndarray:
        """The token embedding table [V, H], memory-mapped (float16 as stored)."""
        return np.load(self.path("embeddings"), mmap_mode="r")


def load(root: str | Path, *, verify: bool = True) -> Bundle:
    """Open a bundle; with `verify` (the default) check the format and every file's sha256 first."""
    root = Path(root)
    manifest = read_manifest(root)
    if verify:
        verify_files(root, manifest)
    return Bundle(root, manifest)

