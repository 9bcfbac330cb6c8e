"""Image-affinity routing over decoder replicas: rendezvous order, DNS replicas, failover.

Unit tests drive `routing.Router` and the pipeline's failover with fakes; service tests run one
redis-server, an encoder, three decoders and a gateway with `--decoder a,b,c` as real processes.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from conftest import make_image
from procs import Redis, Service
from stack import ask_request
from services.gateway.pipeline import ImageSource, Pipeline, question_message
from services.gateway.routing import Router, parse_targets, rendezvous
from shared.errors import Unavailable, Upstream
from vlsplit.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc, llm_decoder_pb2

REPLICAS = ["10.0.0.1:50053", "10.0.0.2:50053", "10.0.0.3:50053"]
QUESTIONS = ["What is in this picture?", "What colour is the roof?", "Is it day or night?"]


def ids(n: int) -> list[str]:
    return [hashlib.sha256(str(i).encode()).hexdigest() for i in range(n)]


# --- rendezvous order -------------------------------------------------------------------------

def test_rendezvous_order_is_deterministic_and_complete():
    for image_id in ids(20):
        order = rendezvous(image_id, REPLICAS)
        assert sorted(order) == sorted(REPLICAS)
        assert rendezvous(image_id, list(reversed(REPLICAS))) == order
        assert Router(",".join(REPLICAS), down_s=5).order(image_id) == order


def test_different_images_spread_evenly_over_three_replicas():
    firsts = Counter(rendezvous(image_id, REPLICAS)[0] for image_id in ids(300))
    assert set(firsts) == set(REPLICAS)
    assert all(0.20 <= n / 300 <= 0.47 for n in firsts.values()), firsts


def test_removing_a_replica_moves_only_its_images():
    gone = REPLICAS[1]
    for image_id in ids(300):
        before = rendezvous(image_id, REPLICAS)
        after = rendezvous(image_id, [r for r in REPLICAS if r != gone])
        assert after == [r for r in before if r != gone]  # first choice kept unless it was `gone`


def test_replica_marked_down_is_tried_last_until_it_expires_or_answers():
    now = [0.0]
    router = Router(",".join(REPLICAS), down_s=5, clock=lambda: now[0])
    image_id = ids(1)[0]
    first, *rest = router.order(image_id)
    router.mark_down(first)
    assert router.order(image_id) == rest + [first]
    now[0] = 5.1
    assert router.order(image_id)[0] == first
    router.mark_down(first)
    router.mark_up(first)
    assert router.order(image_id)[0] == first


# --- configuration: lists and DNS names --------------------------------------------------------

def test_decoder_setting_accepts_one_address_a_list_and_dns_names():
    assert [t.text for t in parse_targets("127.0.0.1:50053")] == ["127.0.0.1:50053"]
    assert [t.text for t in parse_targets(" a:1, b:2 ,c:3")] == ["a:1", "b:2", "c:3"]
    [target] = parse_targets("dns:///decoder.svc:50053")
    assert (target.host, target.port, target.literal) == ("decoder.svc", 50053, False)
    [target] = parse_targets("[::1]:50053")
    assert (target.host, target.literal) == ("::1", True)
    for bad in ["", "decoder", "decoder:port", "dns://8.8.8.8/decoder:50053"]:
        with pytest.raises(ValueError):
            parse_targets(bad)


def test_gateway_with_a_malformed_decoder_setting_fails_at_start_up():
    from services.gateway.server import build
    from shared.config import GatewayConfig

    with pytest.raises(ValueError, match="host:port"):
        build(GatewayConfig(decoder="decoder-without-port"))


def test_name_resolving_to_several_addresses_is_one_replica_each_and_re_resolved():
    answers = {"decoder": ["10.1.0.1", "10.1.0.2", "10.1.0.3"]}

    async def resolve(host, port):
        if host not in answers:
            raise OSError("name unknown")
        return answers[host]

    async def scenario():
        router = Router("dns:///decoder:50053,127.0.0.1:9", down_s=5, resolve=resolve)
        assert router.dynamic and router.replicas == ["127.0.0.1:9", "decoder:50053"]  # before resolving
        assert await router.refresh()
        assert router.replicas == ["10.1.0.1:50053", "10.1.0.2:50053", "10.1.0.3:50053", "127.0.0.1:9"]
        assert not await router.refresh()
        answers["decoder"] = ["10.1.0.1", "10.1.0.3"]
        assert await router.refresh() and "10.1.0.2:50053" not in router.replicas
        del answers["decoder"]  # a DNS failure keeps the last replicas
        assert not await router.refresh() and len(router.replicas) == 3
        answers["decoder"] = ["10.1.0.9"]  # one address: the name itself is the channel target again
        assert await router.refresh() and router.replicas == ["127.0.0.1:9", "decoder:50053"]

    asyncio.run(scenario())


def test_dual_stack_name_like_localhost_is_one_replica():
    async def scenario():
        router = Router("localhost:50053", down_s=5)  # 127.0.0.1 and ::1: one host, one replica
        await router.refresh()
        return router.replicas

    assert asyncio.run(scenario()) == ["localhost:50053"]


def test_literal_addresses_are_never_resolved():
    assert not Router("127.0.0.1:1,[::1]:2", down_s=5).dynamic


# --- failover in the pipeline, with fake decoders ----------------------------------------------

class FakeDecoder:
    def __init__(self, error: Exception | None = None, tokens_before_error: int = 0):
        self.error, self.tokens_before_error, self.calls = error, tokens_before_error, 0
        self.resumed: list[int] = []

    async def model_info(self, timeout):
        return common_pb2.ModelInfo()  # advertises no payload limit (as an older decoder): nothing to admit

    async def negotiate(self, rpc, header, fetch, timeout):
        """The answer 0, 1, 2 (continued after header.resume_token_ids), or `error` after some tokens."""
        self.calls += 1
        self.resumed = list(header.resume_token_ids)
        for token in range(len(self.resumed), self.tokens_before_error if self.error else 3):
            yield llm_decoder_pb2.GenerateResponse(token_ids=[token])
        if self.error:
            raise self.error


class FakePool:
    def __init__(self, decoders: dict[str, FakeDecoder]):
        self.decoders = decoders

    def get(self, address: str) -> FakeDecoder:
        return self.decoders[address]


def run_generate(decoders: dict[str, FakeDecoder], image_id: str, migration_limit: int = 1,
                 ) -> tuple[list[int], Router]:
    router = Router(",".join(decoders), down_s=5)
    pipeline = Pipeline(encoder=None, decoders=FakePool(decoders), router=router, cache=None, cache_ttl_s=0,
                        write_back=False, migration_limit=migration_limit)
    fetch = pipeline.fetcher(ImageSource(image_id=image_id), 10)
    header = llm_decoder_pb2.GenerateHeader(messages=[question_message("q?")])

    async def collect():
        return [t async for r in pipeline.call("Generate", header, fetch, 10) for t in r.token_ids]

    return asyncio.run(collect()), router


@pytest.mark.parametrize("error", [Unavailable("gone"), Upstream("RESOURCE_EXHAUSTED", "decoder queue full")],
                         ids=["gone", "overloaded"])
def test_gone_or_overloaded_replica_hands_the_request_to_the_next(error):
    image_id = ids(1)[0]
    first, second, third = rendezvous(image_id, REPLICAS)
    decoders = {first: FakeDecoder(error), second: FakeDecoder(), third: FakeDecoder()}
    tokens, router = run_generate(decoders, image_id)
    assert tokens == [0, 1, 2]
    assert [decoders[r].calls for r in (first, second, third)] == [1, 1, 0]
    gone = isinstance(error, Unavailable)  # a full replica answers at once: it keeps its images
    assert (router.order(image_id)[0] == first) != gone


def test_no_failover_once_tokens_were_sent_without_migration_or_for_other_errors():
    image_id = ids(2)[1]
    first, second, third = rendezvous(image_id, REPLICAS)
    for error, sent, limit in [(Unavailable("died mid-answer"), 2, 0), (Upstream("FAILED_PRECONDITION", "model"), 0, 1),
                               (Upstream("RESOURCE_EXHAUSTED", "full"), 2, 1)]:
        decoders = {first: FakeDecoder(error, tokens_before_error=sent), second: FakeDecoder(), third: FakeDecoder()}
        with pytest.raises(type(error)):
            run_generate(decoders, image_id, migration_limit=limit)
        assert decoders[second].calls == 0


def test_replica_dying_mid_answer_is_resumed_on_the_next():
    image_id = ids(2)[1]
    first, second, third = rendezvous(image_id, REPLICAS)
    decoders = {first: FakeDecoder(Unavailable("died mid-answer"), tokens_before_error=2), second: FakeDecoder(),
                third: FakeDecoder()}
    tokens, _ = run_generate(decoders, image_id)
    assert tokens == [0, 1, 2] and decoders[second].resumed == [0, 1] and decoders[third].calls == 0
    # at most migration_limit moves: a second death mid-answer ends the answer with the error
    decoders = {r: FakeDecoder(Unavailable("died"), tokens_before_error=1 + i) for i, r in enumerate((first, second))}
    decoders[third] = FakeDecoder()
    with pytest.raises(Unavailable):
        run_generate(decoders, image_id)
    assert decoders[third].calls == 0


def test_all_replicas_gone_raises_unavailable_after_trying_each():
    decoders = {r: FakeDecoder(Unavailable(f"{r} gone")) for r in REPLICAS}
    with pytest.raises(Unavailable):
        run_generate(decoders, ids(1)[0])
    assert all(d.calls == 1 for d in decoders.values())


# --- three decoder processes behind one gateway ------------------------------------------------

@dataclass
class Cluster:
    redis: Redis
    encoder: Service
    decoders: list[Service]
    gateway: Service

    @classmethod
    def start(cls, model: str, log_dir: Path) -> "Cluster":
        redis = Redis().start()
        encoder = Service("encoder", "--model", model, "--redis", redis.url, log_dir=log_dir)
        decoders = [Service("decoder", "--model", model, log_dir=log_dir) for _ in range(3)]
        cluster = cls(redis, encoder, decoders, gateway=None)
        try:
            for service in (encoder, *decoders):
                service.start(wait=False)  # load the four models side by side
            for service in (encoder, *decoders):
                service.wait_serving()
            cluster.gateway = Service("gateway", "--encoder", encoder.address, "--redis", redis.url, "--decoder",
                                      ",".join(d.address for d in decoders), log_dir=log_dir).start()
        except BaseException:
            cluster.stop()
            raise
        return cluster

    def stop(self) -> None:
        for service in (self.gateway, *self.decoders, self.encoder):
            if service is not None:
                service.kill()
        self.redis.stop()

    def ask(self, image: bytes | str, question: str) -> gateway_pb2.Answer:
        with grpc.insecure_channel(self.gateway.address) as channel:
            return gateway_pb2_grpc.GatewayStub(channel).Ask(ask_request(image, question), timeout=120)

    def addresses(self) -> list[str]:
        return [d.address for d in self.decoders]

    def generates(self) -> dict[str, float]:
        """Generate RPCs each running decoder has handled."""
        return {d.address: d.metric("vlsplit_requests_total", method="Generate") for d in self.decoders
                if d.proc.poll() is None}

    def served(self, image: bytes | str, question: str) -> tuple[gateway_pb2.Answer, str]:
        """Ask, and return (answer, the one decoder address that served it)."""
        before = self.generates()
        answer = self.ask(image, question)
        grown = [address for address, n in self.generates().items() if n > before[address]]
        assert len(grown) == 1, grown
        return answer, grown[0]


@pytest.fixture(scope="module")
def cluster(tiny_models, tmp_path_factory):
    c = Cluster.start(tiny_models["qwen2_vl"], tmp_path_factory.mktemp("routing-logs"))
    yield c
    c.stop()



def test_every_question_about_one_image_lands_on_its_replica(cluster):
    data = make_image(200, 160, seed=31)
    image_id = sha256_hex(data)
    served = [cluster.served(data if i == 0 else image_id, q)[1] for i, q in enumerate(QUESTIONS * 2)]
    assert set(served) == {rendezvous(image_id, cluster.addresses())[0]}


def test_different_images_reach_several_replicas_each_its_first_choice(cluster):
    # 12 images, not 6: all landing on one of 3 replicas by chance has probability 3^-11 (6 images: 1/243)
    addresses = cluster.addresses()
    sent_before = {r: cluster.gateway.metric("vlsplit_gateway_decoder_requests_total", replica=r) for r in addresses}
    landed = []
    for seed in range(40, 52):
        answer, replica = cluster.served(make_image(96, 80, seed=seed), QUESTIONS[0])
        assert replica == rendezvous(answer.image_id, addresses)[0]
        landed.append(replica)
    assert len(set(landed)) >= 2
    for r in addresses:
        sent = cluster.gateway.metric("vlsplit_gateway_decoder_requests_total", replica=r) - sent_before[r]
        assert sent == landed.count(r)


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_killing_an_images_replica_moves_its_questions_with_no_failed_request(cluster):
    """The module's last test: it kills one of the shared cluster's decoders."""
    c = cluster
    data = make_image(220, 180, seed=32)
    image_id = sha256_hex(data)
    first, second, _ = rendezvous(image_id, c.addresses())
    before = [c.served(data if i == 0 else image_id, q) for i, q in enumerate(QUESTIONS)]
    assert {replica for _, replica in before} == {first}

    next(d for d in c.decoders if d.address == first).kill()
    after = [c.served(image_id, q) for q in QUESTIONS]  # raises on any failed request

    assert {replica for _, replica in after} == {second}
    assert [list(a.token_ids) for a, _ in after] == [list(a.token_ids) for a, _ in before]
    assert c.gateway.metric("vlsplit_gateway_failovers_total", reason="unavailable") > 0
