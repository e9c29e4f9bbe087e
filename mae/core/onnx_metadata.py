"""The `metadata_props` of an ONNX file, read without `onnx`, and the check that they agree with `mae.json`.

Every graph `mae export` writes describes itself (`mae.part`, `mae.config`, `mae.preprocessing`, `mae.precision`,
... see `mae.export.metadata`). A manifest edited by hand, or copied from another export, would otherwise run
these graphs with the wrong patch grid, pre-processing or meaning; `check_graph_metadata` refuses that when a
bundle opens a graph.

The reader walks only the top-level fields of the ModelProto (protobuf wire format) and seeks over all but
`metadata_props` (field 14), so the graph (field 7, up to gigabytes) is never read: a few kilobytes per file.

Stdlib only (the runtime imports neither onnx nor torch).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from .config import MAEConfig, shown
from .errors import MAEError

if TYPE_CHECKING:
    from .bundle import Bundle

PREFIX = "mae."
METADATA_PROPS = 14  # ModelProto.metadata_props: repeated StringStringEntryProto {key = 1, value = 2}
_VARINT, _FIXED64, _LENGTH_DELIMITED, _FIXED32 = 0, 1, 2, 5


class _Truncated(Exception):
    pass


def _varint(stream: IO[bytes]) -> tuple[int, int]:
    """(value, bytes read) of one base-128 varint."""
    value = shift = 0
    for count in range(1, 11):
        byte = stream.read(1)
        if not byte:
            raise _Truncated
        value |= (byte[0] & 0x7F) << shift
        if not byte[0] & 0x80:
            return value, count
        shift += 7
    raise ValueError("a varint longer than 10 bytes")


def _entry(data: bytes) -> tuple[str, str]:
    """(key, value) of one serialized StringStringEntryProto."""
    fields = {1: "", 2: ""}
    pos = 0
    while pos < len(data):
        tag, pos = _varint_at(data, pos)
        number, wire = tag >> 3, tag & 7
        if wire == _VARINT:
            _, pos = _varint_at(data, pos)
        elif wire == _LENGTH_DELIMITED:
            length, pos = _varint_at(data, pos)
            if pos + length > len(data):
                raise ValueError("a metadata entry runs past its end")
            if number in fields:
                fields[number] = data[pos : pos + length].decode("utf-8", errors="replace")
            pos += length
        elif wire in (_FIXED64, _FIXED32):
            pos += 8 if wire == _FIXED64 else 4
        else:
            raise ValueError(f"wire type {wire} in a metadata entry")
    if pos != len(data):
        raise ValueError("a metadata entry runs past its end")
    return fields[1], fields[2]


def _varint_at(data: bytes, pos: int) -> tuple[int, int]:
    """(value, position after it) of the varint at data[pos]."""
    value = shift = 0
    for index in range(pos, min(pos + 10, len(data))):
        value |= (data[index] & 0x7F) << shift
        if not data[index] & 0x80:
            return value, index + 1
        shift += 7
    raise ValueError("a truncated varint in a metadata entry")


def read_metadata_props(path: str | os.PathLike) -> dict[str, str]:
    """All `metadata_props` of an ONNX model file as {key: value} (a repeated key: the last one wins, as in
    `onnx`). Reads the top-level field headers and the metadata entries only; every other field is skipped by a
    seek. An MAEError when the file is not a well-formed protobuf message."""
    path = Path(path)
    props: dict[str, str] = {}
    with open(path, "rb") as stream:
        size = os.fstat(stream.fileno()).st_size
        pos = 0
        try:
            while pos < size:
                tag, count = _varint(stream)
                pos += count
                number, wire = tag >> 3, tag & 7
                if number == 0:
                    raise ValueError("field number 0")
                if wire == _VARINT:
                    pos += _varint(stream)[1]
                    continue
                if wire == _LENGTH_DELIMITED:
                    length, count = _varint(stream)
                    pos += count
                elif wire in (_FIXED64, _FIXED32):
                    length = 8 if wire == _FIXED64 else 4
                else:  # 3, 4: groups, which ONNX never writes; 6, 7: invalid
                    raise ValueError(f"wire type {wire} at the top level")
                if pos + length > size:
                    raise _Truncated
                if number == METADATA_PROPS and wire == _LENGTH_DELIMITED:
                    key, value = _entry(stream.read(length))
                    props[key] = value
                else:
                    stream.seek(length, os.SEEK_CUR)
                pos += length
        except _Truncated:
            raise MAEError(
                f"{path} is not a complete ONNX model: it ends inside a field (byte {pos} of {size}).",
                hint="restore the file, or export the bundle again",
            ) from None
        except ValueError as exc:
            raise MAEError(
                f"{path} is not an ONNX model (its protobuf is malformed near byte {pos}: {exc}).",
                hint="restore the file, or export the bundle again",
            ) from None
    return props


def _decoded(raw: dict[str, str], key: str, path: Path) -> Any:
    try:
        return json.loads(raw[key])
    except ValueError as exc:
        raise MAEError(
            f"{path} carries unreadable {PREFIX}{key} metadata ({exc}).", hint="export the bundle again"
        ) from None


def check_graph_metadata(bundle: Bundle, part: str, precision: str, path: Path) -> None:
    """Refuse a graph whose own metadata (written by `mae export`) disagrees with the bundle's mae.json about what
    it is: part, precision, architecture, input size, mean and std. A graph without mae metadata (another producer,
    an older mae) passes."""
    raw = {key[len(PREFIX) :]: value for key, value in read_metadata_props(path).items() if key.startswith(PREFIX)}
    if not raw:
        return
    source = f"mae.json in {bundle.path}"
    hint = f"restore the original mae.json, or re-export the bundle (mae export WEIGHTS --out {bundle.path})"
    for key, listed in (("part", part), ("precision", precision)):
        if key in raw and raw[key] != listed:
            raise MAEError(
                f"{source} lists {path.name} as the {precision} {part}, but the graph says it is the "
                f"{raw.get('precision', precision)} {raw.get('part', part)}: the manifest was edited or belongs to "
                "another export.",
                hint=hint,
            )
    says: list[tuple[str, Any, Any]] = []  # (field, mae.json's value, the graph's value)
    if "config" in raw:
        exported = MAEConfig.from_dict(
            _decoded(raw, "config", path), source=f"{path} metadata", key=f"{PREFIX}config", hint="export it again"
        )
        for field in dataclasses.fields(exported):
            ours, theirs = getattr(bundle.config, field.name), getattr(exported, field.name)
            if ours != theirs:
                says.append((field.name, ours, theirs))
    if "preprocessing" in raw:
        pre = type(bundle.preprocessing).from_dict(
            _decoded(raw, "preprocessing", path), source=f"{path} metadata", hint="export it again"
        )
        if pre.size != bundle.preprocessing.size:
            says.append(("preprocessing.size", bundle.preprocessing.size, pre.size))
        for name in ("mean", "std"):
            ours, theirs = getattr(bundle.preprocessing, name), getattr(pre, name)
            if not all(math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-9) for a, b in zip(ours, theirs, strict=True)):
                says.append((f"preprocessing.{name}", list(ours), list(theirs)))
    if says:
        listed = ", ".join(f"{name} {shown(value)}" for name, value, _ in says)
        exported_for = ", ".join(f"{name} {shown(value)}" for name, _, value in says)
        raise MAEError(
            f"{source} says {listed} but {path.name} was exported for {exported_for}: the manifest was edited or "
            "belongs to another export.",
            hint=hint,
        )
