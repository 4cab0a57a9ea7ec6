"""Docker HEALTHCHECK: GET /ping with the inference token from TorchServe's key_file.json (stdlib only)."""

import json
import os
import sys
import urllib.request

KEY_FILE = os.environ.get("FLYWHEEL_TS_KEY_FILE", "/opt/flywheel/run/key_file.json")
URL = os.environ.get("TS_INFERENCE_ADDRESS", "http://127.0.0.1:8080").replace("0.0.0.0", "127.0.0.1")

try:
    with open(KEY_FILE) as f:
        key = json.load(f)["inference"]["key"]
    req = urllib.request.Request(URL.rstrip("/") + "/ping", headers={"Authorization": f"Bearer {key}"})
    with urllib.request.urlopen(req, timeout=5) as resp:
        sys.exit(0 if json.load(resp).get("status") == "Healthy" else 1)
except Exception as exc:  # noqa: BLE001 - any failure means unhealthy
    print(f"unhealthy: {exc}", file=sys.stderr)
    sys.exit(1)
