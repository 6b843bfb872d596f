"""The standard services next to Generation: health checking and server reflection."""

from __future__ import annotations

from google.protobuf.descriptor_pool import DescriptorPool
from google.protobuf.message_factory import GetMessageClass
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

from tandem.core.tokenizer import Tokenizer
from tests.gateway.conftest import Gateway
from tests.gateway.fake_worker import FakeWorker, expected_output


def test_health_reports_serving(gateway: Gateway) -> None:
    stub = health_pb2_grpc.HealthStub(gateway.channel)
    for service in ("", "tandem.v1.Generation"):
        reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_client_built_from_reflection_alone(
    gateway: Gateway, fake_worker: FakeWorker, tokenizer: Tokenizer
) -> None:
    db = ProtoReflectionDescriptorDatabase(gateway.channel)
    services = db.get_services()
    assert "tandem.v1.Generation" in services
    assert "grpc.health.v1.Health" in services

    pool = DescriptorPool(db)
    method = pool.FindServiceByName("tandem.v1.Generation").methods_by_name["Generate"]
    assert method.server_streaming and not method.client_streaming
    request_cls = GetMessageClass(method.input_type)
    response_cls = GetMessageClass(method.output_type)
    request = request_cls(prompt="reflection works 🙂")
    request.sampling.max_tokens = 6

    call = gateway.channel.unary_stream(
        "/tandem.v1.Generation/Generate",
        request_serializer=request_cls.SerializeToString,
        response_deserializer=response_cls.FromString,
    )
    responses = list(call(request, timeout=10))
    assert len(responses) > 1
    finish = pool.FindEnumTypeByName("tandem.v1.FinishReason")
    assert responses[-1].finish_reason == finish.values_by_name["FINISH_REASON_LENGTH"].number
    tokens = [t for r in responses for t in r.token_ids]
    assert tokens == expected_output(tokenizer.encode("reflection works 🙂"), 6)
    assert "".join(r.text for r in responses) == tokenizer.decode(tokens)
