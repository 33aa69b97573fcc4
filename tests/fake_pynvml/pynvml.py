"""A stand-in for NVIDIA's ``pynvml`` (no GPU on the test machines): the one fake the tests use.

It speaks the calls the poller makes. ``FAKE_NVML`` (JSON) says what it shows:
``{"driver": false}`` for a host without a driver, or
``{"gpus": [{"name": ..., "uuid": ..., "util": 37, "used": ..., "total": ..., "temp": 61,
"power_mw": 71000, "unsupported": ["power"]}]}``.
"""
import json
import os
from types import SimpleNamespace

NVML_TEMPERATURE_GPU = 0


class NVMLError(Exception):
    pass


class NVMLError_NotSupported(NVMLError):
    pass


class NVMLError_LibraryNotFound(NVMLError):
    pass


def _state():
    return json.loads(os.environ.get("FAKE_NVML", '{"driver": false}'))


def _gpu(handle, field):
    gpu = _state()["gpus"][handle]
    if field in gpu.get("unsupported", []):
        raise NVMLError_NotSupported(field)
    return gpu


def nvmlInit():
    if not _state().get("driver", True):
        raise NVMLError_LibraryNotFound("NVML Shared Library Not Found")


def nvmlShutdown():
    pass


def nvmlDeviceGetCount():
    nvmlInit()
    return len(_state().get("gpus", []))


def nvmlDeviceGetHandleByIndex(index):
    return index


def nvmlDeviceGetUUID(handle):
    return _gpu(handle, "uuid")["uuid"]


def nvmlDeviceGetName(handle):
    return _gpu(handle, "name")["name"].encode()  # older pynvml returns bytes


def nvmlDeviceGetUtilizationRates(handle):
    return SimpleNamespace(gpu=_gpu(handle, "util")["util"], memory=0)


def nvmlDeviceGetMemoryInfo(handle):
    gpu = _gpu(handle, "memory")
    return SimpleNamespace(used=gpu["used"], total=gpu["total"], free=gpu["total"] - gpu["used"])


def nvmlDeviceGetTemperature(handle, sensor):
    return _gpu(handle, "temperature")["temp"]


def nvmlDeviceGetPowerUsage(handle):
    return _gpu(handle, "power")["power_mw"]
