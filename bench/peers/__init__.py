"""The peers `make bench` compares against: the same weights served the way a user would write it with
each framework, through transformers' own tokenizer and padded forward (not the service's matcher); or, with
``BENCH_ENGINE=onnx``, through the same ONNX file the service runs (``OnnxModel``), so that the bench tells
the server's share of the lead from the engine's."""
from __future__ import annotations

import os

import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from mgeo_service.matcher import DEFAULT_MODEL_DIR


def plain_or_onnx(threads: int):
    return OnnxModel(threads) if os.environ.get("BENCH_ENGINE") == "onnx" else PlainModel(threads)


class PlainModel:
    """The model as transformers loads it (the default one, or the Hugging Face directory in
    ``BENCH_MODEL_DIR``): a padded batch per call, softmax, labels."""

    def __init__(self, threads: int):
        torch.set_num_threads(threads)
        model_dir = os.environ.get("BENCH_MODEL_DIR") or DEFAULT_MODEL_DIR
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        # float32 as the service runs it (the file stores float16, which a CPU runs far slower).
        self.model = AutoModelForSequenceClassification.from_pretrained(model_dir, dtype=torch.float32).eval()
        self.labels = [self.model.config.id2label[i] for i in range(self.model.config.num_labels)]

    @torch.inference_mode()
    def predict(self, pairs: list[tuple[str, str]]) -> list[dict]:
        batch = self.tokenizer([a for a, _ in pairs], [b for _, b in pairs], padding=True, truncation=True,
                               max_length=128, return_tensors="pt")
        probabilities = torch.softmax(self.model(**batch).logits, dim=-1)
        return [{"label": self.labels[int(row.argmax())], "scores": dict(zip(self.labels, row.tolist()))}
                for row in probabilities]


class OnnxModel(PlainModel):
    """The service's float32 ONNX file in an ONNX Runtime session of ``threads`` threads, behind the same
    tokenizer and padded batches as ``PlainModel``."""

    def __init__(self, threads: int):
        from mgeo_service.checkpoint import load_checkpoint
        from mgeo_service.engines.onnx_export import onnx_files
        from mgeo_service.engines.ort import session
        model_dir = os.environ.get("BENCH_MODEL_DIR") or DEFAULT_MODEL_DIR
        checkpoint = load_checkpoint(model_dir)
        self.tokenizer, self.labels = AutoTokenizer.from_pretrained(model_dir), list(checkpoint.labels)
        self.session = session(onnx_files(checkpoint, "")[0], threads)

    def predict(self, pairs: list[tuple[str, str]]) -> list[dict]:
        batch = self.tokenizer([a for a, _ in pairs], [b for _, b in pairs], padding=True, truncation=True,
                               max_length=128, return_tensors="np")
        probabilities = self.session.run(None, {name: batch[name].astype("int64") for name in
                                                ("input_ids", "attention_mask", "token_type_ids")})[0]
        return [{"label": self.labels[int(row.argmax())], "scores": dict(zip(self.labels, row.tolist()))}
                for row in probabilities]
