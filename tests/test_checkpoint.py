"""Both checkpoint layouts load to the same model; incomplete or unsafe checkpoints are refused."""
import json
import os
import pickle

import pytest
import torch
from safetensors.torch import save_file
from transformers import BertConfig, BertForSequenceClassification

from mgeo_service.checkpoint import LABELS, CheckpointError, detect_layout, load_checkpoint
from mgeo_service.matcher import Matcher

VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + list("北京市海淀区中关村大街一二三号楼路上浦东新0123456789")
PAIRS = [("北京市海淀区中关村大街1号", "北京海淀中关村街1号"), ("上海市浦东新区", "北京市"), ("三号楼", "3号楼")]


def tiny_model(seed=0) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=len(VOCAB), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64, num_labels=3,
                        id2label=dict(enumerate(LABELS)), label2id={l: i for i, l in enumerate(LABELS)})
    return BertForSequenceClassification(config).eval()


def save_huggingface(model, path) -> str:
    os.makedirs(path)
    model.config.save_pretrained(path)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()
               if not k.endswith(("position_ids", "token_type_ids"))}, os.path.join(path, "model.safetensors"))
    with open(os.path.join(path, "vocab.txt"), "w", encoding="utf-8") as f:
        f.write("\n".join(VOCAB) + "\n")
    return str(path)


def save_modelscope(model, path, label_file=True, vocab=VOCAB) -> str:
    """MGeo's layout: bert.text_encoder.* keys, GIS and cross-attention extras, configuration.json."""
    os.makedirs(path)
    state = {}
    for key, value in model.state_dict().items():
        if key.endswith(("position_ids", "token_type_ids")):
            continue
        state[key.replace("bert.", "bert.text_encoder.", 1) if key.startswith("bert.") else key] = value
    hidden = model.config.hidden_size
    state["bert.gis_encoder.embeddings.word_embeddings.weight"] = torch.randn(10, hidden)
    state["bert.text_encoder.encoder.layer.1.crossattention.self.query.weight"] = torch.randn(hidden, hidden)
    state["bert.text_encoder.gis2text.dense.weight"] = torch.randn(hidden, hidden)
    state["bert.text_encoder.embeddings.gis_type_embeddings.weight"] = torch.randn(2, hidden)
    torch.save(state, os.path.join(path, "pytorch_model.bin"))
    config = model.config.to_dict()
    config.pop("id2label"), config.pop("label2id")
    config.update({"num_hidden_layers": 4, "fusion_layer": model.config.num_hidden_layers, "model_type": "structbert"})
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f)
    with open(os.path.join(path, "configuration.json"), "w") as f:
        json.dump({"framework": "pytorch", "task": "sentence-similarity",
                   "model": {"type": "mgeo", "id2label": {"0": "LABEL_0", "1": "LABEL_1", "2": "LABEL_2"}}}, f)
    if label_file:
        with open(os.path.join(path, "label_mapping.json"), "w") as f:
            json.dump({"不匹配": 0, "部分匹配": 1, "完全匹配": 2}, f, ensure_ascii=False)
    with open(os.path.join(path, "vocab.txt"), "w", encoding="utf-8") as f:
        f.write("\n".join(vocab) + "\n")
    return str(path)


def probabilities(matcher):
    return torch.stack([matcher.forward(matcher.encode([pair]))[0] for pair in PAIRS])


def test_both_layouts_give_identical_logits(tmp_path):
    model = tiny_model()
    hf = Matcher(save_huggingface(model, tmp_path / "hf"), device="cpu")
    ms = Matcher(save_modelscope(model, tmp_path / "ms"), device="cpu")
    assert (hf.layout, ms.layout) == ("huggingface", "modelscope")
    assert hf.labels == ms.labels == LABELS
    assert torch.allclose(probabilities(hf), probabilities(ms), atol=1e-6)
    # and both agree with the model they were saved from
    encoded = hf.encode(PAIRS[:1])[0]
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([encoded[0]]), token_type_ids=torch.tensor([encoded[1]])).logits
    assert torch.allclose(torch.softmax(logits, -1)[0], probabilities(hf)[0], atol=1e-6)


def test_modelscope_conversion_drops_gis_and_uses_fusion_layer(tmp_path):
    checkpoint = load_checkpoint(save_modelscope(tiny_model(), tmp_path / "ms"))
    assert checkpoint.config.num_hidden_layers == 2
    assert not [k for k in checkpoint.state_dict if "gis" in k or "crossattention" in k]
    assert all(not k.startswith("bert.text_encoder.") for k in checkpoint.state_dict)


def test_label_mapping_precedence(tmp_path):
    model = tiny_model()
    # label_mapping.json wins; here it reverses the order
    path = save_modelscope(model, tmp_path / "reversed")
    with open(os.path.join(path, "label_mapping.json"), "w") as f:
        json.dump({"exact_match": 0, "partial_match": 1, "not_match": 2}, f)
    assert load_checkpoint(path).labels == ("exact_match", "partial_match", "not_match")
    # without it, configuration.json's generic names mean MGeo's order
    path = save_modelscope(model, tmp_path / "no_label_file", label_file=False)
    assert load_checkpoint(path).labels == LABELS


def test_reversed_labels_are_reported_under_their_names(tmp_path):
    model = tiny_model()
    path = save_modelscope(model, tmp_path / "reversed")
    with open(os.path.join(path, "label_mapping.json"), "w") as f:
        json.dump({"exact_match": 0, "partial_match": 1, "not_match": 2}, f)
    straight = Matcher(save_huggingface(model, tmp_path / "hf"), device="cpu").predict(PAIRS)
    reversed_ = Matcher(path, device="cpu").predict(PAIRS)
    for a, b in zip(straight, reversed_):
        assert a.scores["not_match"] == pytest.approx(b.scores["exact_match"], abs=1e-6)
        assert list(b.scores) == list(LABELS)


def test_missing_encoder_weight_is_refused_with_its_name(tmp_path):
    model = tiny_model()
    path = save_huggingface(model, tmp_path / "hf")
    state = {k: v.contiguous() for k, v in model.state_dict().items()
             if not k.endswith(("position_ids", "token_type_ids"))}
    del state["bert.encoder.layer.1.attention.self.key.weight"]
    save_file(state, os.path.join(path, "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"bert\.encoder\.layer\.1\.attention\.self\.key\.weight"):
        Matcher(path, device="cpu")


def test_pickled_code_is_not_run(tmp_path):
    path = save_modelscope(tiny_model(), tmp_path / "ms")
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    with open(os.path.join(path, "pytorch_model.bin"), "wb") as f:
        pickle.dump({"bert.x": Exploit()}, f, protocol=2)
    with pytest.raises(CheckpointError, match="cannot read weights"):
        load_checkpoint(path)
    assert not marker.exists()


@pytest.mark.parametrize("make, message", [
    (lambda p: None, "does not exist"),
    (lambda p: os.makedirs(p), "no config.json"),
    (lambda p: (os.makedirs(p), open(os.path.join(p, "config.json"), "w").write("{}")), "no model.safetensors"),
])
def test_unknown_layouts_are_refused(tmp_path, make, message):
    path = str(tmp_path / "model")
    make(path)
    with pytest.raises(CheckpointError, match=message):
        detect_layout(path)


def test_corrupt_weights_are_refused(tmp_path):
    path = save_huggingface(tiny_model(), tmp_path / "hf")
    with open(os.path.join(path, "model.safetensors"), "wb") as f:
        f.write(b"\x00garbage" * 100)
    with pytest.raises(CheckpointError, match="cannot read weights") as info:
        load_checkpoint(path)
    assert info.value.reason == "model_load_failed"
