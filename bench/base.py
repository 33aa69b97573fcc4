"""MGeo's production shape on this machine: the `base_size` step of `make bench`.

A checkpoint of MGeo base's shape (12 layers, hidden 768, 12 heads, FFN 3072, a 21,128-token
vocabulary) with seeded random weights, written twice: in ModelScope's MGeo layout for the
service (the text encoder under ``bert.text_encoder.``, as the real checkpoint has it) and in
Hugging Face's layout for the peers, the same weights. Speed does not depend on what the
weights are, only on their shape. Per precision (float32, int8): the in-process ceiling on the
stream, the physical limit (FLOPs per pair over the measured matmul rate of that precision),
single pairs at 32 connections and 32-pair requests through the service; the peers in float32.
"""
from __future__ import annotations

import json
import os
import shutil

import torch
from transformers import BertConfig, BertForSequenceClassification

from mgeo_service.matcher import DEFAULT_MODEL_DIR

VOCAB_SIZE = 21128  # MGeo's (bert-base-chinese's) vocabulary
# A base-size forward on a CPU takes seconds: the deadline must outlast one, or admission refuses (docs/overload.md).
SERVICE_ENV = {"MGEO_REQUEST_TIMEOUT_MS": "60000"}


def build_checkpoints(folder: str) -> tuple[str, str]:
    """(ModelScope-layout directory, Hugging Face directory) of one seeded base-size model."""
    with open(os.path.join(DEFAULT_MODEL_DIR, "vocab.txt"), encoding="utf-8") as f:
        tokens = f.read().splitlines()
    tokens += [f"[unused{n}]" for n in range(VOCAB_SIZE - len(tokens))]  # the real vocabulary's size
    config = BertConfig(vocab_size=VOCAB_SIZE, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                        intermediate_size=3072, num_labels=3,
                        id2label={0: "not_match", 1: "partial_match", 2: "exact_match"},
                        label2id={"not_match": 0, "partial_match": 1, "exact_match": 2})
    torch.manual_seed(0)
    model = BertForSequenceClassification(config).eval()
    mgeo, hf = os.path.join(folder, "mgeo"), os.path.join(folder, "hf")
    shutil.rmtree(folder, ignore_errors=True)
    os.makedirs(mgeo)
    state = {k.replace("bert.", "bert.text_encoder.", 1): v for k, v in model.state_dict().items()}
    torch.save(state, os.path.join(mgeo, "pytorch_model.bin"))
    config.to_json_file(os.path.join(mgeo, "config.json"))
    with open(os.path.join(mgeo, "configuration.json"), "w") as f:
        json.dump({"framework": "pytorch", "task": "sentence-similarity", "model": {"type": "mgeo"}}, f)
    with open(os.path.join(mgeo, "vocab.txt"), "w", encoding="utf-8") as f:
        f.write("\n".join(tokens) + "\n")
    model.save_pretrained(hf)
    # The shipped tokenizer: the padding tokens appended above are never produced, so its ids hold here.
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(os.path.join(DEFAULT_MODEL_DIR, name), hf)
    return mgeo, hf
