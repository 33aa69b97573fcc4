"""The NVML poller: GPU gauges for the metrics sidecar.

A thread reads every GPU through ``pynvml`` each ``interval`` seconds and keeps
the last reading; ``collect`` turns it into gauges at scrape time. Every field
is optional: one that raises (``NotSupported`` on many boards) is skipped and
the rest still export. With no driver, ``mgeo_nvml_up`` is 0 and no GPU series
exist; initialisation is retried on the next poll.
"""
from __future__ import annotations

import logging
import threading

from prometheus_client.core import GaugeMetricFamily

log = logging.getLogger(__name__)

GPU_LABELS = ["gpu", "uuid", "name"]
# gauge name -> (help, how to read it from a device handle)
GPU_GAUGES = {
    "nvidia_gpu_utilization_ratio": (
        "GPU busy time over the last sample period, 0 to 1.",
        lambda nvml, h: nvml.nvmlDeviceGetUtilizationRates(h).gpu / 100.0),
    "nvidia_gpu_memory_used_bytes": (
        "GPU memory in use.", lambda nvml, h: nvml.nvmlDeviceGetMemoryInfo(h).used),
    "nvidia_gpu_memory_total_bytes": (
        "GPU memory installed.", lambda nvml, h: nvml.nvmlDeviceGetMemoryInfo(h).total),
    "nvidia_gpu_temperature_celsius": (
        "GPU core temperature.", lambda nvml, h: nvml.nvmlDeviceGetTemperature(h, nvml.NVML_TEMPERATURE_GPU)),
    "nvidia_gpu_power_watts": (
        "GPU power draw.", lambda nvml, h: nvml.nvmlDeviceGetPowerUsage(h) / 1000.0),
}


def _text(value) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


class GpuPoller:
    def __init__(self, interval: float, nvml=None):
        if nvml is None:
            import pynvml as nvml
        self._nvml = nvml
        self._interval = interval
        self._initialised = False
        self._stop = threading.Event()
        self.up = False
        self.readings: list[tuple[list[str], dict[str, float]]] = []  # (label values, gauge -> value)

    def start(self) -> "GpuPoller":
        threading.Thread(target=self._run, name="nvml-poller", daemon=True).start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.poll()
            self._stop.wait(self._interval)

    def poll(self) -> None:
        nvml = self._nvml
        try:
            if not self._initialised:
                nvml.nvmlInit()
                self._initialised = True
            count = nvml.nvmlDeviceGetCount()
        except Exception as exc:  # no driver, no library, driver gone
            if self.up or self._initialised:
                log.warning("NVML unavailable: %s", exc)
            self._initialised = False
            self.up, self.readings = False, []
            return
        readings = []
        for index in range(count):
            try:
                handle = nvml.nvmlDeviceGetHandleByIndex(index)
                labels = [str(index), _text(nvml.nvmlDeviceGetUUID(handle)), _text(nvml.nvmlDeviceGetName(handle))]
            except Exception as exc:
                log.debug("GPU %d: no handle: %s", index, exc)
                continue
            values = {}
            for name, (_help, read) in GPU_GAUGES.items():
                try:
                    values[name] = float(read(nvml, handle))
                except Exception:  # NotSupported and friends: this gauge only
                    continue
            readings.append((labels, values))
        self.up, self.readings = True, readings

    def collect(self):
        up = GaugeMetricFamily("mgeo_nvml_up", "1 when the NVML poller can read the GPUs, else 0.")
        up.add_metric([], 1.0 if self.up else 0.0)
        yield up
        readings = self.readings
        for name, (help_text, _read) in GPU_GAUGES.items():
            family = GaugeMetricFamily(name, help_text, labels=GPU_LABELS)
            for labels, values in readings:
                if name in values:
                    family.add_metric(labels, values[name])
            if family.samples:
                yield family
