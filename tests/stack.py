"""A whole vlsplit stack in real processes: redis-server, encoder, decoder, gateway."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import grpc

from procs import Redis, Service
from services.launcher import free_port
from vlsplit.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc, vision_encoder_pb2_grpc


@dataclass
class Stack:
    model: str
    log_dir: Path
    decoder_model: str | None = None
    encoder_env: dict = field(default_factory=dict)
    decoder_env: dict = field(default_factory=dict)
    gateway_env: dict = field(default_factory=dict)
    memory_cache: bool = False  # "--redis memory" everywhere instead of a redis-server
    redis_options: tuple = ()  # extra redis-server flags

    def start(self) -> "Stack":
        self.redis = None if self.memory_cache else Redis(None, *self.redis_options).start()
        url = "memory" if self.memory_cache else self.redis.url
        self.url = url
        # the two models load side by side
        self.encoder = self.start_encoder(self.model, wait=False)
        self.decoder = self.start_decoder(self.decoder_model or self.model, wait=False)
        self.encoder.wait_serving()
        self.decoder.wait_serving()
        self.http_port = free_port()
        self.gateway = Service("gateway", "--encoder", self.encoder.address, "--decoder", self.decoder.address,
                               "--redis", url, "--http-port", str(self.http_port), env=self.gateway_env,
                               log_dir=self.log_dir).start()
        self.channel = grpc.insecure_channel(self.gateway.address,
                                             options=[("grpc.max_send_message_length", 64 << 20)])
        self.stub = gateway_pb2_grpc.GatewayStub(self.channel)
        return self

    def start_encoder(self, model: str, port: int | None = None, wait: bool = True) -> Service:
        return Service("encoder", "--model", model, "--redis", self.url, port=port, env=self.encoder_env,
                       log_dir=self.log_dir).start(wait)

    def start_decoder(self, model: str, port: int | None = None, wait: bool = True) -> Service:
        return Service("decoder", "--model", model, port=port, env=self.decoder_env,
                       log_dir=self.log_dir).start(wait)

    def redeploy(self, model: str) -> None:
        """Encoder and decoder replaced by ones serving `model`, at the same addresses (the gateway stays)."""
        for name, start in (("encoder", self.start_encoder), ("decoder", self.start_decoder)):
            old = getattr(self, name)
            old.kill()
            setattr(self, name, start(model, old.port, wait=False))  # the two load side by side
        self.encoder.wait_serving()
        self.decoder.wait_serving()

    def stop(self) -> None:
        self.channel.close()
        for service in (self.gateway, self.decoder, self.encoder):
            service.kill()
        if self.redis:
            self.redis.stop()

    @property
    def http_url(self) -> str:
        """The gateway's OpenAI-compatible API, e.g. for openai.OpenAI(base_url=...)."""
        return f"http://127.0.0.1:{self.http_port}/v1"

    def ask(self, image: bytes | str, question: str, timeout: float = 120, **sampling) -> gateway_pb2.Answer:
        return self.stub.Ask(ask_request(image, question, **sampling), timeout=timeout)

    def encoder_fingerprint(self) -> str:
        with grpc.insecure_channel(self.encoder.address) as channel:
            info = vision_encoder_pb2_grpc.VisionEncoderStub(channel).GetModelInfo(common_pb2.ModelInfoRequest(),
                                                                                  timeout=10)
        return info.fingerprint

    def encodes(self) -> float:
        return self.encoder.metric("vlsplit_encoder_encodes_total")

    def encode_requests(self) -> float:
        return self.encoder.metric("vlsplit_requests_total", method="Encode")


def image_ref(image: bytes | str) -> gateway_pb2.ImageRef:
    return gateway_pb2.ImageRef(image_id=image) if isinstance(image, str) else gateway_pb2.ImageRef(data=image)


def ask_request(image: bytes | str, question: str, **sampling) -> gateway_pb2.AskRequest:
    sampling.setdefault("max_new_tokens", 12)
    return gateway_pb2.AskRequest(image=image_ref(image), question=question,
                                  sampling=common_pb2.SamplingParams(**sampling))
