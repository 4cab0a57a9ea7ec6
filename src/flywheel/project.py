"""Adapter from MLproject parameters to the `flywheel` CLI.

MLflow passes every parameter as a string (floats as "3.0", empty strings for "unset"); this
normalises them and hands over to the real CLI, so the project's entry points and the CLI
can never drift apart.
"""

from __future__ import annotations

import os
import sys

INT_FLAGS = {"--epochs", "--batch-size", "--seed", "--max-train-samples"}
BOOL_FLAGS = {"--register": ("--register", "--no-register")}


def translate(argv: list[str]) -> list[str]:
    out: list[str] = []
    it = iter(argv)
    for token in it:
        if not token.startswith("--"):
            out.append(token)
            continue
        value = next(it, "")
        if value in ("", "''") or (token == "--max-train-samples" and float(value) == 0):
            continue  # unset optional parameter
        if token in BOOL_FLAGS:
            yes, no = BOOL_FLAGS[token]
            out.append(yes if value.lower() in ("1", "true", "yes") else no)
        elif token == "--extra-data":
            for path in value.split(","):
                out += ["--extra-data", path]
        elif token in INT_FLAGS:
            out += [token, str(int(float(value)))]
        else:
            out += [token, value]
    return out


def main() -> None:
    from flywheel.cli import main as cli_main

    os.environ.setdefault("FLYWHEEL_ENTRY_POINT", sys.argv[1] if len(sys.argv) > 1 else "")
    sys.argv = [sys.argv[0], *translate(sys.argv[1:])]
    cli_main()


if __name__ == "__main__":
    main()
