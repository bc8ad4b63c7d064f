"""The pieces of a SentencePiece ``tokenizer.model`` (its ModelProto), read without the sentencepiece package.

The file is a protobuf message; a vocabulary needs only its repeated field 1 (``SentencePiece {string piece = 1;
float score = 2; Type type = 3 [default = NORMAL];}``). This small wire-format reader gives each piece's text, score
and type as ``SentencePieceProcessor`` does (IdToPiece, GetScore, IsUnknown/IsControl/IsUnused/IsByte), so the GGUF
vocabulary equals what llama.cpp's converter writes with the sentencepiece package."""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

from ..errors import ModelError

# SentencePiece's ModelProto.SentencePiece.Type
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6


@dataclass(frozen=True)
class Piece:
    text: str
    score: float
    type: int = NORMAL


class _Malformed(Exception):
    pass


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(data) or shift > 63:
            raise _Malformed("truncated varint")
        b = data[pos]
        pos += 1
        value |= (b & 0x7F) << shift
        if not b & 0x80:
            return value, pos
        shift += 7


def _fields(data: bytes):
    """(field number, wire type, value) of one message: ints for varints, bytes for the rest."""
    pos = 0
    while pos < len(data):
        key, pos = _varint(data, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(data, pos)
        elif wire == 1:
            value, pos = data[pos:pos + 8], pos + 8
        elif wire == 2:
            n, pos = _varint(data, pos)
            value, pos = data[pos:pos + n], pos + n
        elif wire == 5:
            value, pos = data[pos:pos + 4], pos + 4
        else:
            raise _Malformed(f"wire type {wire}")
        if pos > len(data) or number == 0:
            raise _Malformed("truncated field")
        yield number, wire, value


def _piece(data: bytes) -> Piece:
    text, score, kind = None, 0.0, NORMAL
    for number, wire, value in _fields(data):
        if number == 1 and wire == 2:
            text = value.decode("utf-8")
        elif number == 2 and wire == 5:
            score = struct.unpack("<f", value)[0]
        elif number == 3 and wire == 0:
            kind = value
    if text is None:
        raise _Malformed("a piece without text")
    if kind not in (NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE):
        raise _Malformed(f"piece {text!r} has unknown type {kind}")
    return Piece(text, score, kind)


def read_pieces(path: Path) -> list[Piece]:
    """The pieces of the SentencePiece model ``path`` in id order; ModelError (one line) when it is not one."""
    try:
        data = Path(path).read_bytes()
        pieces = [_piece(value) for number, wire, value in _fields(data) if number == 1 and wire == 2]
    except OSError as exc:
        raise ModelError(f"cannot read {path} ({exc.strerror or exc})") from None
    except (_Malformed, UnicodeDecodeError) as exc:
        raise ModelError(f"{path} is not a SentencePiece model ({exc}); copy tokenizer.model from the base "
                         "model") from None
    if not pieces:
        raise ModelError(f"{path} is not a SentencePiece model (no pieces); copy tokenizer.model from the base model")
    return pieces
