"""The NVML poller against the fake pynvml: all fields, a NotSupported field, no driver at all."""
import importlib.util
import json
import os

import pytest

from mgeo_service.nvml import GpuPoller

from conftest import ROOT

GPUS = [
    {"name": "NVIDIA H100", "uuid": "GPU-aaa", "util": 37, "used": 4 << 30, "total": 80 << 30, "temp": 61,
     "power_mw": 312500},
    {"name": "NVIDIA T4", "uuid": "GPU-bbb", "util": 5, "used": 1 << 30, "total": 16 << 30, "temp": 40,
     "power_mw": 27000, "unsupported": ["power"]},
]


@pytest.fixture
def fake_nvml(monkeypatch):
    spec = importlib.util.spec_from_file_location(
        "fake_pynvml", os.path.join(ROOT, "tests", "fake_pynvml", "pynvml.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)

    def show(state):
        monkeypatch.setenv("FAKE_NVML", json.dumps(state))
    return module, show


def samples(poller):
    return {(s.name, tuple(sorted(s.labels.items()))): s.value for f in poller.collect() for s in f.samples}


def test_every_gauge_per_gpu_and_not_supported_skips_one(fake_nvml):
    nvml, show = fake_nvml
    show({"gpus": GPUS})
    poller = GpuPoller(5, nvml=nvml)
    poller.poll()
    got = samples(poller)
    h100 = (("gpu", "0"), ("name", "NVIDIA H100"), ("uuid", "GPU-aaa"))
    t4 = (("gpu", "1"), ("name", "NVIDIA T4"), ("uuid", "GPU-bbb"))
    assert got[("mgeo_nvml_up", ())] == 1.0
    assert got[("nvidia_gpu_utilization_ratio", h100)] == pytest.approx(0.37)
    assert got[("nvidia_gpu_memory_used_bytes", h100)] == 4 << 30
    assert got[("nvidia_gpu_memory_total_bytes", h100)] == 80 << 30
    assert got[("nvidia_gpu_temperature_celsius", h100)] == 61
    assert got[("nvidia_gpu_power_watts", h100)] == pytest.approx(312.5)
    assert got[("nvidia_gpu_temperature_celsius", t4)] == 40
    assert ("nvidia_gpu_power_watts", t4) not in got  # NotSupported: that gauge only


def test_no_driver_means_nvml_down_and_no_gpu_series(fake_nvml):
    nvml, show = fake_nvml
    show({"driver": False})
    poller = GpuPoller(5, nvml=nvml)
    poller.poll()
    assert samples(poller) == {("mgeo_nvml_up", ()): 0.0}


def test_driver_that_comes_and_goes(fake_nvml):
    nvml, show = fake_nvml
    poller = GpuPoller(5, nvml=nvml)
    show({"driver": False})
    poller.poll()
    show({"gpus": GPUS[:1]})
    poller.poll()
    assert samples(poller)[("mgeo_nvml_up", ())] == 1.0
    show({"driver": False})
    poller.poll()
    assert samples(poller) == {("mgeo_nvml_up", ()): 0.0}


def test_the_real_pynvml_without_a_gpu_reports_down():
    import pynvml
    poller = GpuPoller(5, nvml=pynvml)
    poller.poll()
    try:
        pynvml.nvmlInit()
        has_gpu = pynvml.nvmlDeviceGetCount() > 0
    except pynvml.NVMLError:
        has_gpu = False
    assert samples(poller)[("mgeo_nvml_up", ())] == (1.0 if has_gpu else 0.0)
