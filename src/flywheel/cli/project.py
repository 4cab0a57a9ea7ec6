"""Adapter from MLproject parameters to the `flywheel` CLI.

MLflow passes every parameter as a string (floats as "3.0", empty strings for "unset"); this
normalises them and hands over to the real CLI, so the project's entry points and the CLI
can never drift apart. `--nproc-per-node N` (N > 1) re-executes the command under `torchrun`, and so
does every node of a multi-node job (`remote-train --num-nodes`: FLYWHEEL_NNODES and the rendezvous
variables of flywheel.component.distributed), whatever N is.

The root project delegates to the Fashion-MNIST reference component: `train` with no `arch` on
`fashion-mnist` (the defaults, so plain `mlflow run .`) runs examples/fashion-mnist/train.py with
the same parameters; any other dataset or a named `arch` trains a built-in architecture. `tune`
follows the same rule (`flywheel tune --component examples/fashion-mnist`, see delegate_tune).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from flywheel.component.distributed import num_nodes

INT_FLAGS = {"--epochs", "--batch-size", "--seed", "--max-train-samples", "--n-trials"}
BOOL_FLAGS = {"--register": ("--register", "--no-register"), "--finalize": ("--finalize", "--no-finalize")}


def translate(argv: list[str]) -> list[str]:
    out: list[str] = []
    it = iter(argv)
    for token in it:
        if token == "--":  # what follows goes to a tuned component as it is (flywheel tune --component)
            return [*out, token, *it]
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


def split_nproc(argv: list[str]) -> tuple[int, list[str]]:
    """(processes per node, the remaining arguments) from `--nproc-per-node N`."""
    if "--nproc-per-node" not in argv:
        return 1, argv
    i = argv.index("--nproc-per-node")
    value = argv[i + 1] if i + 1 < len(argv) else "1"
    return max(1, int(float(value or 1))), argv[:i] + argv[i + 2:]


REFERENCE_COMPONENT = "examples/fashion-mnist/train.py"  # relative to the project root (mlflow run's cwd)
NOT_FOR_REFERENCE = {"--dataset", "--arch", "--nproc-per-node"}  # the root project's own choices


def delegate_to_reference(raw: list[str]) -> list[str] | None:
    """The reference component's command line for a root `train` that asks for it, else None."""
    if not raw or raw[0] != "train":
        return None
    pairs = dict(zip(raw[1::2], raw[2::2], strict=False))
    if pairs.get("--dataset", "fashion-mnist") != "fashion-mnist" or pairs.get("--arch", "") not in ("", "''"):
        return None
    args = [a for k, v in pairs.items() if k not in NOT_FOR_REFERENCE and v not in ("", "''") for a in (k, v)]
    return [REFERENCE_COMPONENT, *args]


def delegate_tune(argv: list[str]) -> list[str]:
    """A root `tune` (translated arguments) on fashion-mnist with no `arch`: the reference
    component's trials (`--component examples/fashion-mnist`, its --data-dir after `--`), as `train`
    delegates to it. Anything else is returned unchanged (the built-in trainer)."""
    if not argv or argv[0] != "tune" or "--component" in argv:
        return argv
    values = dict(zip(argv[1:], argv[2:], strict=False))
    if values.get("--dataset", "fashion-mnist") != "fashion-mnist" or "--arch" in argv:
        return argv
    out, skip = ["tune", "--component", str(Path(REFERENCE_COMPONENT).parent)], False
    for i, token in enumerate(argv[1:], 1):
        if skip:
            skip = False
        elif token in ("--dataset", "--data-dir"):
            skip = True
        else:
            out.append(argv[i])
    return out + (["--", "--data-dir", values["--data-dir"]] if "--data-dir" in values else [])


def _exec_torchrun(nproc: int, command: list[str]) -> None:
    """Become `torchrun` running `command` in `nproc` processes here: `--standalone`, or this node's part
    of a multi-node job when remote-train --num-nodes set the rendezvous (flywheel.component.distributed)."""
    from flywheel.component.distributed import torchrun_args, torchrun_env

    torchrun = str(Path(sys.executable).with_name("torchrun"))
    os.execve(torchrun, [torchrun, *torchrun_args(nproc), *command], torchrun_env())


def main() -> None:
    os.environ.setdefault("FLYWHEEL_ENTRY_POINT", sys.argv[1] if len(sys.argv) > 1 else "")
    reference = delegate_to_reference(sys.argv[1:])
    if reference is not None:
        if not Path(reference[0]).is_file():
            sys.exit(f"flywheel: {reference[0]} not found under {Path.cwd()}: run the root project from the "
                     "repository (or pass -P arch=small-cnn for the built-in network)")
        nproc, _ = split_nproc(translate(sys.argv[1:]))
        if nproc > 1 or num_nodes() > 1:
            _exec_torchrun(nproc, reference)
        os.execv(sys.executable, [sys.executable, *reference])
    nproc, argv = split_nproc(delegate_tune(translate(sys.argv[1:])))
    if nproc > 1 or num_nodes() > 1:  # one process per GPU (gloo on CPU); rank 0 alone talks to MLflow
        _exec_torchrun(nproc, ["-m", "flywheel", *argv])
    from flywheel.cli import main as cli_main

    sys.argv = [sys.argv[0], *argv]
    cli_main()


if __name__ == "__main__":
    main()
