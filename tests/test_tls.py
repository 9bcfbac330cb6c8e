"""TLS on every hop, with throwaway CAs (trustme) and real processes: encoders and decoders accept only
callers holding a certificate from their client CA (mutual TLS), the gateway serves TLS to
`vlsplit ask --tls-ca`, Redis is reached over `rediss://` with a password, and rotated certificates are
picked up by servers and by the gateway's channels without a restart."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
import trustme
from grpc_health.v1 import health_pb2, health_pb2_grpc

from procs import Redis, Service, free_port, running
from reference import reference_tokens
from shared.images import load_image
from vlsplit.v1 import common_pb2, llm_decoder_pb2_grpc, vision_encoder_pb2_grpc

SAMPLE = Path(__file__).resolve().parent.parent / "docs" / "sample.png"
NAMES = ("localhost", "127.0.0.1")  # the servers' certificates: every service is dialled by these here
STUBS = {"encoder": vision_encoder_pb2_grpc.VisionEncoderStub, "decoder": llm_decoder_pb2_grpc.LLMDecoderStub}


@dataclass
class Pem:
    cert: Path
    key: Path


class Pki:
    """CAs and certificates written as PEM files under `root`; rewriting a file is a rotation."""

    def __init__(self, root: Path):
        self.root = root
        self.cas = {name: trustme.CA() for name in ("one", "two", "rogue")}
        for name, ca in self.cas.items():
            ca.cert_pem.write_to_path(str(root / f"ca-{name}.pem"))

    def ca(self, *names: str) -> Path:
        """A CA bundle file of `names` (one file per combination)."""
        path = self.root / f"bundle-{'-'.join(names)}.pem"
        path.write_bytes(b"".join(self.cas[n].cert_pem.bytes() for n in names))
        return path

    def issue(self, ca: str, label: str, *names: str) -> Pem:
        pem = Pem(self.root / f"{label}.crt", self.root / f"{label}.key")
        self.write(pem, ca, *(names or (label,)))
        return pem

    def write(self, pem: Pem, ca: str, *names: str) -> None:
        """(Re)write `pem`'s files in place with a new certificate from `ca`."""
        cert = self.cas[ca].issue_cert(*names)
        pem.key.write_bytes(cert.private_key_pem.bytes())
        pem.cert.write_bytes(b"".join(p.bytes() for p in cert.cert_chain_pems))


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Pki:
    return Pki(tmp_path_factory.mktemp("pki"))


def model_info(address: str, kind: str, ca: Path | None = None, client: Pem | None = None):
    """GetModelInfo over plaintext (no `ca`) or TLS; the grpc error code name, or the reply."""
    if ca is None:
        channel = grpc.insecure_channel(address)
    else:
        credentials = grpc.ssl_channel_credentials(
            root_certificates=ca.read_bytes(), private_key=client.key.read_bytes() if client else None,
            certificate_chain=client.cert.read_bytes() if client else None)
        channel = grpc.secure_channel(address, credentials, options=[("grpc.ssl_target_name_override", "localhost")])
    with channel:
        try:
            return STUBS[kind](channel).GetModelInfo(common_pb2.ModelInfoRequest(), timeout=10)
        except grpc.RpcError as exc:
            return exc.code().name


def tls_env(server: Pem, client_ca: Path | None = None) -> dict:
    env = {"VLSPLIT_TLS_CERT": str(server.cert), "VLSPLIT_TLS_KEY": str(server.key)}
    if client_ca:
        env["VLSPLIT_TLS_CLIENT_CA"] = str(client_ca)
    return env


# both model services share the TLS server (shared/server.py); the encoder's refusal of a client certificate
# of an untrusted CA also runs in test_whole_stack_over_tls_with_rotation
@pytest.mark.parametrize("kind", [pytest.param("encoder", marks=pytest.mark.slow), "decoder"])
def test_model_services_accept_only_clients_with_a_certificate_from_their_ca(kind, pki, tiny_models, tmp_path):
    server = pki.issue("one", f"{kind}-server", *NAMES)
    gateway_cert, rogue_cert = pki.issue("one", "gateway-client"), pki.issue("rogue", "rogue-client")
    ca = pki.ca("one")
    service = Service(kind, "--model", tiny_models["qwen2_vl"], env=tls_env(server, client_ca=ca), tls=True,
                      log_dir=tmp_path)
    with running(service):
        assert model_info(service.address, kind) == "UNAVAILABLE"  # plaintext: no handshake
        assert model_info(service.address, kind, ca) == "UNAVAILABLE"  # TLS without a client certificate
        assert model_info(service.address, kind, ca, rogue_cert) == "UNAVAILABLE"  # another CA's certificate
        info = model_info(service.address, kind, ca, gateway_cert)
        assert not isinstance(info, str) and info.model_type == "qwen2_vl"
        # the plaintext health port (for Kubernetes' grpc probes) serves health and nothing else
        health_address = f"127.0.0.1:{service.health_port}"
        with grpc.insecure_channel(health_address) as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        assert model_info(health_address, kind) == "UNIMPLEMENTED"


def ask(gateway: Service, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vlsplit.cli", "ask", str(SAMPLE), "What is this?", "--json",
                           "--max-new-tokens", "6", "--timeout", "60", "--gateway", f"localhost:{gateway.port}", *extra],
                          capture_output=True, text=True)


def health(gateway: Service, ca: Path) -> str:
    out = subprocess.run([sys.executable, "-m", "vlsplit.cli", "health", f"localhost:{gateway.port}", "--tls-ca",
                          str(ca), "--timeout", "5"], capture_output=True, text=True)
    return out.stdout.strip()


def test_whole_stack_over_tls_with_rotation(pki, tiny_models, tmp_path):
    model = tiny_models["qwen2_vl"]
    ca_one = pki.ca("one")
    redis_cert = pki.issue("one", "redis-server", *NAMES)
    password = "tls-stack-password"
    redis_port = free_port()
    redis = Redis(0, "--port", "0", "--tls-port", str(redis_port), "--tls-cert-file", str(redis_cert.cert),
                  "--tls-key-file", str(redis_cert.key), "--tls-ca-cert-file", str(ca_one),
                  "--tls-auth-clients", "no", "--requirepass", password)
    redis_url = f"rediss://localhost:{redis_port}/0"
    redis_env = {"VLSPLIT_REDIS_PASSWORD": password, "VLSPLIT_REDIS_TLS_CA": str(ca_one)}
    # the model tiers trust client certificates of CA "one"; the file is rewritten to rotate
    client_ca = pki.ca("one")
    model_ca = tmp_path / "model-client-ca.pem"
    model_ca.write_bytes(client_ca.read_bytes())
    encoder = Service("encoder", "--model", model, "--redis", redis_url, tls=True, log_dir=tmp_path,
                      env={**tls_env(pki.issue("one", "encoder", *NAMES), model_ca), **redis_env})
    decoder = Service("decoder", "--model", model, tls=True, log_dir=tmp_path,
                      env=tls_env(pki.issue("one", "decoder", *NAMES), model_ca))
    gateway_server = pki.issue("one", "gateway-server", *NAMES)
    gateway_client = pki.issue("one", "gateway-upstream")
    with running(redis, encoder, decoder):
        gateway = Service("gateway", "--encoder", encoder.address, "--decoder", decoder.address,
                          "--redis", redis_url, tls=True, log_dir=tmp_path,
                          env={**tls_env(gateway_server), **redis_env,
                               "VLSPLIT_UPSTREAM_TLS_CA": str(ca_one),
                               "VLSPLIT_UPSTREAM_TLS_CERT": str(gateway_client.cert),
                               "VLSPLIT_UPSTREAM_TLS_KEY": str(gateway_client.key),
                               "VLSPLIT_UPSTREAM_TLS_SERVER_NAME": "localhost"})
        with running(gateway):
            first = ask(gateway, "--tls-ca", str(ca_one))
            assert first.returncode == 0, first.stderr
            answer = json.loads(first.stdout)
            image = load_image(SAMPLE.read_bytes())
            assert answer["token_ids"] == reference_tokens(model, [image], answer["question"], 6)
            assert answer["cache"] == "miss"
            assert json.loads(ask(gateway, "--tls-ca", str(ca_one)).stdout)["cache"] == "hit"  # Redis over TLS
            assert gateway.metric("vlsplit_cache_errors_total") == 0
            plain = ask(gateway)
            assert plain.returncode == 1 and "UNAVAILABLE" in plain.stderr
            assert health(gateway, pki.ca("two")) == "UNAVAILABLE"  # a CA that did not sign it

            # rotation 1: the gateway's server certificate is now from CA "two" (same paths, no restart)
            pki.write(Pem(gateway_server.cert, gateway_server.key), "two", *NAMES)
            assert health(gateway, pki.ca("two")) == "SERVING"
            assert health(gateway, ca_one) == "UNAVAILABLE"

            # rotation 2: the model tiers accept CA "two" as well, the gateway's client certificate moves to
            # CA "two", then the model tiers drop CA "one": new questions still work end to end
            model_ca.write_bytes(pki.ca("one", "two").read_bytes())
            pki.write(Pem(gateway_client.cert, gateway_client.key), "two", "gateway-upstream")
            model_ca.write_bytes(pki.ca("two").read_bytes())
            old_client = pki.issue("one", "old-gateway-client")
            assert model_info(encoder.address, "encoder", ca_one, old_client) == "UNAVAILABLE"
            # a restarted decoder forces a new handshake: only the rotated client certificate passes it
            decoder.kill()
            decoder = Service("decoder", "--model", model, port=decoder.port, tls=True, log_dir=tmp_path,
                              env=decoder.env)
            decoder.start()
            other = subprocess.run([sys.executable, "-m", "vlsplit.cli", "ask", str(SAMPLE), "Is it day?", "--json",
                                    "--max-new-tokens", "4", "--gateway", f"localhost:{gateway.port}",
                                    "--tls-ca", str(pki.ca("two"))], capture_output=True, text=True)
            assert other.returncode == 0, other.stderr + gateway.tail()
            decoder.kill()


def test_plaintext_on_a_non_loopback_address_is_warned_about(tmp_path):
    gateway = Service("gateway", "--encoder", f"127.0.0.1:{free_port()}", "--decoder", f"127.0.0.1:{free_port()}",
                      "--redis", "memory", host="0.0.0.0", log_dir=tmp_path)
    with running(gateway):
        assert "not a loopback address" in gateway.tail(200)
    loopback = Service("gateway", "--encoder", f"127.0.0.1:{free_port()}", "--decoder", f"127.0.0.1:{free_port()}",
                       "--redis", "memory", log_dir=tmp_path)
    with running(loopback):
        assert "not a loopback address" not in loopback.tail(200)
