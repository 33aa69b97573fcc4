"""The pretraining stage: n-gram masking, the text it reads, and the encoder it hands the student."""
import json
import random

import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification

from mgeo_service.dataset import LabelledPair
from mgeo_service.train.data import TrainingData
from mgeo_service.train.pretrain import (MASK_SHARE, load_encoder, mask_tokens, pretrain, pretraining_texts,
                                         township_texts)
from mgeo_service.train.trainer import build_vocab, save_tokenizer

# Hash buckets 9 and 3 (training), 1 (a contrast validation source, never read by pretraining).
COMPANIES = ["北京市朝阳区建国路88号", "长春市朝阳区人民大街1号", "上海市浦东新区碧波路690号"]
SPECIAL = {0, 2, 3}  # pad, cls, sep
MASK = 4


def test_masking_takes_spans_to_its_share_and_never_a_special_token():
    ids = [2] + list(range(10, 50)) + [3] + list(range(60, 80)) + [3]
    rng = random.Random(7)
    span_lengths = []
    for _ in range(200):
        inputs, targets = mask_tokens(ids, SPECIAL, MASK, 100, rng)
        chosen = [i for i, t in enumerate(targets) if t != -100]
        assert len(chosen) == round(60 * MASK_SHARE)
        assert all(ids[i] not in SPECIAL and targets[i] == ids[i] for i in chosen)
        assert all(inputs[i] == ids[i] for i in range(len(ids)) if i not in chosen)
        runs, previous = [], None
        for i in chosen:
            runs.append(1 if previous is None or i != previous + 1 else runs.pop() + 1)
            previous = i
        span_lengths += runs
    assert max(span_lengths) >= 3  # n-grams, not only single characters
    assert mask_tokens(ids, SPECIAL, MASK, 100, random.Random(1)) == mask_tokens(ids, SPECIAL, MASK, 100,
                                                                               random.Random(1))


def test_most_chosen_tokens_become_the_mask():
    ids = [2] + list(range(10, 110)) + [3]
    rng = random.Random(3)
    masked = chosen = 0
    for _ in range(100):
        inputs, targets = mask_tokens(ids, SPECIAL, MASK, 200, rng)
        chosen += sum(t != -100 for t in targets)
        masked += sum(x == MASK for x in inputs)
    assert 0.75 < masked / chosen < 0.85


@pytest.fixture
def data_dir(tmp_path):
    divisions = tmp_path / "admin_divisions"
    divisions.mkdir()
    files = {
        "provinces.csv": "code,name\n11,北京市\n22,吉林省\n",
        "cities.csv": "code,name,provinceCode\n1101,市辖区,11\n2201,长春市,22\n",
        "areas.csv": "code,name,cityCode,provinceCode\n110105,朝阳区,1101,11\n220104,朝阳区,2201,22\n",
        "streets.csv": "code,name,areaCode,provinceCode,cityCode\n110105001,建外街道,110105,11,1101\n"
                       "220104002,桂林街道,220104,22,2201\n",
    }
    for name, text in files.items():
        (divisions / name).write_text(text, encoding="utf-8")
    (tmp_path / "shenzhen_address_pairs.tsv").write_text(
        "address1\taddress2\tlabel\n深圳市南山区粤海街道科技园1号\t南山区科技园1号\t1\n", encoding="utf-8")
    (tmp_path / "raw_company_addresses.csv").write_text(
        "原始地址,规模\n" + "".join(f"{a},10\n" for a in COMPANIES), encoding="utf-8")
    return tmp_path


def test_townships_are_written_under_their_divisions(data_dir):
    assert township_texts(str(data_dir)) == ["北京市朝阳区建外街道", "吉林省长春市朝阳区桂林街道"]


def training(pairs):
    return TrainingData(splits={"train": pairs, "validation": pairs, "test": [LabelledPair("测试", "测试", 0, "ccks")]},
                        contrast=[LabelledPair("北京市朝阳区建国路88号", "北京朝阳建国路88号", 2, "drop_suffixes")])


def test_pretraining_reads_the_training_side_only(data_dir):
    data = training([LabelledPair("北京朝阳建国路88号", "建国路88号", 2, "ccks")])
    texts = pretraining_texts(data, str(data_dir))
    assert ("北京朝阳建国路88号", "建国路88号") in texts  # a training pair, as a pair
    assert ("深圳市南山区粤海街道科技园1号", "南山区科技园1号") in texts
    assert ("北京市朝阳区建国路88号", "北京朝阳建国路88号") not in texts  # generated, not real text
    assert ("北京市朝阳区建外街道", None) in texts
    assert [(a, None) in texts for a in COMPANIES] == [True, True, False]
    assert not any("测试" in a for a, _ in texts)  # the held-out split


def tiny_student(vocab):
    config = BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64, num_labels=3)
    torch.manual_seed(0)
    return BertForSequenceClassification(config)


def test_pretraining_learns_the_text_and_hands_the_student_its_encoder(data_dir, tmp_path):
    pairs = [LabelledPair(f"吉林省长春市朝阳区桂林街道{n}号", f"长春朝阳{n}号", 2, "ccks") for n in range(1, 9)]
    data = training(pairs)
    vocab = build_vocab([t for p in pairs for t in (p.address1, p.address2)])
    out = tmp_path / "pretrained"
    out.mkdir()
    tokenizer = save_tokenizer(vocab, str(out))
    summary = pretrain(data, str(data_dir), str(out), tokenizer, tiny_student(vocab), steps=60, batch_size=8,
                       learning_rate=3e-3, max_length=64, seed=1)
    assert summary["validation_after"]["loss"] < summary["validation_before"]["loss"] - 1.0
    assert json.loads((out / "pretrain.json").read_text())["steps"] == 60

    student = tiny_student(vocab)
    load_encoder(student, str(out), vocab)
    reloaded = tiny_student(vocab)
    load_encoder(reloaded, str(out), vocab)
    fresh = tiny_student(vocab)
    layer = "encoder.layer.1.output.dense.weight"
    assert torch.equal(student.bert.state_dict()[layer], reloaded.bert.state_dict()[layer])
    assert not torch.equal(student.bert.state_dict()[layer], fresh.bert.state_dict()[layer])
    with pytest.raises(ValueError, match="another vocabulary"):
        load_encoder(tiny_student(vocab), str(out), vocab[:-1] + ["另"])
