"""A tiny HTTP/1.1 client for the tests (h11 over trio TCP), and a check of
responses against the OpenAPI document the server serves."""

from __future__ import annotations

import json
from typing import Any, Iterable

import attrs
import h11
import pytest
import trio


# -- a tiny HTTP/1.1 client: h11 over trio TCP ------------------------------------------


@attrs.frozen
class HttpResponse:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        assert self.headers.get("content-type", "").startswith("application/json"), (
            self.status, self.headers, self.body[:200],
        )
        return json.loads(self.body)


NO_BODY = object()


async def http(
    address: tuple[str, int],
    method: str,
    target: str,
    json_body: Any = NO_BODY,
    *,
    body: bytes | None = None,
    headers: Iterable[tuple[str, str]] = (),
    chunks: list[bytes] | None = None,
    finish_body: bool = True,
) -> HttpResponse:
    """One request on a fresh connection (``Connection: close``), as curl sends it.

    ``chunks`` sends a chunked body; ``finish_body=False`` sends the headers
    (and ``body``) but never ends the request (a Content-Length that lies).
    """
    host, port = address
    host_header = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    headers = list(headers)
    all_headers = [("Connection", "close"), *headers]
    if not any(k.lower() == "host" for k, _ in headers):  # a test may pose as another host
        all_headers.insert(0, ("Host", host_header))
    if json_body is not NO_BODY:
        body = json.dumps(json_body).encode()
    if (json_body is not NO_BODY or body or chunks is not None) and not any(
        k.lower() == "content-type" for k, _ in all_headers
    ):
        all_headers.append(("Content-Type", "application/json"))
    has_length = any(k.lower() == "content-length" for k, _ in all_headers)
    if chunks is not None:
        all_headers.append(("Transfer-Encoding", "chunked"))
    elif not has_length and (body is not None or method == "POST"):
        all_headers.append(("Content-Length", str(len(body or b""))))

    stream = await trio.open_tcp_stream(host, port)
    async with stream:
        conn = h11.Connection(h11.CLIENT)
        await stream.send_all(conn.send(h11.Request(method=method, target=target, headers=all_headers)))
        for piece in chunks if chunks is not None else ([body] if body else []):
            await stream.send_all(conn.send(h11.Data(data=piece)))
        if finish_body:
            await stream.send_all(conn.send(h11.EndOfMessage()))
        response = await read_response(conn, stream, closing_ends_it=True)
    return response


async def read_response(
    conn: h11.Connection, stream: trio.SocketStream, *, closing_ends_it: bool
) -> HttpResponse:
    """The next response on ``conn``. The server closing the connection ends
    it too if ``closing_ends_it``; otherwise that fails the test."""
    status, headers, data = 0, {}, bytearray()
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            conn.receive_data(await stream.receive_some(65536))
        elif isinstance(event, h11.Response):
            status = event.status_code
            headers = {k.decode().lower(): v.decode() for k, v in event.headers}
        elif isinstance(event, h11.Data):
            data += event.data
        elif isinstance(event, h11.EndOfMessage):
            return HttpResponse(status, headers, bytes(data))
        elif isinstance(event, h11.ConnectionClosed):
            if closing_ends_it:
                return HttpResponse(status, headers, bytes(data))
            raise AssertionError("the server ended the connection before its answer")


# -- checking responses against the /openapi.json the server serves -----------------------


def check_openapi(document: dict, method: str, path: str, response: HttpResponse) -> None:
    """``response`` is documented for (path, method, status) and matches its schema."""
    responses = document["paths"][path][method.lower()]["responses"]
    assert str(response.status) in responses, f"{method} {path} {response.status} is not documented"
    content = responses[str(response.status)]["content"]
    media = "application/json" if "application/json" in content else next(iter(content))
    assert response.headers["content-type"].startswith(media), (response.headers, media)
    if media != "application/json":
        return
    jsonschema = pytest.importorskip("jsonschema")
    referencing = pytest.importorskip("referencing")
    from referencing.jsonschema import DRAFT202012

    resource = referencing.Resource.from_contents(document, default_specification=DRAFT202012)
    registry = referencing.Registry().with_resource("urn:openapi", resource)
    schema = dict(content[media]["schema"])
    if "$ref" in schema:
        schema = {"$ref": "urn:openapi" + schema["$ref"]}
    else:
        schema["$id"] = "urn:openapi-inline"
    validator = jsonschema.Draft202012Validator(
        schema, registry=registry, format_checker=jsonschema.FormatChecker()
    )
    errors = sorted(validator.iter_errors(response.json()), key=str)
    assert not errors, f"{method} {path} {response.status}: {errors[0]}"


def samples(text: str) -> dict[str, float]:
    """Prometheus text -> {"name{label=value}": value}."""
    from prometheus_client.parser import text_string_to_metric_families

    values: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
            values[sample.name + (f"{{{labels}}}" if labels else "")] = sample.value
    return values
