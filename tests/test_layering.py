"""Imports run one way (docs/architecture.md, "Import graph").

    vlsplit (SDK, client CLI) ──> vlsplit.v1 (generated stubs), shared.schema, shared.credentials
    services.*, shared.*      ──> shared.*, vlsplit.v1 (never the client package)
    shared.*                  ──> never services.*

and the modules the client may import need nothing but the standard library, protobuf and the stubs.
Every `import` statement counts, at module level or inside a function (a lazy import runs the same way).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
# What the client package may import from the server side's folders: torch-free, server-free modules.
CLIENT_SHARED = {"shared.schema", "shared.credentials"}
STDLIB = set(sys.stdlib_module_names)
CLIENT_THIRD_PARTY = {"grpc", "grpc_health", "google", "tenacity"}  # grpcio, grpcio-health-checking, protobuf


def _module(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, module: str | None = None) -> set[str]:
    """Every module `path` (module `module`, by default its place in the repository) imports: absolute
    names, relative imports resolved."""
    module = module or _module(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parent + ([base] if base else []))
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)  # `from shared import config`
    return names


def _graph(top: str) -> dict[str, set[str]]:
    return {_module(path): _imports(path) for path in sorted((REPO / top).rglob("*.py"))
            if "v1" not in path.relative_to(REPO).parts}


def _within(name: str, prefixes) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def _known_module(name: str) -> bool:
    """`shared.config` from `from shared import config`, but not `shared.schema.check_role`."""
    path = REPO / name.replace(".", "/")
    return path.with_suffix(".py").exists() or (path / "__init__.py").exists()


def test_the_client_package_imports_nothing_server_side():
    wrong = {(module, name) for module, names in _graph("vlsplit").items() for name in names
             if _within(name, ("services",))
             or (_within(name, ("shared",)) and _known_module(name) and name != "shared"
                 and not _within(name, CLIENT_SHARED))}
    assert wrong == set(), "the client package (vlsplit/) may import only " \
                           f"{sorted(CLIENT_SHARED)} from the server side: {sorted(wrong)}"


def test_servers_never_import_the_client_package():
    graph = _graph("services") | _graph("shared")
    wrong = {(module, name) for module, names in graph.items() for name in names
             if _within(name, ("vlsplit",)) and not _within(name, ("vlsplit.v1",))}
    assert wrong == set(), f"server code imports the client package (only vlsplit.v1, the stubs, is shared): {wrong}"


def test_shared_never_imports_a_service():
    wrong = {(module, name) for module, names in _graph("shared").items() for name in names
             if _within(name, ("services",))}
    assert wrong == set(), wrong


@pytest.mark.parametrize("module", sorted(CLIENT_SHARED | {m for m in _graph("vlsplit")}))
def test_what_the_client_imports_needs_only_the_client_dependencies(module):
    path = REPO / (module.replace(".", "/") + ".py")
    if not path.exists():
        path = REPO / module.replace(".", "/") / "__init__.py"
    outside = {name for name in _imports(path) if name.split(".")[0] not in STDLIB | CLIENT_THIRD_PARTY
               and not _within(name, ("vlsplit",) + tuple(CLIENT_SHARED)) and name not in ("shared", "")}
    assert outside == set(), f"{module} imports {sorted(outside)}: not in the client install (grpcio, protobuf, " \
                             "grpcio-health-checking, tenacity)"


def test_the_rules_see_a_wrong_import(tmp_path):
    """The checks above would catch a client module importing the gateway, lazily inside a function."""
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from services.gateway import auth\n    from ..shared import config\n")
    names = _imports(bad, "vlsplit.commands.bad")
    assert {"services.gateway", "services.gateway.auth", "vlsplit.shared.config"} <= names, names


def test_importing_the_sdk_loads_no_server_module():
    """At run time too: `import vlsplit` (the SDK) and the client CLI's parser load nothing under services/
    except the server commands' registration, and none of the server stack's packages."""
    code = ("import sys, vlsplit, vlsplit.cli\n"
            "vlsplit.cli._parser()\n"
            "heavy = ('torch', 'transformers', 'fastapi', 'redis', 'prometheus_client', 'pydantic', 'numpy')\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('services',) + heavy))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["['services',", "'services.cli']"], out.stdout


def test_servers_load_the_stubs_but_not_the_sdk():
    """The stubs live under vlsplit/ (vlsplit.v1); importing them must not load the SDK or the client CLI."""
    code = ("import sys, services.gateway.http, services.gateway.server, services.llm_decoder.servicer, "
            "services.vision_encoder.servicer\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'vlsplit' and not m.startswith('vlsplit.v1')))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "['vlsplit']", out.stdout
