"""The archive manifest: `flywheel_manifest.json` inside every .mar, as one frozen dataclass.

`flywheel package` writes it (`Manifest.write`); `flywheel release` (verify_archive), the TorchServe
handler and the CLI read it (`Manifest.read`) and check the served file against the sha256 it
records (`Manifest.verify`, the one place that digest is computed and compared). The handler runs
inside the archive with no flywheel installed, so this module is copied into every .mar beside it
and imports only the standard library.

The JSON layout is the archive format other nodes read: its keys are the field names below;
`artifact` is {file, format, sha256, requested}, `exports` a list of {format, file, sha256,
max_abs_diff, skipped, exporter}. Unknown keys are ignored when read, so an older reader still
loads a newer archive. `manifest["key"]` reads a field like the JSON did.
"""

from __future__ import annotations

import hashlib
import json
import os
import zipfile
from dataclasses import asdict, dataclass, field, fields
from typing import IO

MANIFEST_FILE = "flywheel_manifest.json"
_CHUNK = 1 << 20


def sha256_stream(stream: IO[bytes]) -> str:
    """Hex sha256 of a binary stream, read in 1 MiB chunks."""
    h = hashlib.sha256()
    for chunk in iter(lambda: stream.read(_CHUNK), b""):
        h.update(chunk)
    return h.hexdigest()


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file."""
    with open(path, "rb") as f:
        return sha256_stream(f)


class ChecksumMismatch(ValueError):
    """The archive's served file is not the one packaged (corrupted or tampered with)."""

    def __init__(self, file: str, expected: str, actual: str):
        super().__init__(f"{file} sha256 {actual} does not match the manifest's {expected}")
        self.file, self.expected, self.actual = file, expected, actual


@dataclass(frozen=True)
class Manifest:
    """What a .mar serves and where it came from. Build with `Manifest.from_dict` or `Manifest.read`."""

    model_name: str
    model_version: str
    run_id: str | None
    artifact: dict  # {file, format, sha256, requested}
    class_names: list = field(default_factory=list)
    preprocess: dict = field(default_factory=dict)  # contracts.preprocessing.PreprocessSpec.to_dict()
    embedding_dim: int | None = None
    architecture: str | None = None
    git_commit: str | None = None
    git_dirty: str | None = None
    dataset: str | None = None
    dataset_digest: str | None = None
    exports: list = field(default_factory=list)  # every export tried, with its parity result
    parity: dict = field(default_factory=dict)
    serving: dict = field(default_factory=dict)
    packaged_at: str | None = None
    export_seconds: float | None = None
    embedding: dict = field(default_factory=dict)  # contracts.component.EmbeddingSpec: {source, dim, layer}

    def __getitem__(self, key: str):
        """`manifest["run_id"]`: a field by its JSON key (KeyError when there is no such field)."""
        if key not in _FIELDS:
            raise KeyError(key)
        return getattr(self, key)

    def get(self, key: str, default=None):
        return getattr(self, key, default) if key in _FIELDS else default

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> Manifest:
        known = {k: v for k, v in data.items() if k in _FIELDS}
        if known.get("model_version") is not None:
            known["model_version"] = str(known["model_version"])
        return cls(**known)

    # -- files -------------------------------------------------------------------------------------
    @classmethod
    def read(cls, source: str | os.PathLike) -> Manifest:
        """From a .mar (a zip), a directory holding MANIFEST_FILE (an unpacked archive), or the file.
        Raises OSError, ValueError (not JSON, a missing field) or zipfile.BadZipFile."""
        path = os.fspath(source)
        if os.path.isdir(path):
            path = os.path.join(path, MANIFEST_FILE)
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as zf:
                text = zf.read(MANIFEST_FILE)
        else:
            with open(path, "rb") as f:
                text = f.read()
        data = json.loads(text)
        if not isinstance(data, dict):
            raise ValueError(f"{MANIFEST_FILE} is not a JSON object")
        try:
            return cls.from_dict(data)
        except TypeError as exc:  # a required field missing
            raise ValueError(f"{MANIFEST_FILE}: {exc}") from None

    def write(self, directory: str | os.PathLike) -> str:
        """Write MANIFEST_FILE into `directory` (the archive's staging folder); returns its path."""
        path = os.path.join(os.fspath(directory), MANIFEST_FILE)
        with open(path, "w") as f:
            json.dump(self.to_dict(), f, indent=2)
        return path

    def verify(self, source: str | os.PathLike) -> str:
        """Check the served file (artifact.file in `source`: a .mar or a directory) against the
        recorded sha256; returns the digest, raises ChecksumMismatch (or OSError/KeyError when the
        file is not there)."""
        path, name = os.fspath(source), self.artifact["file"]
        if os.path.isdir(path):
            actual = sha256_file(os.path.join(path, name))
        else:
            with zipfile.ZipFile(path) as zf, zf.open(name) as f:
                actual = sha256_stream(f)
        if actual != self.artifact.get("sha256"):
            raise ChecksumMismatch(name, str(self.artifact.get("sha256")), actual)
        return actual


_FIELDS = frozenset(f.name for f in fields(Manifest))
