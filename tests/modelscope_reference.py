"""Runs in the ModelScope venv (``make test-tools``), never in the service's: ModelScope's own MGeo.

    modelscope_reference.py OUT_DIR PAIRS_JSON

Builds small random ``MGeoForSequenceClassification`` models with ModelScope's classes, saves
each as a ModelScope checkpoint (``config.json``, ``configuration.json``, ``pytorch_model.bin``,
``vocab.txt``) under OUT_DIR, and writes ModelScope's own probabilities for the pairs to
``OUT_DIR/<name>/reference.json``:

- ``text``: ``fusion_layer`` (2) below ``num_hidden_layers`` (4), so layers 2 and 3 exist with
  cross-attention that a text-only forward never runs; ``gis_embedding`` 0;
- ``multimodal``: the same, fine-tuned in ``multi-modal`` mode, so the checkpoint also holds the
  GIS encoder, ``gis2text`` and ``gis_type``, which a text forward does not use.
"""
import json
import os
import sys

import torch
from modelscope.models.multi_modal.mgeo import MGeoForSequenceClassification
from transformers import BertConfig, BertTokenizer

SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
LABELS = {"0": "not_match", "1": "partial_match", "2": "exact_match"}


def config(vocab_size: int, multimodal: bool) -> BertConfig:
    gis = {"vocab_size": 50, "hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2,
           "intermediate_size": 32, "type_vocab_size": 2, "max_position_embeddings": 64, "gis_embedding": 1,
           "fusion_layer": 1, "rel_type_vocab_size": 8, "absolute_x_vocab_size": 32, "absolute_y_vocab_size": 32,
           "relative_x_vocab_size": 32, "relative_y_vocab_size": 32, "prov_vocab_size": 8, "city_vocab_size": 8,
           "dist_vocab_size": 8}
    return BertConfig(vocab_size=vocab_size, hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
                      intermediate_size=128, max_position_embeddings=128, type_vocab_size=2, num_labels=3,
                      id2label=LABELS, label2id={v: int(k) for k, v in LABELS.items()}, fusion_layer=2,
                      gis_embedding=0, encoder_width=64, hidden_dropout_prob=0.0,
                      attention_probs_dropout_prob=0.0, **({"gis_encoder": gis} if multimodal else {}))


def save(model, vocab: list[str], folder: str) -> None:
    os.makedirs(folder, exist_ok=True)
    model.config.to_json_file(os.path.join(folder, "config.json"))
    with open(os.path.join(folder, "configuration.json"), "w") as f:
        json.dump({"framework": "pytorch", "task": "sentence-similarity",
                   "model": {"type": "mgeo", "finetune_mode": model.bert.finetune_mode},
                   "pipeline": {"type": "sentence-similarity"}}, f)
    torch.save(model.state_dict(), os.path.join(folder, "pytorch_model.bin"))
    with open(os.path.join(folder, "vocab.txt"), "w", encoding="utf-8") as f:
        f.write("\n".join(vocab) + "\n")


def main(out_dir: str, pairs_path: str) -> None:
    with open(pairs_path, encoding="utf-8") as f:
        pairs = json.load(f)
    chars = sorted({c for pair in pairs for text in pair for c in text.lower() if not c.isspace()})
    vocab = SPECIAL + chars
    for index, name in enumerate(("text", "multimodal")):
        torch.manual_seed(1234 + index)
        model = MGeoForSequenceClassification(config(len(vocab), name == "multimodal"),
                                              finetune_mode="multi-modal" if name == "multimodal" else "single-modal")
        with torch.no_grad():  # random weights of a visible size, so that a wrong layer shows
            for weight, parameter in model.named_parameters():
                parameter.normal_(1.0 if weight.endswith("LayerNorm.weight") else 0.0, 0.2)
        model.eval()
        folder = os.path.join(out_dir, name)
        save(model, vocab, folder)
        tokenizer = BertTokenizer(os.path.join(folder, "vocab.txt"))
        encoded = tokenizer([a for a, _ in pairs], [b for _, b in pairs], padding=True, truncation="longest_first",
                            max_length=128, return_tensors="pt")
        with torch.no_grad():
            logits = model(**encoded).logits
        probabilities = torch.softmax(logits.double(), dim=-1).tolist()
        with open(os.path.join(folder, "reference.json"), "w") as f:
            json.dump({"labels": [LABELS[str(i)] for i in range(3)], "probabilities": probabilities,
                       "weights": sorted(model.state_dict())}, f)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
