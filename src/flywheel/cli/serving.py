"""Serving node's verbs: package (.mar), release (register, accept, switch, retire; exit 3 when it
fails and rolls back), predict (batch inference), serve (a local TorchServe), serve-pool (replicas
behind HAProxy), serve-keys renew."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from flywheel.cli._common import (
    DataDirOpt,
    ModelOpt,
    TrackingOpt,
    emit_json,
    fail,
    settings_for,
    stop_on_sigterm,
)

PANEL = "Serving node"
app = typer.Typer()

InferenceUrlOpt = Annotated[str, typer.Option(
    "--endpoint", "--inference-url", envvar="FLYWHEEL_TS_INFERENCE_URL", help="TorchServe inference API URL.")]
KeyFileOpt = Annotated[Optional[Path], typer.Option(
    "--key-file", envvar="FLYWHEEL_TS_KEY_FILE", help="TorchServe's key_file.json (tokens).")]


@app.command(rich_help_panel=PANEL)
def package(
    model: ModelOpt = None,
    version: Annotated[Optional[str], typer.Option(help="Registry version to package.")] = None,
    alias: Annotated[Optional[str], typer.Option(help="...or the version holding this alias.")] = None,
    out: Annotated[Optional[Path], typer.Option(help="Model store to write NAME-VERSION.mar into "
                                                     "(default $FLYWHEEL_HOME/model-store).")] = None,
    artifact_format: Annotated[str, typer.Option("--format", help="auto | onnx | torchscript | tensorrt.")] = "auto",
    batch_size: Annotated[int, typer.Option(min=1, help="TorchServe batch size.")] = 16,
    max_batch_delay: Annotated[int, typer.Option(min=0, help="TorchServe max batch delay (ms).")] = 1,
    workers: Annotated[int, typer.Option(min=1, help="Workers per model.")] = 1,
    engine: Annotated[str, typer.Option(help="torchserve (a .mar) | triton (version folders in a Triton model "
                                             "repository, --out; default $FLYWHEEL_HOME/triton-repository).")
                      ] = "torchserve",
    data_dir: DataDirOpt = None,
    tracking_uri: TrackingOpt = None,
) -> None:
    """Export a registry version (TorchScript, ONNX, TensorRT if possible), check parity, build the .mar."""
    from flywheel.serving.package import PackageConfig, package_triton, package_version

    if engine not in ("torchserve", "triton"):
        fail(f"unknown --engine {engine!r}; choose torchserve or triton")
    settings = settings_for(tracking_uri, model, data_dir)
    cfg = PackageConfig(settings.model_name, version=version, alias=alias, out_dir=out,
                        artifact_format=artifact_format, batch_size=batch_size,
                        max_batch_delay_ms=max_batch_delay, workers=workers)
    if engine == "triton":
        packaged = package_triton(cfg, settings, out)
        for name, folder in packaged.models.items():
            typer.echo(f"  {name:28s} {folder}")
        typer.echo(f"{packaged.repository}  ({cfg.model_name} v{packaged.version}, Triton repository)")
        return
    result = package_version(cfg, settings)
    m = result.manifest
    for e in m.exports:
        typer.echo(f"  {e['format']:12s} " + (f"skipped: {e['skipped']}" if e["skipped"]
                                              else f"max abs diff {e['max_abs_diff']:.2e}"))
    typer.echo(f"{result.mar_path}  ({m.model_name} v{m.model_version}, serving {m.artifact['format']}, "
               f"sha256 {m.artifact['sha256'][:12]})")


@app.command(rich_help_panel=PANEL)
def release(
    version: Annotated[str, typer.Option(help="Registry version to release.")],
    env: Annotated[str, typer.Option(help="dev | prod: the registry alias moved on success.")],
    model: ModelOpt = None,
    inference_url: InferenceUrlOpt = "http://127.0.0.1:8080",
    management_url: Annotated[str, typer.Option(envvar="FLYWHEEL_TS_MANAGEMENT_URL",
                                                help="TorchServe management API URL.")] = "http://127.0.0.1:8081",
    key_file: KeyFileOpt = None,
    model_store: Annotated[Optional[Path], typer.Option(
        envvar="FLYWHEEL_TS_MODEL_STORE", help="The server's model store directory.")] = None,
    mar: Annotated[Optional[Path], typer.Option(
        help="The version's archive from `flywheel package` (verified: version, run, sha256, parity). "
             "Default: NAME-VERSION.mar in the model store or $FLYWHEEL_HOME/model-store if there and "
             "valid, else packaged now.")] = None,
    workers: Annotated[int, typer.Option(min=1, help="Workers for the new version.")] = 1,
    grace: Annotated[float, typer.Option(min=0, help="Seconds before retired versions are unregistered.")] = 10.0,
    keep_previous: Annotated[int, typer.Option(min=0, help="Earlier versions kept reachable for A/B.")] = 1,
    min_accuracy: Annotated[float, typer.Option(help="Acceptance: accuracy on a labelled sample.")] = 0.8,
    p95_slo_ms: Annotated[float, typer.Option(help="Acceptance: p95 latency of single requests (ms).")] = 100.0,
    target: Annotated[str, typer.Option(help="torchserve (management API) | docker (image MODEL:VERSION) | pool "
                                             "(replicas behind HAProxy, --pool) | kubernetes (deploy/kubernetes's "
                                             "pool; pool token in FLYWHEEL_POOL_TOKEN).")] = "torchserve",
    pool: Annotated[Optional[Path], typer.Option(
        envvar="FLYWHEEL_POOL", help="Pool target: pool.json, as `flywheel serve-pool` writes it.")] = None,
    engine: Annotated[str, typer.Option(
        help="torchserve | triton: --endpoint is the Triton proxy, --key-file its key_file.json, --model-store "
             "its model repository.")] = "torchserve",
    docker_host: Annotated[Optional[str], typer.Option(
        envvar="DOCKER_HOST", help="Docker target: unix:///var/run/docker.sock or ssh://user@host.")] = None,
    image_tar: Annotated[Optional[Path], typer.Option(help="Docker target: `docker save` tarball to load.")] = None,
    namespace: Annotated[Optional[str], typer.Option(
        envvar="FLYWHEEL_K8S_NAMESPACE", help="Kubernetes target: the namespace of deploy/kubernetes's pool.")] = None,
    kube_context: Annotated[Optional[str], typer.Option(
        envvar="FLYWHEEL_K8S_CONTEXT", help="Kubernetes target: kubeconfig context (default: current).")] = None,
    canary_url: Annotated[Optional[str], typer.Option(
        envvar="FLYWHEEL_K8S_CANARY_URL", help="Kubernetes target: where this machine reaches Service "
                                               "serving-canary (e.g. a kubectl port-forward).")] = None,
    canary_steps: Annotated[str, typer.Option(
        help="Pool and Kubernetes targets: the canary's traffic shares in % (e.g. 10,50,100); pool: 'none' "
             "for a rolling release.")] = "10,50,100",
    step_pause: Annotated[float, typer.Option(min=0, help="Kubernetes target: seconds observed per step.")] = 60.0,
    data_dir: DataDirOpt = None,
    tracking_uri: TrackingOpt = None,
) -> None:
    """Release a registry version to a TorchServe: register, accept, switch, retire; roll back on failure."""
    from flywheel.core.config import Settings
    from flywheel.serving.release import (
        AcceptanceConfig,
        DockerTarget,
        ManagementTarget,
        docker_release,
        release_version,
        retire_previous,
    )

    # Not applied: release reads the registry through Registry(settings) (packaging applies it itself).
    settings = Settings.from_env(tracking_uri=tracking_uri, model_name=model, data_dir=data_dir)
    accept = AcceptanceConfig(min_accuracy=min_accuracy, p95_slo_ms=p95_slo_ms)
    if engine == "triton":
        from flywheel.serving.release import TritonTarget, triton_release

        if key_file is None or model_store is None:
            fail("release --engine triton needs --key-file (the proxy's key_file.json) and --model-store "
                 "(the server's model repository)")
        ts = TritonTarget(inference_url, key_file, model_store, grace_s=grace, keep_previous=keep_previous)
        result = triton_release(settings, settings.model_name, version, env, ts, accept, retire=False)
    elif engine != "torchserve":
        fail(f"unknown --engine {engine!r}; choose torchserve or triton")
    elif target == "pool":
        from flywheel.serving.pool import PoolSpec, PoolTarget, canary_policy, pool_release

        if pool is None:
            fail("release --target pool needs --pool (the pool.json `flywheel serve-pool` writes)")
        ts = PoolTarget(PoolSpec.read(pool), workers=workers, grace_s=grace, keep_previous=keep_previous)
        result = pool_release(settings, settings.model_name, version, env, ts, accept, canary_policy(canary_steps),
                              mar_path=mar)
    elif target == "docker":
        result = docker_release(settings, settings.model_name, version, env,
                                DockerTarget(base_url=docker_host, image_tar=image_tar, grace_s=grace), accept)
    elif target == "kubernetes":
        from flywheel.serving.kubernetes import KubernetesTarget, kubernetes_release

        k8s = KubernetesTarget.from_options(namespace, canary_url, kube_context, canary_steps, step_pause)
        result = kubernetes_release(settings, settings.model_name, version, env, k8s, accept, mar_path=mar)
    elif target == "torchserve":
        if key_file is None or model_store is None:
            fail("release needs --key-file (the server's key_file.json) and --model-store (its model store)")
        from flywheel.serving.keys import read_key_file

        read_key_file(key_file)  # a wrong path fails here, not after minutes of packaging
        ts = ManagementTarget(inference_url, management_url, key_file, model_store, workers=workers,
                              grace_s=grace, keep_previous=keep_previous)
        result = release_version(settings, settings.model_name, version, env, ts, accept, mar_path=mar,
                                 retire=False)
    else:
        fail(f"unknown --target {target!r}; choose torchserve, docker, pool or kubernetes")
    for line in result.events:
        typer.echo(f"  {line}")
    typer.echo(f"released {result.model} v{result.version} to {env} ({result.target})")
    if target in ("torchserve", "pool") or engine == "triton":  # served already; old versions go after the grace
        sys.stdout.flush()
        shown = len(result.events)
        if target == "pool":
            from flywheel.serving.pool import retire_pool

            retire_pool(ts, result)
        else:
            retire_previous(ts, result)
        for line in result.events[shown:]:
            typer.echo(f"  {line}")


@app.command(rich_help_panel=PANEL)
def predict(
    images: Annotated[Optional[list[Path]], typer.Argument(help="Image files.")] = None,
    model: ModelOpt = None,
    endpoint: InferenceUrlOpt = "http://127.0.0.1:8080",
    directory: Annotated[Optional[Path], typer.Option("--dir", help="Predict every image under this folder.")] = None,
    out: Annotated[Optional[Path], typer.Option(help="Write JSON lines here (default: stdout).")] = None,
    version: Annotated[Optional[str], typer.Option(help="Ask this version (A/B), not the default.")] = None,
    key_file: KeyFileOpt = None,
    token: Annotated[Optional[str], typer.Option(envvar="FLYWHEEL_TS_TOKEN", help="Inference token.")] = None,
    concurrency: Annotated[int, typer.Option(min=1, help="Requests in flight.")] = 4,
    as_json: Annotated[bool, typer.Option(
        "--json", help="Print the summary as one JSON document on stdout (needs --out for the predictions).")
                       ] = False,
    engine: Annotated[str, typer.Option(
        envvar="FLYWHEEL_SERVE_ENGINE", help="torchserve | triton (the endpoint is Triton's authenticating "
                                             "proxy); `flywheel serve` writes it into serve.env.")] = "torchserve",
) -> None:
    """Batch inference over image files against a TorchServe (or Triton) endpoint, with progress. Exits 1 if any failed."""
    from flywheel.core.config import DEFAULT_MODEL_NAME
    from flywheel.serving.predict import run_predict

    if as_json and out is None:  # the predictions' JSON lines would share stdout with the summary
        fail("--json prints the summary on stdout: give --out FILE for the predictions")
    if engine not in ("torchserve", "triton"):
        fail(f"unknown --engine {engine!r}; choose torchserve or triton")
    summary = run_predict(endpoint, model or DEFAULT_MODEL_NAME, list(images or []), directory, out, key_file,
                          token, version, concurrency, progress=not as_json, engine=engine)  # bar draws on stdout
    if as_json:
        emit_json({"model": model or DEFAULT_MODEL_NAME, "total": summary.total, "ok": summary.ok,
                   "failed": summary.failed, "out": summary.out})
    else:
        typer.echo(f"{summary.ok}/{summary.total} predicted" + (f", {summary.failed} failed" if summary.failed else "")
                   + (f" → {summary.out}" if summary.out else ""), err=True)
    if summary.failed:
        raise typer.Exit(1)


@app.command(rich_help_panel=PANEL)
def serve(
    model_store: Annotated[Optional[Path], typer.Option(
        help="Model store with NAME-VERSION.mar files (default $FLYWHEEL_HOME/model-store, where `flywheel "
             "package` writes).")] = None,
    work_dir: Annotated[Optional[Path], typer.Option(
        help="Server directory: key_file.json (bearer tokens), logs, config, and serve.env, the exports that "
             "point release/predict/monitor/data at this server (default $FLYWHEEL_HOME/serving: never inside "
             "the repository).")] = None,
    capture_uri: Annotated[Optional[str], typer.Option(
        "--capture-uri", help="Where served traffic is captured: a directory or gs://bucket/prefix (default "
                              "FLYWHEEL_CAPTURE_URI, else $FLYWHEEL_HOME/captures).")] = None,
    capture: Annotated[bool, typer.Option("--capture/--no-capture", help="Capture served traffic.")] = True,
    load: Annotated[Optional[list[str]], typer.Option("--load", help="Archive to load at start (repeatable).")] = None,
    token_expiry_minutes: Annotated[float, typer.Option(
        min=0.1, help="Lifetime of TorchServe's keys (renewed at half of it while this runs).")] = 1440,
    engine: Annotated[str, typer.Option(
        help="torchserve | triton: tritonserver (loopback) behind its authenticating proxy; --model-store is "
             "then its model repository (default $FLYWHEEL_HOME/triton-repository, where `flywheel package "
             "--engine triton` writes), --work-dir defaults to $FLYWHEEL_HOME/serving-triton, --load names "
             "Triton models.")] = "torchserve",
) -> None:
    """Run a TorchServe (token auth, loopback, free ports), or with --engine triton a Triton behind its
    authenticating proxy, in the foreground until Ctrl-C."""
    stop_on_sigterm()
    from flywheel.core.config import Settings

    if engine not in ("torchserve", "triton"):
        fail(f"unknown --engine {engine!r}; choose torchserve or triton")
    settings = Settings.from_env()  # defaults: all in $FLYWHEEL_HOME
    capture_to = _capture_target((capture_uri or settings.capture_uri) if capture else "")
    if engine == "triton":
        work_dir = (work_dir or settings.work_dir / "serving-triton").resolve()
        repository = (model_store or settings.work_dir / "triton-repository").resolve()
        _check_serve_inputs(repository, tuple(load or ()), "triton")
        _serve_triton(work_dir, repository, tuple(load or ()), capture_to, token_expiry_minutes)
        return
    model_store = (model_store or settings.work_dir / "model-store").resolve()
    _check_serve_inputs(model_store, tuple(load or ()), "torchserve")
    _serve_torchserve(settings, work_dir, model_store, tuple(load or ()), capture_to, token_expiry_minutes)


def _capture_target(uri: str) -> str:
    """Where a server started here captures ("" = off): a directory made absolute (the server runs in its
    work dir), after checking that the URI is of a kind the capture store knows; the server would only
    find out at its first write."""
    from flywheel.contracts.capture import StoreError, open_store

    if not uri:
        return ""
    try:
        open_store(uri)
    except StoreError as exc:
        fail(f"--capture-uri: {exc}")
    return uri if "://" in uri else str(Path(uri).resolve())


def _check_serve_inputs(store: Path, load: tuple[str, ...], engine: str) -> None:
    """What `serve` would only find out after the server started, or not at all: a model store that is a
    file, an archive (model) to load that is not in it."""
    if store.exists() and not store.is_dir():
        fail(f"--model-store {store} is a file: give the directory `flywheel package` writes to")
    for item in load:
        name = item.partition("=")[2] or item  # TorchServe's "name=file.mar" or "file.mar"
        if engine == "torchserve" and (name == "all" or "://" in name):  # every archive; a URL TorchServe fetches
            continue
        if not (store / name).exists():
            have = sorted(p.name for p in store.iterdir()) if store.is_dir() else []
            fail(f"--load {item}: no {name} in {store} (there: {', '.join(have) or 'nothing'})")


@app.command("serve-pool", rich_help_panel=PANEL)
def serve_pool(
    replicas: Annotated[Optional[int], typer.Option(
        min=1, help="TorchServe replicas to start here behind HAProxy (default 3).")] = None,
    replicas_file: Annotated[Optional[Path], typer.Option(
        "--replicas-file", help="Start no TorchServe: put HAProxy in front of replicas that already run (here "
                                "or on other hosts), listed in this JSON file as pool.json's replica entries "
                                "(name, inference_url, management_url, key_file, model_store, optional ssh). "
                                "Stopping stops HAProxy only; --capture-uri names where they capture (default: "
                                "none, the canary's prediction mix is not measured).")] = None,
    model_store: Annotated[Optional[Path], typer.Option(
        help="Model store shared by the replicas (default $FLYWHEEL_HOME/model-store).")] = None,
    work_dir: Annotated[Optional[Path], typer.Option(
        help="Pool directory: one folder per replica, haproxy/ (config, maps, runtime socket, request log), "
             "pool.json (what `release --target pool` reads), pool-token (the clients' credential, 0600) and "
             "serve.env (default $FLYWHEEL_HOME/pool).")] = None,
    capture_uri: Annotated[Optional[str], typer.Option(
        "--capture-uri", help="Where the replicas capture traffic (default FLYWHEEL_CAPTURE_URI, else "
                              "$FLYWHEEL_HOME/captures); a canary's prediction mix is read from it.")] = None,
    capture: Annotated[bool, typer.Option("--capture/--no-capture", help="Capture served traffic.")] = True,
    load: Annotated[Optional[list[str]], typer.Option("--load", help="Archive to load at start (repeatable).")] = None,
    token_file: Annotated[Optional[Path], typer.Option(
        help="A file holding the pool credential to use (default: a new random one, written to WORK_DIR/pool-token).")
                          ] = None,
    token_expiry_minutes: Annotated[float, typer.Option(
        min=0.1, help="Lifetime of each TorchServe's keys (the pool renews them, draining each replica first).")
                                    ] = 1440,
) -> None:
    """Run N TorchServe replicas behind HAProxy (one pool credential, health checks, canary route) until
    Ctrl-C; with --replicas-file, HAProxy alone in front of replicas that already run."""
    if replicas_file is not None and (replicas is not None or load or model_store is not None):
        fail("--replicas-file fronts replicas that already run: drop --replicas, --load and --model-store")
    stop_on_sigterm()
    from flywheel.core.config import Settings
    from flywheel.serving.pool import front_pool, read_replicas, start_pool

    settings = Settings.from_env()
    default_capture = settings.capture_uri if replicas_file is None else None  # fronted: theirs, if given
    capture_to = _capture_target((capture_uri or default_capture or "") if capture else "")
    work_dir = (work_dir or settings.work_dir / "pool").resolve()
    model_store = (model_store or settings.work_dir / "model-store").resolve()
    _check_serve_inputs(model_store, tuple(load or ()), "torchserve")
    if token_file is not None and not token_file.is_file():
        fail(f"--token-file {token_file} not found: give a file holding the pool credential, or leave it out "
             "for a new one")
    env_file = work_dir / "serve.env"
    env_file.unlink(missing_ok=True)  # a stale one would name a dead pool
    token = token_file.read_text().strip() if token_file else None
    if replicas_file is not None:
        pool = front_pool(work_dir, read_replicas(replicas_file), capture_uri=capture_to or None, token=token)
    else:
        pool = start_pool(work_dir, replicas or 3, model_store, models=tuple(load or ()),
                          capture_uri=capture_to or None, token=token, token_expiration_min=token_expiry_minutes)
    lines = "\n".join(f"  {r.name}: inference {r.inference_url}  management {r.management_url}"
                      for r in pool.spec.replicas)
    _serve_until_stopped(pool, env_file, {"FLYWHEEL_POOL": str(pool.spec_path), "FLYWHEEL_TS_INFERENCE_URL": pool.url},
                         capture_to,
                         f"pool {pool.url} (HAProxy pid {pool.haproxy.pid})\n{lines}\npool credential in "
                         f"{pool.spec.token_file}\ncapture {capture_to or 'off'}\nin another shell: source {env_file}; "
                         "flywheel release --target pool --version V --env dev")


def _serve_torchserve(settings, work_dir: Path | None, model_store: Path, load: tuple[str, ...],
                      capture_to: str, token_expiry_minutes: float) -> None:

    from flywheel.serving.torchserve import ServeConfig, start_torchserve

    work_dir = work_dir or settings.work_dir / "serving"
    env_file = work_dir.resolve() / "serve.env"
    env_file.unlink(missing_ok=True)  # a stale one would name a dead server

    cfg = ServeConfig.local(work_dir.resolve(), model_store.resolve(), models=load,
                            token_expiration_min=token_expiry_minutes)
    server = start_torchserve(cfg, env={"FLYWHEEL_CAPTURE_URI": capture_to})  # "": an inherited one is off
    exports = {"FLYWHEEL_TS_INFERENCE_URL": cfg.inference_address, "FLYWHEEL_TS_MANAGEMENT_URL": cfg.management_address,
               "FLYWHEEL_TS_KEY_FILE": str(server.key_file), "FLYWHEEL_TS_MODEL_STORE": str(cfg.model_store),
               "FLYWHEEL_SERVE_ENGINE": "torchserve"}
    _serve_until_stopped(server, env_file, exports, capture_to,
                         f"inference {cfg.inference_address}  management {cfg.management_address}  "
                         f"metrics {cfg.metrics_address}\nkey file {server.key_file}\ncapture {capture_to or 'off'}\n"
                         f"in another shell: source {env_file}")


def _serve_until_stopped(server, env_file: Path, exports: dict[str, str], capture_to: str, banner: str) -> None:
    """Write serve.env (the exports release/predict/monitor read), print the banner, wait while the
    server lives; on any exit (Ctrl-C, SIGTERM, a dead server) stop it and remove serve.env."""
    import time

    from flywheel.core.config import export_lines

    try:
        env_file.write_text(export_lines({**exports, **({"FLYWHEEL_CAPTURE_URI": capture_to} if capture_to else {})}))
        typer.echo(banner)
        while server.alive():
            time.sleep(1)
    finally:
        server.stop()
        env_file.unlink(missing_ok=True)


def _serve_triton(work_dir: Path, repository: Path, load: tuple[str, ...], capture_to: str,
                  token_expiry_minutes: float) -> None:
    """`serve --engine triton`: the same contract as TorchServe's (free loopback ports, serve.env with
    the FLYWHEEL_TS_* exports `release --engine triton` reads, foreground until Ctrl-C)."""

    from flywheel.serving.triton import TritonServeConfig, start_triton

    env_file = work_dir / "serve.env"
    env_file.unlink(missing_ok=True)  # a stale one would name a dead server
    cfg = TritonServeConfig.local(work_dir, repository, models=load, token_expiration_min=token_expiry_minutes)
    server = start_triton(cfg, env={"FLYWHEEL_CAPTURE_URI": capture_to})  # "": an inherited one is off
    exports = {"FLYWHEEL_TS_INFERENCE_URL": cfg.url, "FLYWHEEL_TS_KEY_FILE": str(server.key_file),
               "FLYWHEEL_TS_MODEL_STORE": str(cfg.repository), "FLYWHEEL_SERVE_ENGINE": "triton"}
    _serve_until_stopped(server, env_file, exports, capture_to,
                         f"triton (through its proxy) {cfg.url}  metrics {cfg.url}/metrics\nkey file {server.key_file}\n"
                         f"repository {cfg.repository}\ncapture {capture_to or 'off'}\n"
                         f"in another shell: source {env_file}; flywheel release --engine triton ...")


serve_keys_app = typer.Typer(no_args_is_help=True, help="TorchServe's token keys on a serving node: renew them.")
app.add_typer(serve_keys_app, name="serve-keys", rich_help_panel=PANEL)


@serve_keys_app.command("renew")
def serve_keys_renew(
    key_file: Annotated[Path, typer.Option(
        "--key-file", envvar="FLYWHEEL_TS_KEY_FILE", help="TorchServe's key_file.json (in its working directory).")],
    management_url: Annotated[Optional[str], typer.Option(
        envvar="FLYWHEEL_TS_MANAGEMENT_URL", help="TorchServe management API URL (default: from --ts-config).")
                              ] = None,
    ts_config: Annotated[Optional[Path], typer.Option(
        help="The server's config.properties, read for its management_address.")] = None,
    watch: Annotated[bool, typer.Option("--watch", help="Keep running and renew each key as it comes due.")
                     ] = False,
    force: Annotated[bool, typer.Option("--force", help="Renew both keys now, due or not.")] = False,
    while_pid: Annotated[Optional[int], typer.Option(
        help="With --watch: exit when this process (the TorchServe launcher) is gone.")] = None,
) -> None:
    """Renew TorchServe's inference and management keys that are past half their lifetime (systemd timer)."""
    stop_on_sigterm()
    import logging

    from flywheel.serving.keys import KeyRenewer, management_url_from_properties

    if management_url is None and ts_config is None:
        fail("give --management-url or --ts-config (the server's config.properties)")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    renewer = KeyRenewer(management_url or management_url_from_properties(ts_config), key_file)
    if watch and while_pid:
        return renewer.run_while_alive(while_pid)
    if watch:
        return renewer.run()
    renewed, wait = renewer.renew_due(force=force)
    typer.echo(f"renewed: {', '.join(renewed)}" if renewed else "no key due")
    typer.echo(f"next renewal due in {wait:.0f} s")

