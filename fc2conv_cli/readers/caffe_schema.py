"""Caffe's message classes, built at run time from the shipped ``caffe.proto``.

No generated ``caffe_pb2.py``: generated code is tied to the protoc that wrote it (newer
runtimes refuse older gencode, and the other way round), while a ``FileDescriptorProto``
loads into any protobuf runtime from 4.21 on. The schema goes into a private descriptor
pool, so it cannot clash with another ``caffe.proto`` (pycaffe's, OpenCV's) in the process.

The parser reads the proto2 subset that file uses: ``syntax``, ``package``, nested
``message`` and ``enum`` blocks, ``optional`` / ``repeated`` fields with ``default`` and
``packed`` options, and comments.
"""

from __future__ import annotations

import functools
import re
from importlib import resources
from types import SimpleNamespace
from typing import Any

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

__all__ = ["messages", "parse_proto"]

_FieldProto = descriptor_pb2.FieldDescriptorProto
_SCALARS = {
    "double": _FieldProto.TYPE_DOUBLE, "float": _FieldProto.TYPE_FLOAT,
    "int64": _FieldProto.TYPE_INT64, "uint64": _FieldProto.TYPE_UINT64,
    "int32": _FieldProto.TYPE_INT32, "uint32": _FieldProto.TYPE_UINT32,
    "sint32": _FieldProto.TYPE_SINT32, "sint64": _FieldProto.TYPE_SINT64,
    "fixed32": _FieldProto.TYPE_FIXED32, "fixed64": _FieldProto.TYPE_FIXED64,
    "sfixed32": _FieldProto.TYPE_SFIXED32, "sfixed64": _FieldProto.TYPE_SFIXED64,
    "bool": _FieldProto.TYPE_BOOL, "string": _FieldProto.TYPE_STRING,
    "bytes": _FieldProto.TYPE_BYTES,
}  # fmt: skip
_LABELS = {
    "optional": _FieldProto.LABEL_OPTIONAL,
    "repeated": _FieldProto.LABEL_REPEATED,
    "required": _FieldProto.LABEL_REQUIRED,
}
_TOKENS = re.compile(
    r"""(?P<skip>\s+|//[^\n]*|/\*.*?\*/)
      | (?P<string>"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*')
      | (?P<number>[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)
      | (?P<word>[A-Za-z_][\w.]*)
      | (?P<symbol>[{}\[\]=;,])""",
    re.S | re.X,
)


@functools.lru_cache(maxsize=1)
def messages() -> SimpleNamespace:
    """The shipped schema's message classes (``NetParameter``, ...) and top-level enum
    values (``FLOAT16``, ...) by name."""
    text = resources.files(__package__).joinpath("caffe.proto").read_text("utf-8")
    file_proto = parse_proto(text, "fc2conv/caffe.proto")
    pool = descriptor_pool.DescriptorPool()
    pool.AddSerializedFile(file_proto.SerializeToString())
    classes = {}
    for message in file_proto.message_type:
        descriptor = pool.FindMessageTypeByName(f"{file_proto.package}.{message.name}")
        classes[message.name] = _message_class(descriptor)
    for enum in file_proto.enum_type:  # top-level enum values: FLOAT16, TEST, ...
        classes.update((value.name, value.number) for value in enum.value)
    return SimpleNamespace(**classes)


def _message_class(descriptor: Any) -> type:
    get_class = getattr(message_factory, "GetMessageClass", None)
    if get_class is not None:  # protobuf >= 4.22
        return get_class(descriptor)
    return message_factory.MessageFactory(descriptor.file.pool).GetPrototype(descriptor)


def parse_proto(text: str, name: str) -> descriptor_pb2.FileDescriptorProto:
    """A ``FileDescriptorProto`` for proto2 ``text``; ``ValueError`` on what it cannot read."""
    parser = _Parser(_tokenize(text))
    file_proto = descriptor_pb2.FileDescriptorProto(name=name)  # proto2: the default
    parser.file(file_proto)
    _resolve_types(file_proto)
    return file_proto


def _tokenize(text: str) -> list[tuple[str, str]]:
    tokens: list[tuple[str, str]] = []
    pos = 0
    while pos < len(text):
        match = _TOKENS.match(text, pos)
        if match is None:
            raise ValueError(f"caffe.proto: cannot read {text[pos : pos + 20]!r}")
        if match.lastgroup is not None and match.lastgroup != "skip":
            tokens.append((match.lastgroup, match.group()))
        pos = match.end()
    return tokens


class _Parser:
    """A recursive-descent reader over the token list."""

    def __init__(self, tokens: list[tuple[str, str]]) -> None:
        self.tokens = tokens
        self.at = 0

    def peek(self) -> str:
        return self.tokens[self.at][1] if self.at < len(self.tokens) else ""

    def take(self, expected: str | None = None, kind: str | None = None) -> str:
        if self.at >= len(self.tokens):
            raise ValueError("caffe.proto: unexpected end")
        got_kind, value = self.tokens[self.at]
        if (expected is not None and value != expected) or (kind is not None and got_kind != kind):
            raise ValueError(f"caffe.proto: expected {expected or kind}, got {value!r}")
        self.at += 1
        return value

    def file(self, file_proto: descriptor_pb2.FileDescriptorProto) -> None:
        while self.at < len(self.tokens):
            word = self.take(kind="word")
            if word == "syntax":
                self.take("=")
                if self.take(kind="string").strip("\"'") != "proto2":
                    raise ValueError("caffe.proto: only proto2 is supported")
                self.take(";")
            elif word == "package":
                file_proto.package = self.take(kind="word")
                self.take(";")
            elif word == "message":
                self.message(file_proto.message_type.add())
            elif word == "enum":
                self.enum(file_proto.enum_type.add())
            else:
                raise ValueError(f"caffe.proto: unexpected {word!r} at the top level")

    def message(self, message: descriptor_pb2.DescriptorProto) -> None:
        message.name = self.take(kind="word")
        self.take("{")
        while self.peek() != "}":
            word = self.take(kind="word")
            if word == "message":
                self.message(message.nested_type.add())
            elif word == "enum":
                self.enum(message.enum_type.add())
            elif word in _LABELS:
                self.field(message.field.add(), _LABELS[word])
            else:
                raise ValueError(f"caffe.proto: unexpected {word!r} in message {message.name}")
        self.take("}")

    def enum(self, enum: descriptor_pb2.EnumDescriptorProto) -> None:
        enum.name = self.take(kind="word")
        self.take("{")
        while self.peek() != "}":
            value = enum.value.add(name=self.take(kind="word"))
            self.take("=")
            value.number = int(self.take(kind="number"))
            self.take(";")
        self.take("}")

    def field(self, field: descriptor_pb2.FieldDescriptorProto, label: int) -> None:
        field.label = label
        type_name = self.take(kind="word")
        if type_name in _SCALARS:
            field.type = _SCALARS[type_name]
        else:
            field.type_name = type_name  # resolved once every message is known
        field.name = self.take(kind="word")
        self.take("=")
        field.number = int(self.take(kind="number"))
        if self.peek() == "[":
            self.take("[")
            while True:
                self.option(field)
                if self.take() == "]":
                    break
        self.take(";")

    def option(self, field: descriptor_pb2.FieldDescriptorProto) -> None:
        key = self.take(kind="word")
        self.take("=")
        kind, value = self.tokens[self.at]
        self.take()
        if key == "packed":
            field.options.packed = value == "true"
        elif key == "default":
            field.default_value = value[1:-1] if kind == "string" else value
        else:
            raise ValueError(f"caffe.proto: unsupported option {key!r} on {field.name}")


def _resolve_types(file_proto: descriptor_pb2.FileDescriptorProto) -> None:
    """Turn each field's relative type name into a full one, by protobuf's scoping rules."""
    kinds: dict[str, int] = {}
    package = f".{file_proto.package}"

    def collect(scope: str, message_types: Any, enum_types: Any) -> None:
        for enum in enum_types:
            kinds[f"{scope}.{enum.name}"] = _FieldProto.TYPE_ENUM
        for message in message_types:
            kinds[f"{scope}.{message.name}"] = _FieldProto.TYPE_MESSAGE
            collect(f"{scope}.{message.name}", message.nested_type, message.enum_type)

    def resolve(scope: str, message_types: Any) -> None:
        for message in message_types:
            inner = f"{scope}.{message.name}"
            for field in message.field:
                if field.type_name:
                    full = _lookup(kinds, inner, field.type_name)
                    field.type_name, field.type = full, kinds[full]
            resolve(inner, message.nested_type)

    collect(package, file_proto.message_type, file_proto.enum_type)
    resolve(package, file_proto.message_type)


def _lookup(kinds: dict[str, int], scope: str, name: str) -> str:
    while True:
        candidate = f"{scope}.{name}"
        if candidate in kinds:
            return candidate
        if not scope:
            raise ValueError(f"caffe.proto: unknown type {name!r}")
        scope = scope.rpartition(".")[0]
