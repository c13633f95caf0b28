"""Wrap a gRPC method handler of any kind (unary or streaming, either side) in an async context manager that runs
around the whole call: what the interceptors (auth, metrics) need, written once."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractAsyncContextManager

import grpc

Around = Callable[[grpc.aio.ServicerContext], AbstractAsyncContextManager]


def wrap_handler(handler: grpc.RpcMethodHandler, around: Around) -> grpc.RpcMethodHandler:
    kwargs = {"request_deserializer": handler.request_deserializer, "response_serializer": handler.response_serializer}
    if handler.unary_unary:

        async def unary_unary(request, context):
            async with around(context):
                return await handler.unary_unary(request, context)

        return grpc.unary_unary_rpc_method_handler(unary_unary, **kwargs)
    if handler.unary_stream:

        async def unary_stream(request, context):
            async with around(context):
                async for response in _responses(handler.unary_stream(request, context)):
                    yield response

        return grpc.unary_stream_rpc_method_handler(unary_stream, **kwargs)
    if handler.stream_unary:

        async def stream_unary(requests, context):
            async with around(context):
                return await handler.stream_unary(requests, context)

        return grpc.stream_unary_rpc_method_handler(stream_unary, **kwargs)

    async def stream_stream(requests, context):
        async with around(context):
            async for response in _responses(handler.stream_stream(requests, context)):
                yield response

    return grpc.stream_stream_rpc_method_handler(stream_stream, **kwargs)


async def _responses(result):
    """A streaming handler either yields its responses or writes them with context.write and returns."""
    if hasattr(result, "__aiter__"):
        async for response in result:
            yield response
    else:
        await result
