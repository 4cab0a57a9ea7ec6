"""Real processes for the exactly-once capture tests: a capture writer and a restartable capture reader.

    python tests/capture_procs.py writer URI NAME --records N --seconds S [--clock-offset -30] [--put-delay 10]
    python tests/capture_procs.py reader URI STATE --horizon H [--once]

The writer is the real `CaptureWriter`; `--clock-offset` shifts the clock it names batches with (a
replica whose clock runs behind), `--put-delay` sleeps before each capture upload (a slow store: the
batch is named before the wait, as in production). It prints its counters as JSON when done.

The reader is the real `CaptureReader` driven the way the monitor drives it: poll, read, then one
atomic write of everything derived (here: the prediction ids read, in order) together with the
advanced cursor. Killed at any moment and started again, it must neither lose nor repeat a record.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

from flywheel.contracts.capture import CaptureCursor, CaptureReader, CaptureWriter

MODEL = "fashion-classifier"


def write(args) -> None:
    embeddings = np.load(args.embeddings) if args.embeddings else np.zeros((1, 16), np.float32)
    writer = CaptureWriter(args.uri, max_queue=100_000, flush_every=args.flush_every,
                           flush_seconds=args.flush_seconds, clock=lambda: time.time() + args.clock_offset)
    if args.put_delay:
        put = writer.store.put

        def slow_put(name: str, data: bytes) -> None:
            if "/captures/" in name:
                time.sleep(args.put_delay)
            put(name, data)

        writer.store.put = slow_put
    gap = args.seconds / args.records
    start = time.monotonic()
    for i in range(args.records):
        time.sleep(max(0.0, start + i * gap - time.monotonic()))
        emb = embeddings[i % len(embeddings)]
        writer.submit({"prediction_id": f"{args.name}-{i:05d}", "model": MODEL, "version": args.version,
                       "ts": time.time(), "embedding": emb, "label_index": i % 10, "label": str(i % 10),
                       "confidence": 0.5, "traffic": args.traffic})
    writer.close(timeout=120)
    print(json.dumps(writer.stats()), flush=True)


def read(args) -> None:
    reader = CaptureReader(args.uri, MODEL, horizon_s=args.horizon)
    state_path = Path(args.state)
    while True:
        state = json.loads(state_path.read_text()) if state_path.is_file() else {"cursor": None, "ids": []}
        cursor = CaptureCursor.from_json(state["cursor"])
        poll = reader.poll(cursor)
        ids = [cap.prediction_id for name in poll.names for cap in reader.read(name)]
        if poll.names:
            new = {"cursor": reader.advance(cursor, poll).to_json(), "ids": state["ids"] + ids}
            tmp = state_path.with_name(f".{state_path.name}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps(new))
            os.replace(tmp, state_path)  # what was read and how far: committed together
        if args.once:
            return
        time.sleep(args.interval)


def main() -> None:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="cmd", required=True)
    w = sub.add_parser("writer")
    w.add_argument("uri")
    w.add_argument("name")
    w.add_argument("--records", type=int, default=100)
    w.add_argument("--seconds", type=float, default=5.0)
    w.add_argument("--clock-offset", type=float, default=0.0)
    w.add_argument("--put-delay", type=float, default=0.0)
    w.add_argument("--flush-every", type=int, default=8)
    w.add_argument("--flush-seconds", type=float, default=0.2)
    w.add_argument("--embeddings", default=None)
    w.add_argument("--version", default="1")
    w.add_argument("--traffic", default="live")
    r = sub.add_parser("reader")
    r.add_argument("uri")
    r.add_argument("state")
    r.add_argument("--horizon", type=float, default=600.0)
    r.add_argument("--interval", type=float, default=0.2)
    r.add_argument("--once", action="store_true")
    args = parser.parse_args()
    (write if args.cmd == "writer" else read)(args)


if __name__ == "__main__":
    sys.exit(main())
