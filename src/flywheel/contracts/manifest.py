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

`ArchiveStamp` is what a release served, written back to the registry version as tags (a format the
serving node writes and `flywheel trace`, an auditor or any node reads): `flywheel.archive.sha256`
(the .mar file's sha256), `flywheel.archive.format` (onnx | torchscript | tensorrt) and
`flywheel.archive.artifact_sha256` (the served model file inside it, the manifest's), for the latest
release of that version, and the same three under `flywheel.archive.<env>.` for each environment it
was released to (one version may be packaged differently for dev and prod).
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
        return cls._parse(text)

    @classmethod
    def read_bytes(cls, data: bytes) -> Manifest:
        """From a .mar held in memory (read out of a container). Raises ValueError or zipfile.BadZipFile."""
        import io

        with zipfile.ZipFile(io.BytesIO(data)) as zf:
            try:
                text = zf.read(MANIFEST_FILE)
            except KeyError:
                raise ValueError(f"no {MANIFEST_FILE} in this archive") from None
        return cls._parse(text)

    @classmethod
    def _parse(cls, text: bytes) -> Manifest:
        """MANIFEST_FILE's bytes as a Manifest; ValueError when they are not one."""
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

ARCHIVE_TAG = "flywheel.archive"  # registry version tag prefix of an ArchiveStamp
_STAMP_KEYS = ("sha256", "format", "artifact_sha256")


@dataclass(frozen=True)
class ArchiveStamp:
    """The archive a release served: the .mar's sha256, its artifact format and the served file's sha256.

    Build with `of` (a .mar on disk) or `from_bytes` (a .mar read out of a container); write with
    `tags`, read back with `from_tags`, check a file against it with `verify`."""

    sha256: str  # of the .mar file as served
    format: str  # the manifest's artifact format: onnx | torchscript | tensorrt
    artifact_sha256: str  # the served model file inside the .mar (the manifest's artifact.sha256)

    @classmethod
    def of(cls, mar_path: str | os.PathLike, manifest: Manifest | None = None) -> ArchiveStamp:
        """The stamp of a .mar on disk (its manifest read from it unless given)."""
        manifest = manifest or Manifest.read(mar_path)
        return cls(sha256_file(mar_path), str(manifest.artifact["format"]), str(manifest.artifact["sha256"]))

    @classmethod
    def from_bytes(cls, data: bytes, manifest: Manifest | None = None) -> ArchiveStamp:
        """The stamp of a .mar held in memory; raises ValueError / zipfile.BadZipFile when it is not one."""
        manifest = manifest or Manifest.read_bytes(data)
        return cls(hashlib.sha256(data).hexdigest(), str(manifest.artifact["format"]),
                   str(manifest.artifact["sha256"]))

    def tags(self, env: str | None = None) -> dict[str, str]:
        """Registry tags: `flywheel.archive.<key>`, or `flywheel.archive.<env>.<key>` for one environment."""
        prefix = f"{ARCHIVE_TAG}.{env}." if env else f"{ARCHIVE_TAG}."
        return {prefix + key: str(getattr(self, key)) for key in _STAMP_KEYS}

    @classmethod
    def from_tags(cls, tags: dict, env: str | None = None) -> ArchiveStamp | None:
        """The stamp recorded in a version's tags (for `env`, or the latest release); None when the
        version was never released with one (released by an older flywheel, or never released).
        ValueError when the tags are there but malformed (not a sha256 hex digest)."""
        prefix = f"{ARCHIVE_TAG}.{env}." if env else f"{ARCHIVE_TAG}."
        values = {key: (tags or {}).get(prefix + key) for key in _STAMP_KEYS}
        if not any(values.values()):
            return None
        for key in ("sha256", "artifact_sha256"):
            value = values[key] or ""
            if len(value) != 64 or any(c not in "0123456789abcdef" for c in value):
                raise ValueError(f"registry tag {prefix}{key} is not a sha256 hex digest: {value!r}")
        if not values["format"]:
            raise ValueError(f"registry tag {prefix}format is missing")
        return cls(**values)

    def verify(self, mar_path: str | os.PathLike) -> None:
        """Check that `mar_path` is the archive this stamp names; raises ChecksumMismatch otherwise."""
        actual = sha256_file(mar_path)
        if actual != self.sha256:
            raise ChecksumMismatch(os.fspath(mar_path), self.sha256, actual)
