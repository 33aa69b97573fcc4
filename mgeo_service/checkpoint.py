"""Reading model directories: Hugging Face and MGeo ModelScope layouts.

Both layouts end up as one ``Checkpoint``: a ``BertConfig``, a state dict with
``BertForSequenceClassification`` key names, a tokenizer, the label of each
output index, and a digest of the files the model is made of. ``build_model`` makes
the torch model from it; nothing here runs the model.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass

import torch
from safetensors.torch import load_file as load_safetensors
from transformers import (AutoTokenizer, BertConfig, BertForSequenceClassification, BertTokenizer,
                          PreTrainedTokenizerBase)

log = logging.getLogger(__name__)

# MGeo's entity-alignment labels, in the model's output order.
LABELS = ("not_match", "partial_match", "exact_match")
PAIR_ORDERS = ("given", "canonical")  # Checkpoint.pair_order

# Names a checkpoint may give its labels, mapped to ours.
_LABEL_ALIASES = {
    "not_match": "not_match", "不匹配": "not_match",
    "partial_match": "partial_match", "部分匹配": "partial_match",
    "exact_match": "exact_match", "完全匹配": "exact_match",
}

SAFETENSORS_FILE = "model.safetensors"
PYTORCH_FILE = "pytorch_model.bin"

# ModelScope's GIS and cross-attention weights have no place in a text-only cross-encoder.
_MODELSCOPE_DROPPED = (".crossattention.", "gis2text", "gis_type")
_MODELSCOPE_DROPPED_PREFIXES = ("bert.gis_encoder.",)


def canonical_order(address1: str, address2: str) -> tuple[str, str]:
    """The pair as a model with ``pair_order`` "canonical" reads it: the smaller string first."""
    return (address1, address2) if address1 <= address2 else (address2, address1)


class CheckpointError(Exception):
    """The model cannot be served; the message says why, ``reason`` is a readiness code."""

    def __init__(self, message: str, reason: str = "model_load_failed"):
        super().__init__(message)
        self.reason = reason


@dataclass
class Checkpoint:
    layout: str  # "huggingface" or "modelscope"
    config: BertConfig
    state_dict: dict[str, torch.Tensor]
    tokenizer: PreTrainedTokenizerBase
    labels: tuple[str, ...]  # labels[i] is the label of output i
    name: str
    version: str
    # "canonical": each pair is scored with its two addresses in one fixed order (the smaller string first),
    # so an answer never depends on which came first; "given": as sent. The model's own choice
    # (config.json's ``mgeo_pair_order``), "given" where it makes none.
    pair_order: str
    directory: str
    digest: str  # sha256 of config.json and the weights file: what the model computes, for caches keyed by it


def build_model(checkpoint: Checkpoint, attention: str = "sdpa") -> BertForSequenceClassification:
    """The eval-mode torch model with every weight from the checkpoint; refuses a checkpoint that lacks any.
    ``attention``: transformers' attention implementation (the ONNX export traces ``eager``)."""
    config = BertConfig.from_dict(checkpoint.config.to_dict())
    config._attn_implementation = attention
    model = BertForSequenceClassification(config)
    expected = set(model.state_dict())
    missing = sorted(expected - set(checkpoint.state_dict))
    if missing:
        # transformers would initialise these at random and serve nonsense.
        shown = ", ".join(missing[:20]) + (f" and {len(missing) - 20} more" if len(missing) > 20 else "")
        raise CheckpointError(f"checkpoint lacks {len(missing)} weight(s) the model needs: {shown}")
    unexpected = sorted(set(checkpoint.state_dict) - expected)
    if unexpected:
        log.warning("ignoring %d checkpoint weight(s) the model does not use, e.g. %s",
                    len(unexpected), unexpected[0])
    try:
        model.load_state_dict({k: checkpoint.state_dict[k] for k in expected})
    except RuntimeError as exc:  # shape mismatch between config and weights
        raise CheckpointError(f"checkpoint does not fit its config: {exc}") from exc
    return model.eval()


def detect_layout(model_dir: str) -> str:
    if not os.path.isdir(model_dir):
        raise CheckpointError(f"model directory {model_dir!r} does not exist")
    files = set(os.listdir(model_dir))
    if "config.json" not in files:
        raise CheckpointError(f"unknown model layout in {model_dir!r}: no config.json")
    if not files & {SAFETENSORS_FILE, PYTORCH_FILE}:
        raise CheckpointError(
            f"unknown model layout in {model_dir!r}: no {SAFETENSORS_FILE} or {PYTORCH_FILE}")
    if "configuration.json" in files:
        return "modelscope"
    return "huggingface"


def load_checkpoint(model_dir: str) -> Checkpoint:
    layout = detect_layout(model_dir)
    config_path = os.path.join(model_dir, "config.json")
    raw_config = _read_json(config_path)
    weights_path = _weights_path(model_dir)
    state_dict = _read_weights(weights_path)
    weights_digest = _file_digest(weights_path)
    if layout == "modelscope":
        raw_config, state_dict = _convert_modelscope(raw_config, state_dict)
        labels = _modelscope_labels(model_dir, raw_config)
        tokenizer = _modelscope_tokenizer(model_dir)
    else:
        labels = _labels_from(raw_config) or LABELS
        tokenizer = _huggingface_tokenizer(model_dir)
    raw_config = {k: v for k, v in raw_config.items() if k not in ("id2label", "label2id")}
    config = BertConfig(**{**raw_config, "num_labels": len(labels)})
    return Checkpoint(
        layout=layout,
        config=config,
        state_dict=state_dict,
        tokenizer=tokenizer,
        labels=labels,
        name=raw_config.get("mgeo_model_name") or os.path.basename(os.path.abspath(model_dir)),
        version=raw_config.get("mgeo_model_version") or weights_digest[:12],
        pair_order=_pair_order(raw_config),
        directory=model_dir,
        digest=hashlib.sha256(f"{_file_digest(config_path)} {weights_digest}".encode()).hexdigest(),
    )


def _pair_order(raw_config: dict) -> str:
    order = raw_config.get("mgeo_pair_order", "given")
    if order not in PAIR_ORDERS:
        raise CheckpointError(f"config.json: mgeo_pair_order must be one of {', '.join(PAIR_ORDERS)}, not {order!r}")
    return order


def _read_json(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"cannot read {path}: {exc}") from exc
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} is not a JSON object")
    return data


def _weights_path(model_dir: str) -> str:
    # safetensors first: it cannot carry code.
    for name in (SAFETENSORS_FILE, PYTORCH_FILE):
        path = os.path.join(model_dir, name)
        if os.path.exists(path):
            return path
    raise CheckpointError(f"no weights in {model_dir!r}")


def _read_weights(path: str) -> dict[str, torch.Tensor]:
    try:
        if path.endswith(".safetensors"):
            state_dict = load_safetensors(path)
        else:
            # weights_only: a pickle may not run code while it loads.
            state_dict = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt files raise many types
        raise CheckpointError(f"cannot read weights {path}: {exc}") from exc
    if not isinstance(state_dict, dict):
        raise CheckpointError(f"{path} does not hold a state dict")
    if "state_dict" in state_dict and isinstance(state_dict["state_dict"], dict):
        state_dict = state_dict["state_dict"]
    return {k: v.float() if v.is_floating_point() else v for k, v in state_dict.items()}


def _file_digest(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _convert_modelscope(raw_config: dict, state_dict: dict) -> tuple[dict, dict]:
    converted = {}
    for key, tensor in state_dict.items():
        if key.startswith("model."):
            key = key[len("model."):]
        if key.startswith(_MODELSCOPE_DROPPED_PREFIXES) or any(s in key for s in _MODELSCOPE_DROPPED):
            continue
        if key.startswith("bert.text_encoder."):
            key = "bert." + key[len("bert.text_encoder."):]
        converted[key] = tensor
    config = dict(raw_config)
    if config.get("fusion_layer"):
        config["num_hidden_layers"] = int(config["fusion_layer"])
    config["model_type"] = "bert"
    return config, converted


def _modelscope_labels(model_dir: str, raw_config: dict) -> tuple[str, ...]:
    path = os.path.join(model_dir, "label_mapping.json")
    if os.path.exists(path):
        labels = _labels_from({"label2id": _read_json(path)})
        if labels:
            return labels
    configuration = _read_json(os.path.join(model_dir, "configuration.json"))
    for section in (configuration, *[v for v in configuration.values() if isinstance(v, dict)]):
        labels = _labels_from(section)
        if labels:
            return labels
    return _labels_from(raw_config) or LABELS


def _labels_from(section: dict) -> tuple[str, ...] | None:
    """Labels by output index from an ``id2label`` or ``label2id`` entry, if it names ours."""
    if isinstance(section.get("id2label"), dict):
        by_index = {int(i): name for i, name in section["id2label"].items()}
    elif isinstance(section.get("label2id"), dict):
        by_index = {int(i): name for name, i in section["label2id"].items()}
    else:
        return None
    names = [str(by_index[i]) for i in sorted(by_index)]
    if sorted(by_index) != list(range(len(names))):
        raise CheckpointError(f"label mapping {by_index} does not number outputs 0..n-1")
    if all(n in _LABEL_ALIASES for n in names):
        return tuple(_LABEL_ALIASES[n] for n in names)
    if len(names) == len(LABELS):  # generic names such as LABEL_0: MGeo's order
        return LABELS
    raise CheckpointError(f"labels {names} are not MGeo's {list(LABELS)}")


def tokenizer_from_vocab(vocab_path: str) -> BertTokenizer:
    """A lower-casing BERT WordPiece tokenizer over a ``vocab.txt`` (one token per line, id = line)."""
    with open(vocab_path, encoding="utf-8") as f:
        vocab = {line.rstrip("\n"): i for i, line in enumerate(f)}
    return BertTokenizer(vocab=vocab, do_lower_case=True, tokenize_chinese_chars=True)


def _modelscope_tokenizer(model_dir: str) -> PreTrainedTokenizerBase:
    vocab = os.path.join(model_dir, "vocab.txt")
    if not os.path.exists(vocab):
        raise CheckpointError(f"no vocab.txt in {model_dir!r}", "tokenizer_failed")
    try:
        return tokenizer_from_vocab(vocab)
    except Exception as exc:
        raise CheckpointError(f"cannot build tokenizer from {vocab}: {exc}", "tokenizer_failed") from exc


def _huggingface_tokenizer(model_dir: str) -> PreTrainedTokenizerBase:
    try:
        return AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    except Exception as exc:
        raise CheckpointError(f"cannot load tokenizer from {model_dir!r}: {exc}", "tokenizer_failed") from exc
