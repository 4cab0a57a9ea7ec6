"""Docker HEALTHCHECK: GET /ping with the inference token from TorchServe's key_file.json.

Reads the key file through flywheel.serving.keys (shipped beside this file, standard library only):
the entrypoint renews the keys, so the file is read on every check, a half-written file is re-read,
and a key rejected because it was renewed a moment ago is retried with the file's next key.
"""

import json
import os
import sys
import urllib.error
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # /opt/flywheel: the flywheel/ copy

from flywheel.serving.keys import fresh_key, read_keys  # noqa: E402 - after the path is set

KEY_FILE = Path(os.environ.get("FLYWHEEL_TS_KEY_FILE", "/opt/flywheel/run/key_file.json"))
URL = os.environ.get("TS_INFERENCE_ADDRESS", "http://127.0.0.1:8080").replace("0.0.0.0", "127.0.0.1")


def ping(key: str) -> tuple[int, dict]:
    req = urllib.request.Request(URL.rstrip("/") + "/ping", headers={"Authorization": f"Bearer {key}"})
    try:
        with urllib.request.urlopen(req, timeout=5) as resp:
            return resp.status, json.load(resp)
    except urllib.error.HTTPError as exc:
        return exc.code, {}


try:
    key = read_keys(KEY_FILE)["inference"]
    code, body = ping(key)
    if code in (400, 401):  # rejected: renewed since the read? Retry once with the file's next key.
        key = fresh_key(lambda: read_keys(KEY_FILE), "inference", key, wait_s=3.0)
        code, body = ping(key)
    if code in (400, 401):
        print(f"unhealthy: authentication failed (HTTP {code}): the inference key in {KEY_FILE} is "
              "wrong or expired; is the entrypoint's key renewer running?", file=sys.stderr)
        sys.exit(1)
    sys.exit(0 if code == 200 and body.get("status") == "Healthy" else 1)
except Exception as exc:  # noqa: BLE001 - any failure means unhealthy
    print(f"unhealthy: {exc}", file=sys.stderr)
    sys.exit(1)
