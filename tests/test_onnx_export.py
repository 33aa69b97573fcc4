"""A checkpoint is exported to ONNX once: shipped beside the model, or made by one process into the cache and
read by every other; a stale or unwritable place is never used."""
import json
import os
import subprocess
import sys

import pytest
import torch
from mgeo_service.checkpoint import CheckpointError, load_checkpoint
from mgeo_service.engines.onnx_export import (FLOAT_FILE, INT8_FILE, RECORD_FILE, SHIPPED_FOLDER, export,
                                              exported_for, file_key, onnx_files)
from mgeo_service.engines.ort import padded, session
from mgeo_service.matcher import DEFAULT_MODEL_DIR, Matcher

from test_checkpoint import PAIRS, save_huggingface, tiny_model
from test_packed import real_pairs

EXPORTED = "exported the checkpoint to ONNX"
# The tiny test model's int8 probabilities against its float32 ones (measured: 1.1e-6; its answers are near uniform)
INT8_TINY = 1e-5


def files_under(folder) -> list[str]:
    return sorted(os.path.relpath(os.path.join(d, f), folder) for d, _, files in os.walk(folder) for f in files)


def test_the_default_model_ships_its_export_so_loading_it_exports_nothing(tmp_path):
    checkpoint = load_checkpoint(DEFAULT_MODEL_DIR)
    assert exported_for(os.path.join(DEFAULT_MODEL_DIR, SHIPPED_FOLDER), file_key(checkpoint))
    shipped = sum(os.path.getsize(os.path.join(DEFAULT_MODEL_DIR, name)) for name in files_under(DEFAULT_MODEL_DIR))
    assert shipped <= 64 << 20  # the default model's files, ONNX included
    Matcher(device="cpu", onnx_cache_dir=str(tmp_path / "cache"))
    assert not (tmp_path / "cache").exists()


def test_the_shipped_export_is_what_export_writes_today(tmp_path, default_matcher):
    checkpoint = load_checkpoint(DEFAULT_MODEL_DIR)
    export(checkpoint, str(tmp_path))
    assert exported_for(str(tmp_path), file_key(checkpoint))
    with open(tmp_path / RECORD_FILE) as f:
        assert json.load(f)["key"] == file_key(checkpoint)
    encoded = default_matcher.encode(real_pairs())
    batch = padded(encoded)
    for name in (FLOAT_FILE, INT8_FILE):
        fresh = session(str(tmp_path / name), threads=1).run(None, batch)[0]
        shipped = session(os.path.join(DEFAULT_MODEL_DIR, SHIPPED_FOLDER, name), threads=1).run(None, batch)[0]
        assert (fresh == shipped).all(), name


def test_concurrent_loads_export_once_and_every_one_reads_the_same_files(tmp_path):
    model_dir = save_huggingface(tiny_model(), tmp_path / "model")
    before = files_under(model_dir)
    cache = tmp_path / "cache"
    command = [sys.executable, "-m", "mgeo_service", "predict", *PAIRS[0], "--model", model_dir]
    environment = {**os.environ, "MGEO_ONNX_CACHE_DIR": str(cache), "MGEO_LOG_LEVEL": "info"}
    processes = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                  env=environment) for _ in range(3)]
    outputs = [process.communicate(timeout=300) for process in processes]
    assert [process.returncode for process in processes] == [0, 0, 0], outputs
    assert sum(stderr.count(EXPORTED) for _, stderr in outputs) == 1
    assert len({stdout for stdout, _ in outputs}) == 1  # the same answer from the same file
    key = file_key(load_checkpoint(model_dir))
    assert files_under(cache) == [f"{key}.lock", f"{key}/{RECORD_FILE}", f"{key}/{FLOAT_FILE}", f"{key}/{INT8_FILE}"]
    assert files_under(model_dir) == before  # the model directory is only read
    again = subprocess.run(command, capture_output=True, text=True, env=environment, timeout=300)
    assert again.returncode == 0 and EXPORTED not in again.stderr and again.stdout == outputs[0][0]


def test_export_writes_beside_the_model_and_an_export_of_other_weights_is_not_used(tmp_path):
    model = tiny_model()
    model_dir = save_huggingface(model, tmp_path / "model")
    result = subprocess.run([sys.executable, "-m", "mgeo_service", "export", "--model", model_dir],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    shipped = os.path.join(model_dir, SHIPPED_FOLDER)
    assert json.loads(result.stdout) == {"float32": os.path.join(shipped, FLOAT_FILE),
                                         "int8": os.path.join(shipped, INT8_FILE)}
    assert onnx_files(load_checkpoint(model_dir), str(tmp_path / "unused"))[0] == os.path.join(shipped, FLOAT_FILE)
    batch = padded(Matcher(model_dir, device="cpu").encode(PAIRS))
    float32, int8 = (session(os.path.join(shipped, name), threads=1).run(None, batch)[0]
                     for name in (FLOAT_FILE, INT8_FILE))
    assert 0 < abs(int8 - float32).max() <= INT8_TINY  # the int8 file is the export's own, close to float32

    with torch.no_grad():
        model.classifier.bias += torch.tensor([5.0, 0.0, -5.0])  # the weights change, the export stays
    retrained = save_huggingface(model, tmp_path / "retrained")
    os.rename(shipped, os.path.join(retrained, SHIPPED_FOLDER))
    cache = tmp_path / "cache"
    matcher = Matcher(retrained, device="cpu", onnx_cache_dir=str(cache))
    key = file_key(load_checkpoint(retrained))
    assert sorted(os.listdir(cache)) == [key, f"{key}.lock"]  # exported anew, into the cache
    encoded = matcher.encode(PAIRS)
    reference = Matcher(retrained, device="cpu", backend="torch").forward(encoded)
    assert (matcher.forward(encoded) - reference).abs().max().item() <= 1e-5


def test_an_unwritable_cache_is_a_load_error_that_says_what_to_do(tmp_path):
    model_dir = save_huggingface(tiny_model(), tmp_path / "model")
    blocked = tmp_path / "a-file"
    blocked.write_text("")
    with pytest.raises(CheckpointError, match="MGEO_ONNX_CACHE_DIR"):
        Matcher(model_dir, device="cpu", onnx_cache_dir=str(blocked / "cache"))
