"""Init container of every serving pod: put the released .mar into the pod's model store.

    python fetch_archive.py MODEL_STORE

Reads FLYWHEEL_MODEL, FLYWHEEL_ARCHIVE_VERSION, FLYWHEEL_ARCHIVE_URI and FLYWHEEL_ARCHIVE_SHA256
(set on the Deployment by `flywheel release --target kubernetes`) and writes MODEL-VERSION.mar into
MODEL_STORE only if its sha256 is the one the release recorded. The URI is where the release put the
archive: `mlflow-artifacts:/...` (MLflow's proxied artifact store, fetched from MLFLOW_TRACKING_URI
with MLFLOW_TRACKING_USERNAME/PASSWORD basic auth), an http(s) URL, or a file:// path (a volume).
Standard library only: it runs in the serving image, which has no flywheel or MLflow install.
Exits 2 with one line on stderr when anything is missing or wrong: the pod stays in Init and
`kubectl describe`/`logs -c fetch-archive` say why.
"""

import base64
import hashlib
import os
import shutil
import sys
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

CHUNK = 1 << 20


def fail(message: str) -> None:
    print(f"fetch-archive: {message}", file=sys.stderr)
    sys.exit(2)


def source_url(uri: str, tracking_uri: str) -> str:
    """The URL to GET (or file:// path) for an archive URI."""
    if uri.startswith("mlflow-artifacts:"):
        path = urllib.parse.urlparse(uri).path.lstrip("/")
        if not tracking_uri.startswith(("http://", "https://")):
            fail(f"{uri} needs MLFLOW_TRACKING_URI to be the tracking server's http(s) URL, not {tracking_uri!r}")
        return f"{tracking_uri.rstrip('/')}/api/2.0/mlflow-artifacts/artifacts/{urllib.parse.quote(path)}"
    if uri.startswith(("http://", "https://", "file://")):
        return uri
    fail(f"unsupported FLYWHEEL_ARCHIVE_URI {uri!r}: use mlflow-artifacts:/, http(s):// or file://")
    return ""  # unreachable


def fetch(url: str, dest, env) -> None:
    """Copy `url` into the open binary file `dest`."""
    if url.startswith("file://"):
        path = urllib.parse.urlparse(url).path
        try:
            with open(path, "rb") as src:
                shutil.copyfileobj(src, dest, CHUNK)
        except OSError as exc:
            fail(f"cannot read {path}: {exc}")
        return
    headers = {}
    user, password = env.get("MLFLOW_TRACKING_USERNAME"), env.get("MLFLOW_TRACKING_PASSWORD")
    if user and password:
        headers["Authorization"] = "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=60) as resp:
            shutil.copyfileobj(resp, dest, CHUNK)
    except urllib.error.HTTPError as exc:
        fail(f"GET {url} answered HTTP {exc.code} (401/403: check Secret tracking-reader)")
    except (urllib.error.URLError, OSError) as exc:
        fail(f"GET {url} failed: {exc}")


def main(argv: list[str], env) -> int:
    if len(argv) != 1:
        fail("usage: fetch_archive.py MODEL_STORE")
    store = Path(argv[0])
    model, version = env.get("FLYWHEEL_MODEL", ""), env.get("FLYWHEEL_ARCHIVE_VERSION", "")
    uri, sha256 = env.get("FLYWHEEL_ARCHIVE_URI", ""), env.get("FLYWHEEL_ARCHIVE_SHA256", "").lower()
    if not (model and version and uri and sha256):
        fail("no archive released to this Deployment yet (FLYWHEEL_MODEL, FLYWHEEL_ARCHIVE_VERSION, "
             "FLYWHEEL_ARCHIVE_URI, FLYWHEEL_ARCHIVE_SHA256): run `flywheel release --target kubernetes`")
    target = store / f"{model}-{version}.mar"
    partial = store / f".{target.name}.partial"
    url = source_url(uri, env.get("MLFLOW_TRACKING_URI", ""))
    with open(partial, "wb") as dest:
        fetch(url, dest, env)
    digest = hashlib.sha256()
    with open(partial, "rb") as f:
        for block in iter(lambda: f.read(CHUNK), b""):
            digest.update(block)
    if digest.hexdigest() != sha256:
        partial.unlink()
        fail(f"{uri} has sha256 {digest.hexdigest()}, the release recorded {sha256}: not serving it")
    partial.replace(target)
    print(f"fetch-archive: {target} ({target.stat().st_size} bytes, sha256 {sha256[:12]}) from {uri}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:], os.environ))
