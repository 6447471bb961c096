"""The JSON Schema of every request and reply on the wire, as one document.

The schema describes the JSON codec. A MessagePack message is a map with the
same fields and value types. Byte limits, nesting depth and the NUL check are
enforced by `events.limits` after decoding and are not expressed here.
"""

from __future__ import annotations

from typing import Any

import msgspec

from events.types import Reply, Request

__all__ = ["SCHEMA_DIALECT", "schema_document"]

SCHEMA_DIALECT = "https://json-schema.org/draft/2020-12/schema"

_REF_TEMPLATE = "#/$defs/{name}"

_DESCRIPTION = (
    "Requests and replies of the tiermem wire protocol in the JSON codec. A "
    "MessagePack message is a map with the same fields and value types. The "
    "server also enforces byte limits, a maximum nesting depth and a ban on NUL "
    "bytes in ids, namespaces, keys and tags, which this schema does not express "
    "(docs/protocol.md lists them)."
)


def schema_document() -> dict[str, Any]:
    """Build the JSON Schema document of the Request and Reply unions.

    `requests` and `replies` are references to the two unions, which sit in
    `$defs` as `Request` and `Reply` next to the schema of each message type.
    Validate a message against `requests` or `replies`, because the document
    root itself constrains nothing.
    """
    (request_schema, reply_schema), definitions = msgspec.json.schema_components(
        (Request, Reply), ref_template=_REF_TEMPLATE
    )
    for name, union_schema in (("Request", request_schema), ("Reply", reply_schema)):
        if name in definitions:
            raise ValueError(
                f"the message type {name!r} has the same $defs name as the "
                f"{name} union. Rename the type."
            )
        definitions[name] = union_schema

    return {
        "$schema": SCHEMA_DIALECT,
        "title": "tiermem wire protocol",
        "description": _DESCRIPTION,
        "requests": {"$ref": _REF_TEMPLATE.format(name="Request")},
        "replies": {"$ref": _REF_TEMPLATE.format(name="Reply")},
        "$defs": definitions,
    }
