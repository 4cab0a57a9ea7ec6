"""The package layout's import rules (issue 12), read from the source with `ast`.

src/flywheel/ is one folder per node or contract:
* a node package (training, control, tracking, serving, monitoring) imports only `flywheel.core`,
  `flywheel.contracts`, `flywheel.component` (the public library a component uses) and itself;
  only `flywheel.cli` and `flywheel.demo` combine nodes; `flywheel.component` imports only core,
  contracts and itself;
* `flywheel.core` imports only core and contracts; `flywheel.contracts` only other contracts (the
  component spec embeds the preprocessing spec);
* the modules copied into a .mar (serving/handler.py + serving.MAR_CONTRACTS) import nothing outside
  those contracts: they are staged the way `flywheel package` stages them and imported in a fresh
  interpreter where `flywheel` cannot be imported at all.
Every import counts, module-level or inside a function, a `try` or `if TYPE_CHECKING:`.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PKG = SRC / "flywheel"
NODES = {"training", "control", "tracking", "serving", "monitoring"}
COMBINERS = {"cli", "demo", "__main__"}  # may import any node
ALLOWED = {**{node: {"core", "contracts", "component", node} for node in NODES},
           "component": {"core", "contracts", "component"},
           "core": {"core", "contracts"}, "contracts": {"contracts"}, "__init__": set()}


def _modules() -> dict[str, Path]:
    return {".".join(p.relative_to(SRC).with_suffix("").parts).removesuffix(".__init__"): p
            for p in sorted(PKG.rglob("*.py"))}


def _resolve(name: str) -> str:
    """The flywheel module or package an import names (`from flywheel import x` names flywheel.x)."""
    parts = name.split(".")
    while parts and not ((SRC.joinpath(*parts)).with_suffix(".py").is_file() or SRC.joinpath(*parts).is_dir()):
        parts.pop()
    return ".".join(parts)


def flywheel_imports(module: str, path: Path) -> list[tuple[int, str]]:
    """(line, imported flywheel module) for every import in the file, at any depth."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the module's own package upwards
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            names = [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        found += [(node.lineno, _resolve(n)) for n in names if n == "flywheel" or n.startswith("flywheel.")]
    return found


def _top(module: str) -> str:
    """The folder (or top-level module) of flywheel a module belongs to: `flywheel.core.data` → core."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def test_every_module_lives_in_a_node_or_contract_folder():
    stray = [m for m in _modules() if _top(m) not in ALLOWED and _top(m) not in COMBINERS]
    assert stray == [], f"modules outside the layout's folders: {stray}"
    assert set(_modules()) >= {f"flywheel.{p}" for p in (*NODES, "core", "contracts", "cli")}


def test_the_parser_sees_function_level_and_guarded_imports(tmp_path):
    probe = PKG / "serving" / "handler.py"  # imports its contracts in try/except at module level
    assert {m for _, m in flywheel_imports("flywheel.serving.handler", probe)} == {
        "flywheel.contracts.preprocessing", "flywheel.contracts.capture", "flywheel.contracts.manifest"}
    src = "def f():\n    from flywheel.monitoring.drift import x\nif 1:\n    import flywheel.core.data\n" \
          "from flywheel import cli\n"
    (tmp_path / "m.py").write_text(src)
    assert sorted(m for _, m in flywheel_imports("flywheel.training.m", tmp_path / "m.py")) == [
        "flywheel.cli", "flywheel.core.data", "flywheel.monitoring.drift"]


@pytest.mark.parametrize("module", sorted(m for m in _modules() if _top(m) not in COMBINERS))
def test_imports_follow_the_layout(module):
    path = _modules()[module]
    allowed = ALLOWED[_top(module)]
    bad = [f"{path.relative_to(SRC)}:{line} imports {target}"
           for line, target in flywheel_imports(module, path)
           if target == "flywheel" or _top(target) not in allowed]
    assert bad == [], (f"{module} may import only {sorted(allowed) or 'nothing'} of flywheel; move what it "
                       f"needs into core or contracts:\n" + "\n".join(bad))


def test_mar_modules_import_only_the_contracts_beside_them():
    from flywheel.serving import CONTRACTS_DIR, HANDLER_FILE, MAR_CONTRACTS

    shipped = {f"flywheel.contracts.{Path(n).stem}" for n in MAR_CONTRACTS}
    targets = {m for _, m in flywheel_imports("flywheel.serving.handler", HANDLER_FILE)}
    assert targets <= shipped, f"the handler imports {sorted(targets - shipped)}, which no .mar carries"
    for name in MAR_CONTRACTS:
        assert flywheel_imports(f"flywheel.contracts.{Path(name).stem}", CONTRACTS_DIR / name) == []


def test_staged_mar_modules_import_with_flywheel_unimportable(tmp_path):
    """Stage the archive's Python files as `flywheel package` does, then import them in an isolated
    interpreter (-I: no PYTHONPATH, no user site) in which any `flywheel` import fails."""
    from flywheel.serving import MAR_CONTRACTS
    from flywheel.serving.package import PackageConfig, stage_files

    stage_files(tmp_path, {"format": "onnx"}, ["a", "b"], PackageConfig(model_name="m", capture_uri="/tmp/x"))
    staged = sorted(p.name for p in tmp_path.glob("*.py"))
    assert staged == sorted(["handler.py", *MAR_CONTRACTS])
    code = """
import importlib.abc, json, sys
class NoFlywheel(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "flywheel" or name.startswith("flywheel."):
            raise ImportError(f"{name} is not in the archive")
sys.meta_path.insert(0, NoFlywheel())
sys.path.insert(0, sys.argv[1])
import handler
print(json.dumps({"flywheel": sorted(m for m in sys.modules if m.split(".")[0] == "flywheel"),
                  "pp": handler._pp.__file__, "capture": handler._capture and handler._capture.__file__}))
"""
    proc = subprocess.run([sys.executable, "-I", "-c", code, str(tmp_path)], capture_output=True, text=True,
                          check=False, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["flywheel"] == []
    assert out["pp"] == str(tmp_path / "preprocessing.py") and out["capture"] == str(tmp_path / "capture.py")
