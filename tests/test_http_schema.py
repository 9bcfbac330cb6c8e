"""Schemathesis over the gateway's served OpenAPI schema (/openapi.json): generated requests for every
endpoint, valid and invalid (bounded: a few dozen examples each), against a real stack; no response is a
5xx, and every 4xx is in OpenAI's error shape."""

from __future__ import annotations

import collections

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings

pytestmark = pytest.mark.parametrize("stack", ["qwen2_vl"], indirect=True)
STATUSES: collections.Counter = collections.Counter()


def test_no_generated_request_is_a_server_error(stack):
    schema = schemathesis.openapi.from_url(stack.http_url.removesuffix("/v1") + "/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {op.path for op in operations} >= {"/v1/chat/completions", "/v1/classify", "/v1/images", "/v1/models"}
    for operation in operations:
        _fuzz(operation)
    assert STATUSES[("POST", "/v1/chat/completions", 200)] > 0  # generated chats reached the decoder too


def served_model(case):
    """Half the chat bodies name the served model, so generation reaches past the model check."""
    if isinstance(case.body, dict) and "model" in case.body and len(case.body.get("messages") or ()) % 2:
        case.body["model"] = "qwen2_vl"
    return case


def _fuzz(operation) -> None:
    @settings(max_examples=30, deadline=None, derandomize=True, database=None, phases=[Phase.explicit, Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(case=operation.as_strategy().map(served_model))
    def run(case) -> None:
        response = case.call(timeout=60)
        STATUSES[(case.method, case.path, response.status_code)] += 1
        assert response.status_code < 500, (case.method, case.path, case.body, response.text[:300])
        if response.status_code >= 400:
            error = response.json()["error"]
            assert set(error) == {"message", "type", "param", "code"}, error

    run()


def test_the_server_still_answers_after_the_run(stack):
    print("\nschemathesis responses:", dict(sorted(STATUSES.items())))
    reply = httpx.post(stack.http_url + "/chat/completions", timeout=60,
                       json={"model": "qwen2_vl", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
    assert reply.status_code == 200
