"""Energy counters and pricing without a model: RAPL read from a fake powercap tree (with a wrap-around), the
reason recorded when no counter exists, and visible-device selection."""

import json

import pytest

from medtune import cost


def _domain(root, name, energy, wrap=1000):
    d = root / name
    d.mkdir(parents=True)
    (d / "energy_uj").write_text(str(energy))
    (d / "max_energy_range_uj").write_text(str(wrap))
    return d


def test_rapl_energy_counts_packages_once_and_survives_a_wrap(tmp_path, monkeypatch):
    monkeypatch.setattr(cost, "RAPL", tmp_path)
    pkg0, pkg1 = _domain(tmp_path, "intel-rapl:0", 900), _domain(tmp_path, "intel-rapl:1", 100)
    _domain(tmp_path, "intel-rapl:0:0", 50)  # a core subdomain: already inside package 0, not added again
    meter = cost.EnergyMeter("cpu")
    (pkg0 / "energy_uj").write_text("200")  # wrapped: 900 -> 1000 -> 200 is 300 uJ
    (pkg1 / "energy_uj").write_text("400")  # 300 uJ
    rec = meter.stop()
    assert rec["energy_source"] == "rapl" and rec["energy_j"] == pytest.approx(600e-6, abs=1e-9)


def test_no_counter_is_said_not_invented(tmp_path, monkeypatch):
    monkeypatch.setattr(cost, "RAPL", tmp_path / "absent")
    rec = cost.EnergyMeter("cpu").stop()
    assert rec["energy_j"] is None and rec["energy_source"] is None and "no RAPL package domain" in rec["energy_note"]
    assert "no energy counter is known" in cost.EnergyMeter("mps").stop()["energy_note"]


def test_recorder_writes_cost_json(tmp_path, monkeypatch):
    monkeypatch.setattr(cost, "RAPL", tmp_path / "absent")
    rec = cost.Recorder("eval").stop(tmp_path / "out", items=3)
    assert json.loads((tmp_path / "out" / "cost.json").read_text()) == rec
    assert rec["kind"] == "eval" and rec["items"] == 3 and rec["wall_s"] >= 0 and rec["device_count"] >= 1


def test_visible_devices(monkeypatch):
    monkeypatch.delenv("HIP_VISIBLE_DEVICES", raising=False)
    monkeypatch.delenv("ROCR_VISIBLE_DEVICES", raising=False)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,0")
    assert cost.visible_indices(4) == [2, 0]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-8c1f")  # UUIDs: cannot map to indices, count them all
    assert cost.visible_indices(2) == [0, 1]


def test_price_needs_a_price_for_the_device(tmp_path):
    c = {"run": "r", "wall_s": 7200.0, "device_count": 4, "device_name": "X", "train_wall_s": 3600.0,
         "train_tokens": 2_000_000, "gain_points": 5.0}
    p = cost.price(c, prices={"X": 2.0})
    assert p["cost"] == 16.0 and p["cost_per_million_train_tokens"] == 4.0 and p["cost_per_point"] == 3.2
    assert cost.price({**c, "gain_points": -1.0}, 2.0)["cost_per_point"] is None
    with pytest.raises(cost.MedtuneError, match="no price for device 'X'"):
        cost.price(c, prices={"Y": 1.0})
    bad = tmp_path / "p.yaml"
    bad.write_text("- 1\n- 2\n")
    with pytest.raises(cost.MedtuneError, match="mapping of device name"):
        cost.load_prices(bad)


def test_nvml_energy_in_millijoules(monkeypatch):
    """NVML's total-energy counter is in mJ per GPU; the meter sums the visible GPUs' differences in joules."""
    import sys
    import types

    readings = {0: 1_000, 1: 5_000}
    fake = types.SimpleNamespace(nvmlInit=lambda: None, nvmlDeviceGetCount=lambda: 2,
                                 nvmlDeviceGetHandleByIndex=lambda i: i,
                                 nvmlDeviceGetTotalEnergyConsumption=lambda h: readings[h])
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    meter = cost.EnergyMeter("cuda")
    readings.update({0: 3_500, 1: 6_000})  # +2.5 J and +1 J
    rec = meter.stop()
    assert rec["energy_source"] == "nvml" and rec["energy_j"] == pytest.approx(3.5)
