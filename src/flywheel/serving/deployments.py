"""The `flywheel` target of `mlflow deployments`: MLflow's deployment CLI and API on a Flywheel serving node.

`mlflow deployments create -t flywheel --name M -m models:/M/V` (and `update`, `delete`, `list`, `get`,
`predict`; `explain` answers "unsupported") against a TorchServe with token auth, through exactly the
code `flywheel release` runs: `release_version` packages (or reuses a verified `flywheel package`
archive), registers the version beside the current default, runs acceptance, switches with
`set-default`, rolls back on any failure and only then moves registry alias `dev`/`prod` and tags
`deployed_<env>_at`. MLflow's own TorchServe plugin (mlflow-torchserve) is unmaintained since 2023
and cannot send TorchServe's bearer tokens; this one reads them from the node's key_file.json
(`TorchServeClient`, re-read on every rejection, so a key renewal costs nothing).

Wiring: the entry point `[project.entry-points."mlflow.deployments"] flywheel =
"flywheel.serving.deployments"` (pyproject.toml). MLflow requires the module to hold exactly one
`BaseDeploymentClient` subclass plus module-level `run_local` and `target_help`.

Target URI: `flywheel` (environment `dev`), `flywheel:/dev` or `flywheel:/prod`: the environment whose
registry alias a create/update moves. The node itself (one TorchServe per environment, as in
docs/github.md) comes from the variables `flywheel release` reads: FLYWHEEL_TS_INFERENCE_URL,
FLYWHEEL_TS_MANAGEMENT_URL, FLYWHEEL_TS_KEY_FILE, FLYWHEEL_TS_MODEL_STORE; when none of them is set,
from `$FLYWHEEL_HOME/serving/serve.env`, the file `flywheel serve` writes. The registry is
MLFLOW_TRACKING_URI / FLYWHEEL_HOME (`Settings.from_env`). A deployment's name is the registered
model's name, which is also its TorchServe model name.

Errors are `DeploymentError`: an MlflowException (what MLflow asks plugins to raise) that is also a
click.ClickException, so the `mlflow` CLI prints it as one `Error: ...` line (no traceback) and exits
2 (a usage or environment problem) or 3 (a release that failed and was rolled back), the exit codes
of `flywheel release`.
"""

from __future__ import annotations

import base64
import shlex
import sys
from dataclasses import dataclass, fields, replace
from pathlib import Path
from urllib.parse import urlparse

import click
from mlflow.deployments import BaseDeploymentClient, PredictionsResponse
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE, RESOURCE_DOES_NOT_EXIST

from flywheel.core.config import Settings
from flywheel.core.errors import FlywheelError, Rejected

TARGET = "flywheel"
ENVS = ("dev", "prod")  # = release.ENVS (not imported here: this module is loaded for `mlflow deployments help`)
FLAVORS = ("auto", "onnx", "torchscript", "tensorrt")  # `--flavor`: the served artifact (package's --format)
CHUNK = 32  # images per inference request (the handler takes up to 64; 32 PNGs stay far below 8 MiB)
NODE_VARS = ("FLYWHEEL_TS_INFERENCE_URL", "FLYWHEEL_TS_MANAGEMENT_URL", "FLYWHEEL_TS_KEY_FILE",
             "FLYWHEEL_TS_MODEL_STORE")


class DeploymentError(MlflowException, click.ClickException):
    """One line a user can act on: an MlflowException for API callers; `Error: ...` and exit 2/3 in the CLI."""

    def __init__(self, message: str, exit_code: int = 2, error_code: int = INVALID_PARAMETER_VALUE):
        super().__init__(message, error_code=error_code)
        self.exit_code = exit_code


# ------------------------------------------------------------------------------------ configuration
@dataclass(frozen=True)
class DeployConfig:
    """`-C key=value` options of create/update/delete (strings from the CLI, typed here)."""

    env: str | None = None  # dev | prod; must agree with the target URI's when both are given
    min_accuracy: float = 0.8  # acceptance, as `flywheel release --min-accuracy`
    p95_slo_ms: float = 100.0
    accuracy_samples: int = 200
    latency_requests: int = 40
    workers: int = 1
    keep_previous: int = 1  # earlier versions left registered (A/B, instant rollback)
    grace_s: float = 10.0  # before versions beyond keep_previous are unregistered
    mar: str | None = None  # an archive from `flywheel package` (verified, not rebuilt)
    version: str | None = None  # delete: only this version
    remove_alias: bool = False  # delete: also remove alias <env> when it names what was unregistered

    @classmethod
    def parse(cls, config: dict | None, allowed: tuple[str, ...], verb: str) -> DeployConfig:
        config = dict(config or {})
        unknown = sorted(set(config) - set(allowed))
        if unknown:
            raise DeploymentError(f"unknown config {', '.join(unknown)} for {verb}; known: {', '.join(allowed)} "
                                  f"(mlflow deployments help -t {TARGET})")
        types = {f.name: f.type for f in fields(cls)}
        values = {}
        for key, raw in config.items():
            kind = types[key]
            try:
                if "bool" in kind:
                    if str(raw).lower() not in ("true", "false", "1", "0", "yes", "no"):
                        raise ValueError(raw)
                    values[key] = str(raw).lower() in ("true", "1", "yes")
                elif "int" in kind:
                    values[key] = int(raw)
                elif "float" in kind:
                    values[key] = float(raw)
                else:
                    values[key] = str(raw)
            except ValueError:
                wanted = {"bool": "true or false", "int": "an integer", "float": "a number"}[kind]
                raise DeploymentError(f"config {key}={raw!r}: expected {wanted}") from None
        return cls(**values)

    def acceptance(self):
        from flywheel.serving.release import AcceptanceConfig

        return AcceptanceConfig(min_accuracy=self.min_accuracy, p95_slo_ms=self.p95_slo_ms,
                                accuracy_samples=self.accuracy_samples, latency_requests=self.latency_requests)


RELEASE_KEYS = ("env", "min_accuracy", "p95_slo_ms", "accuracy_samples", "latency_requests", "workers",
                "keep_previous", "grace_s", "mar")
DELETE_KEYS = ("env", "version", "remove_alias")


@dataclass(frozen=True)
class ServingNode:
    """Where the target's TorchServe is: the variables `flywheel release` reads, else `flywheel serve`'s serve.env."""

    inference_url: str = "http://127.0.0.1:8080"
    management_url: str = "http://127.0.0.1:8081"
    key_file: Path | None = None
    model_store: Path | None = None
    source: str = "environment"

    @classmethod
    def from_env(cls, environ: dict, settings: Settings) -> ServingNode:
        values, source = {k: environ.get(k) for k in NODE_VARS}, "environment"
        serve_env = settings.work_dir / "serving" / "serve.env"
        if not any(values.values()) and serve_env.is_file():
            values, source = _read_exports(serve_env), str(serve_env)
        node = cls(source=source)
        for var, attr in zip(NODE_VARS, ("inference_url", "management_url", "key_file", "model_store"), strict=True):
            if values.get(var):
                node = replace(node, **{attr: Path(values[var]) if attr in ("key_file", "model_store")
                                        else values[var]})
        if node.key_file is None:
            raise DeploymentError(
                f"the {TARGET} target needs the serving node's key file: set FLYWHEEL_TS_KEY_FILE (and "
                "FLYWHEEL_TS_INFERENCE_URL, _MANAGEMENT_URL, _MODEL_STORE), or `source "
                f"{serve_env}` of a running `flywheel serve`")
        return node

    def target(self, cfg: DeployConfig):
        """release.ManagementTarget for a create/update (which copies archives into the model store)."""
        from flywheel.serving.release import ManagementTarget

        if self.model_store is None:
            raise DeploymentError("create/update copy the archive into the server's model store: set "
                                  "FLYWHEEL_TS_MODEL_STORE to its directory")
        return ManagementTarget(self.inference_url, self.management_url, self.key_file, self.model_store,
                                workers=cfg.workers, grace_s=cfg.grace_s, keep_previous=cfg.keep_previous)

    def client(self):
        from flywheel.serving.torchserve import TorchServeClient

        return TorchServeClient(self.inference_url, self.management_url, key_file=self.key_file)

    def describe(self) -> str:
        return f"torchserve {self.inference_url}"


def _read_exports(path: Path) -> dict[str, str]:
    """`export K=V` lines (shell-quoted, as `flywheel serve` writes serve.env) → {K: V}."""
    found = {}
    for line in path.read_text().splitlines():
        words = shlex.split(line, comments=True)
        if words[:1] == ["export"]:
            words = words[1:]
        for word in words:
            key, sep, value = word.partition("=")
            if sep:
                found[key] = value
    return found


def env_of(target_uri: str) -> str | None:
    """The environment a target URI names: `flywheel` → None, `flywheel:/prod` → 'prod'."""
    parsed = urlparse(target_uri)
    env = (parsed.path or "").strip("/") if parsed.scheme else ""
    if env and env not in ENVS:
        raise DeploymentError(f"target {target_uri!r}: unknown environment {env!r}; use {TARGET}, "
                              f"{TARGET}:/dev or {TARGET}:/prod")
    return env or None


def parse_model_uri(model_uri: str, name: str, settings: Settings) -> str:
    """The registry version a `models:/NAME/VERSION` or `models:/NAME@ALIAS` URI names, for deployment `name`."""
    from flywheel.core.registry import Registry, registered_in

    found = registered_in(model_uri or "")
    if found is None:
        raise DeploymentError(f"model URI {model_uri!r}: the {TARGET} target deploys registry versions; use "
                              f"models:/{name}/VERSION or models:/{name}@ALIAS")
    model, version = found
    if model != name:
        raise DeploymentError(f"deployment name {name!r} differs from the model in {model_uri}: a Flywheel "
                              f"deployment is named after its registered model (--name {model})")
    return str(Registry(settings).version(version, model).version)


# ------------------------------------------------------------------------------------------ client
class FlywheelDeploymentClient(BaseDeploymentClient):
    """Deployments on one Flywheel serving node (a TorchServe); one deployment per registered model."""

    def __init__(self, target_uri: str):
        super().__init__(target_uri)
        self.env_from_uri = env_of(target_uri)

    # -- helpers -------------------------------------------------------------------------------------
    def _setup(self, name: str, config: dict | None, allowed: tuple[str, ...], verb: str):
        import os

        cfg = DeployConfig.parse(config, allowed, verb)
        if cfg.env and self.env_from_uri and cfg.env != self.env_from_uri:
            raise DeploymentError(f"config env={cfg.env} contradicts target {self.target_uri}")
        env = cfg.env or self.env_from_uri or "dev"
        if env not in ENVS:
            raise DeploymentError(f"unknown environment {env!r}; choose one of: {', '.join(ENVS)}")
        settings = Settings.from_env(model_name=name)
        return cfg, env, settings, ServingNode.from_env(dict(os.environ), settings)

    def _node(self):
        import os

        settings = Settings.from_env()
        return settings, ServingNode.from_env(dict(os.environ), settings)

    @staticmethod
    def _no_endpoint(endpoint) -> None:
        if endpoint is not None:
            raise DeploymentError(f"the {TARGET} target has no endpoints: leave out --endpoint")

    def _release(self, name: str, version: str, env: str, cfg: DeployConfig, node: ServingNode,
                 settings: Settings, flavor: str | None) -> dict:
        """release_version with this deployment's options; DeploymentError (exit 3) when it rolled back."""
        import requests

        from flywheel.serving.release import ReleaseFailed, release_version

        if flavor not in (None, *FLAVORS):
            raise DeploymentError(f"flavor {flavor!r}: the {TARGET} target serves one of {', '.join(FLAVORS)} "
                                  "(the archive's artifact format); leave --flavor out for auto")
        if flavor and cfg.mar:
            raise DeploymentError("give either --flavor (package now in that format) or -C mar=PATH, not both")
        options = {"artifact_format": flavor, "workers": cfg.workers} if flavor else None
        try:
            result = release_version(settings, name, version, env, node.target(cfg), cfg.acceptance(),
                                     mar_path=Path(cfg.mar) if cfg.mar else None, package_options=options)
        except ReleaseFailed as exc:
            _echo_events(exc.result)
            done = "" if "rolled back" in str(exc) else "; rolled back"
            raise DeploymentError(f"{exc}{done}; alias {env!r} unchanged", exit_code=3) from None
        except Rejected as exc:
            raise DeploymentError(str(exc), exit_code=3) from None
        except FlywheelError as exc:
            raise DeploymentError(str(exc)) from None
        except requests.RequestException as exc:  # before anything was registered (release reads versions first)
            raise DeploymentError(f"cannot reach TorchServe at {node.management_url} ({type(exc).__name__}): is "
                                  f"the serving node up (addresses from {node.source})?") from None
        _echo_events(result)
        return {**self._describe(name, env), "env": env, "version": result.version, "previous": result.previous,
                "acceptance": result.report.summary() if result.report else None}

    # -- the interface -------------------------------------------------------------------------------
    def create_deployment(self, name, model_uri, flavor=None, config=None, endpoint=None):
        """Release `model_uri` (models:/NAME/VERSION or @ALIAS) to a node that does not serve NAME yet."""
        self._no_endpoint(endpoint)
        cfg, env, settings, node = self._setup(name, config, RELEASE_KEYS, "create")
        version = _call(lambda: parse_model_uri(model_uri, name, settings))
        served = _call(lambda: node.client().versions(name), node)
        if served:
            raise DeploymentError(f"deployment {name} already exists on {node.describe()} (versions "
                                  f"{', '.join(sorted(served))}): use `mlflow deployments update`")
        return self._release(name, version, env, cfg, node, settings, flavor)

    def update_deployment(self, name, model_uri=None, flavor=None, config=None, endpoint=None):
        """Release another version to an existing deployment; without a model URI, rescale (-C workers=N)."""
        self._no_endpoint(endpoint)
        cfg, env, settings, node = self._setup(name, config, RELEASE_KEYS, "update")
        client = node.client()
        served = _call(lambda: client.versions(name), node)
        if not served:
            raise DeploymentError(f"no deployment {name} on {node.describe()}: use `mlflow deployments create`",
                                  error_code=RESOURCE_DOES_NOT_EXIST)
        if model_uri is None:
            if flavor is not None or "workers" not in (config or {}):
                raise DeploymentError("nothing to update: give --model-uri models:/NAME/VERSION, or -C workers=N "
                                      "to rescale the serving version")
            default = next(v for v, d in served.items() if d)
            r = _call(lambda: client.scale(name, default, cfg.workers), node)
            if r.status_code != 200:
                raise DeploymentError(f"scale of {name} v{default} failed: {client.explain(r, 'management')}")
            return {**self._describe(name, env), "env": env}
        version = _call(lambda: parse_model_uri(model_uri, name, settings))
        return self._release(name, version, env, cfg, node, settings, flavor)

    def delete_deployment(self, name, config=None, endpoint=None):
        """Unregister NAME (every version, or `-C version=V`); idempotent. The alias of this environment
        is kept (the `prod` one names the gate's champion) unless -C remove_alias=true, and either way a
        line on stderr says when it now names a version this node no longer serves."""
        self._no_endpoint(endpoint)
        cfg, env, settings, node = self._setup(name, config, DELETE_KEYS, "delete")
        client = node.client()
        served = _call(lambda: client.versions(name), node)
        if not served:
            _note(f"no deployment {name} on {node.describe()}: nothing to delete")
            return
        if cfg.version is not None and cfg.version not in served:
            _note(f"{name} v{cfg.version} is not registered on {node.describe()}: nothing to delete")
            return
        if cfg.version is not None and served[cfg.version] and len(served) > 1:
            others = ", ".join(sorted(v for v in served if v != cfg.version))
            raise DeploymentError(f"v{cfg.version} is the serving default of {name} (also registered: {others}): "
                                  "update to another version first, or delete the whole deployment")
        # Non-default versions first: TorchServe refuses to remove a default while others remain.
        doomed = [cfg.version] if cfg.version is not None else sorted(served, key=lambda v: served[v])
        for v in doomed:
            r = _call(lambda v=v: client.unregister(name, v), node)
            if r.status_code not in (200, 404):
                raise DeploymentError(f"unregister {name} v{v} failed: {client.explain(r, 'management')}")
            _note(f"unregistered {name} v{v} from {node.describe()}")
        self._settle_alias(name, env, settings, node, set(doomed), cfg.remove_alias)

    def _settle_alias(self, name: str, env: str, settings: Settings, node: ServingNode, gone: set[str],
                      remove: bool) -> None:
        from datetime import datetime, timezone

        from flywheel.core.registry import Registry

        registry = Registry(settings)
        aliased = _aliases(registry, name).get(env)
        if aliased is None or aliased not in gone:
            return
        stamp = datetime.now(timezone.utc).isoformat(timespec="seconds")
        registry.client.set_model_version_tag(name, aliased, f"undeployed_{env}_at", f"{stamp} {node.describe()}")
        if remove:
            registry.client.delete_registered_model_alias(name, env)
            _note(f"removed alias {env!r} (it named v{aliased}, no longer served)")
        else:
            _note(f"alias {env!r} still names {name} v{aliased}, which {node.describe()} no longer serves "
                  f"(kept: `{env}` may name the gate's champion; -C remove_alias=true removes it)")

    def list_deployments(self, endpoint=None):
        """Every model the node serves, each as `get_deployment` describes it."""
        self._no_endpoint(endpoint)
        _settings, node = self._node()
        client = node.client()
        names, token = [], None
        while True:
            r = _call(lambda token=token: client.list_models(limit=100, next_page_token=token), node)
            if r.status_code != 200:
                raise DeploymentError(f"listing models on {node.describe()} failed: {client.explain(r, 'management')}")
            body = r.json()
            names += [m["modelName"] for m in body.get("models", [])]
            token = body.get("nextPageToken")
            if not token:
                break
        return [self.get_deployment(n) for n in names]

    def get_deployment(self, name, endpoint=None):
        """TorchServe's view (versions, default, workers, served artifact) and the registry's aliases;
        `warnings` names a mismatch between the target environment's alias and the served default."""
        self._no_endpoint(endpoint)
        return self._describe(name, self.env_from_uri or "dev")

    def _describe(self, name: str, env: str) -> dict:
        from flywheel.core.registry import Registry

        settings, node = self._node()
        client = node.client()
        r = _call(lambda: client.describe(name, "all"), node)
        if r.status_code == 404:
            raise DeploymentError(f"no deployment {name} on {node.describe()}", error_code=RESOURCE_DOES_NOT_EXIST)
        if r.status_code != 200:
            raise DeploymentError(f"describe {name} failed: {client.explain(r, 'management')}")
        default = str(_call(lambda: client.describe(name), node).json()[0]["modelVersion"])
        versions = {}
        for m in r.json():
            workers = m.get("workers", [])
            ready = sum(w.get("status") == "READY" for w in workers)
            versions[str(m["modelVersion"])] = {"default": str(m["modelVersion"]) == default,
                                                "workers": f"{ready}/{len(workers)} ready", "archive": m.get("modelUrl")}
        try:
            registry = Registry(settings)
            aliases = _aliases(registry, name)
        except MlflowException as exc:  # the registry is down or elsewhere: TorchServe's view still answers
            aliases, registry = {"error": exc.message.splitlines()[0]}, None
        warnings = []
        if registry is not None and aliases.get(env) != default:
            warnings.append(f"alias {env!r} names {('v' + aliases[env]) if aliases.get(env) else 'no version'}, "
                            f"but this node serves v{default} by default")
        return {"name": name, "flavor": _served_format(node, versions[default]["archive"]),
                "default_version": default, "versions": versions,
                "aliases": {k: v for k, v in aliases.items() if k in (*ENVS, "candidate", "error")},
                "inference_url": f"{node.inference_url}/predictions/{name}", "target": node.describe(),
                "warnings": warnings}

    def predict(self, deployment_name=None, inputs=None, endpoint=None):
        """Classify images: a DataFrame with column `image` (base64 PNG/JPEG) or `path` (an image file
        here), a dict {"images": [...]} / {"image": ...}, a list of base64 strings, or raw bytes.
        `deployment_name` NAME asks the serving default; NAME/VERSION asks that version (A/B)."""
        self._no_endpoint(endpoint)
        if not deployment_name:
            raise DeploymentError("predict needs --name NAME (or NAME/VERSION)")
        name, _, version = str(deployment_name).partition("/")
        images = _images(inputs)
        _settings, node = self._node()
        client = node.client()
        predictions, versions = [], set()
        from flywheel.serving.torchserve import RequestTooLarge

        for start in range(0, len(images), CHUNK):
            body = {"images": images[start:start + CHUNK]}
            try:
                r = _call(lambda body=body: client.predict(name, body, version=version or None), node, "inference")
            except RequestTooLarge as exc:
                raise DeploymentError(str(exc)) from None
            if r.status_code != 200:
                raise DeploymentError(f"prediction of images {start}..{start + len(body['images']) - 1} on "
                                      f"{name}{'/' + version if version else ''} failed: {client.explain(r)}")
            answer = r.json()
            predictions += answer["predictions"]
            versions.add(str(answer.get("version")))
        return PredictionsResponse({"predictions": predictions, "model": name, "versions": sorted(versions)})

    def explain(self, deployment_name=None, df=None, endpoint=None):
        raise DeploymentError(f"explain is not supported by the {TARGET} target: predictions carry top-k "
                              "probabilities (`predict`); no attribution method is served")


# ------------------------------------------------------------------------------ module-level hooks
def run_local(name, model_uri, flavor=None, config=None):
    """MLflow's `mlflow deployments run-local`: a local node is `flywheel serve`; this says so."""
    raise DeploymentError(f"run-local is not offered by the {TARGET} target: start a local node with `flywheel "
                          f"serve`, `source $FLYWHEEL_HOME/serving/serve.env`, then `mlflow deployments create -t "
                          f"{TARGET} --name {name} -m {model_uri}`")


def target_help():
    return f"""Flywheel serving node (TorchServe with token auth): releases through `flywheel release`'s code.

Target URI: {TARGET} | {TARGET}:/dev | {TARGET}:/prod -- the environment whose registry alias a
create/update moves (default dev); get reports whether that alias matches what the node serves.

The node: FLYWHEEL_TS_INFERENCE_URL, FLYWHEEL_TS_MANAGEMENT_URL (defaults http://127.0.0.1:8080 and
:8081), FLYWHEEL_TS_KEY_FILE (TorchServe's key_file.json), FLYWHEEL_TS_MODEL_STORE (its model store);
when none is set, $FLYWHEEL_HOME/serving/serve.env (written by `flywheel serve`). The registry:
MLFLOW_TRACKING_URI (else $FLYWHEEL_HOME/mlflow.db).

Deployment name = registered model name = TorchServe model name. Model URI: models:/NAME/VERSION or
models:/NAME@ALIAS. --flavor: {' | '.join(FLAVORS)} (the served artifact; given, the version is packaged
now in that format; left out, an archive from `flywheel package` is reused if valid).

create/update: package (or reuse) -> register beside the default -> acceptance on /predictions/NAME/V
(smoke, accuracy, p95) -> set-default -> alias <env> + tag deployed_<env>_at. Any failure rolls back,
moves no alias, and exits 3. update without --model-uri and with -C workers=N rescales the default.
  -C env=dev|prod          (must agree with the target URI)
  -C min_accuracy=0.8      acceptance: accuracy on accuracy_samples labelled test images
  -C p95_slo_ms=100        acceptance: p95 latency of single-image requests
  -C accuracy_samples=200  -C latency_requests=40
  -C workers=1             workers of the new version
  -C keep_previous=1       earlier versions left registered (A/B at /predictions/NAME/V)
  -C grace_s=10            seconds before older versions are unregistered
  -C mar=PATH              an archive made by `flywheel package` (verified, not rebuilt)
delete: unregisters every version (or -C version=V, not the default while others remain); idempotent.
  The alias <env> is kept (prod names the gate's champion) and stderr says it no longer serves;
  -C remove_alias=true removes it. Either way the version is tagged undeployed_<env>_at.
predict: --input-path JSON that pandas reads into rows with a column `image` (base64 PNG/JPEG) or
  `path` (an image file on this machine), e.g. [{{"path": "shoe.png"}}, {{"image": "iVBORw0..."}}].
  --name NAME asks the serving default; NAME/VERSION asks that version. Output: {{"predictions": [{{"label",
  "label_index", "confidence", "top_k", "version", "prediction_id", ...}}, ...], "versions": [...]}}.
explain, run-local: not supported (run-local: use `flywheel serve`).
"""


# ------------------------------------------------------------------------------------------ helpers
def _call(fn, node: ServingNode | None = None, api: str = "management"):
    """fn(), with FlywheelError and connection failures as one-line DeploymentErrors."""
    import requests

    try:
        return fn()
    except DeploymentError:
        raise
    except FlywheelError as exc:
        raise DeploymentError(str(exc)) from None
    except requests.RequestException as exc:
        url = (node.management_url if api == "management" else node.inference_url) if node else "the server"
        raise DeploymentError(f"cannot reach TorchServe's {api} API at {url} ({type(exc).__name__}); is the "
                              f"serving node up and are the FLYWHEEL_TS_* addresses right (from {node.source if node else '?'})?"
                              ) from None


def _aliases(registry, name: str) -> dict[str, str]:
    try:
        return {k: str(v) for k, v in registry.client.get_registered_model(name).aliases.items()}
    except MlflowException as exc:
        if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
            return {}
        raise


def _served_format(node: ServingNode, archive: str | None) -> str:
    """The artifact format in the manifest of the default version's archive, when the model store is here."""
    import zipfile

    from flywheel.contracts.manifest import Manifest

    if not archive or node.model_store is None or not (node.model_store / archive).is_file():
        return "unknown"
    try:
        return str(Manifest.read(node.model_store / archive).artifact.get("format", "unknown"))
    except (OSError, KeyError, ValueError, zipfile.BadZipFile):
        return "unknown"


def _images(inputs) -> list[str]:
    """Base64 strings from predict's accepted input forms (see FlywheelDeploymentClient.predict)."""
    def b64_file(path) -> str:
        try:
            return base64.b64encode(Path(str(path)).read_bytes()).decode()
        except OSError as exc:
            raise DeploymentError(f"cannot read image {path}: {exc.strerror}") from None

    if isinstance(inputs, (bytes, bytearray)):
        return [base64.b64encode(bytes(inputs)).decode()]
    if isinstance(inputs, dict):
        inputs = inputs.get("images", [inputs["image"]] if "image" in inputs else None)
    if hasattr(inputs, "columns"):  # a pandas DataFrame (what `mlflow deployments predict` reads)
        cols = set(inputs.columns)
        if not cols & {"image", "path"}:
            raise DeploymentError(f"predict input has columns {sorted(map(str, cols))}: give rows with `image` "
                                  "(base64 PNG/JPEG) or `path` (an image file), e.g. [{\"path\": \"a.png\"}]")
        out = []
        for i, row in enumerate(inputs.to_dict("records")):
            image, path = row.get("image"), row.get("path")
            if isinstance(image, str) and image:
                out.append(image)
            elif isinstance(path, str) and path:
                out.append(b64_file(path))
            else:
                raise DeploymentError(f"predict input row {i} has neither `image` nor `path`")
        inputs = out
    if not isinstance(inputs, list) or not inputs or not all(isinstance(x, str) for x in inputs):
        raise DeploymentError("predict input: rows with `image` (base64) or `path`, {\"images\": [base64, ...]}, "
                              "or a list of base64 strings")
    return inputs


def _echo_events(result) -> None:
    if result is not None:
        for line in result.events:
            _note(line)


def _note(text: str) -> None:
    """Progress and warnings on stderr: the `mlflow` CLI prints only a one-line result on stdout."""
    print(f"{TARGET}: {text}", file=sys.stderr, flush=True)
