"""What a job cost: wall time, the devices it ran on and, where a counter exists, the energy they used.

Every training and eval job starts a `Recorder` and stops it with its output dir, which writes `out_dir/cost.json`. `medtune cost`
reads those files back, prices them (per device-hour, one price or a YAML keyed by device name) and divides by what
the run produced: training tokens and accuracy points gained. This lets a team compare hardware on its own job.

Energy counters, read before and after the job (cumulative counters, so the difference is the job's energy):
  NVIDIA  NVML `nvmlDeviceGetTotalEnergyConsumption` (mJ since the driver loaded; Volta and newer), via nvidia-ml-py
  AMD     amdsmi `amdsmi_get_energy_count` (accumulator x resolution, in uJ)
  CPU     Linux RAPL package domains, /sys/class/powercap/intel-rapl:N/energy_uj (AMD Zen exposes them too), when
          readable (often root-only; absent in most VMs and containers)
The counters measure whole devices: another job on the same GPU or CPU is counted too. When none is readable the
record says so (`energy_source: null` with the reason) and no energy figure is invented.
"""

from __future__ import annotations

import math
import os
import platform
import time
from pathlib import Path

from medtune.errors import MedtuneError
from medtune.records import COST_FIELDS, read_record

RAPL = Path("/sys/class/powercap")
UNKNOWN_EARLIER = ("the checkpoint's record of this run's earlier sessions is not medtune's: their cost is not "
                   "included (wall time and energy are this session's and later ones' only)")


class Recorder:
    """Started when a job starts; `stop(out_dir, **produced)` adds wall time and energy and writes out_dir/cost.json.

    Two calls instead of a `with` block, so a long function gets its cost recorded without re-indenting its body.
    A resumed training run carries its earlier sessions' cost (`so_far`, kept in each checkpoint; `resumed`), so its
    cost.json is the whole run's: every session up to its last checkpoint (work after it was lost, and is not known)."""

    def __init__(self, kind: str):
        device = device_summary()
        self.rec = {"kind": kind, **device, "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        self.meter = EnergyMeter(device["device_kind"])
        self.t0 = time.perf_counter()
        self.earlier: dict | None = None

    def resumed(self, earlier) -> None:
        """The cost a checkpoint recorded for the sessions before this one, held to cost.json's own bounds
        (records.COST_FIELDS); a value that is not one counts as unknown, and cost.json then says so."""
        ok = isinstance(earlier, dict) and all(COST_FIELDS[k](earlier.get(k)) for k in ("wall_s", "energy_j")) \
            and "sessions" in earlier and COST_FIELDS["sessions"](earlier["sessions"]) \
            and (earlier["sessions"] is not None or COST_FIELDS["earlier_sessions"](earlier.get("earlier_sessions")))
        self.earlier = earlier if ok else {"wall_s": 0.0, "energy_j": None, "sessions": None,
                                           "earlier_sessions": UNKNOWN_EARLIER}
        if ok and isinstance(earlier.get("started"), str):
            self.rec["started"] = earlier["started"]  # the run's start, not this session's

    def so_far(self) -> dict:
        """Wall time and energy from the first session until now (this session's energy: until now)."""
        now = {"wall_s": time.perf_counter() - self.t0, **self.meter.stop(), "started": self.rec["started"]}
        earlier = self.earlier or {"wall_s": 0.0, "energy_j": 0.0, "sessions": 0}
        energy = None if None in (now["energy_j"], earlier["energy_j"]) else round(now["energy_j"] +
                                                                                   earlier["energy_j"], 6)
        out = {**now, "wall_s": round(now["wall_s"] + earlier["wall_s"], 3), "energy_j": energy,
               "sessions": None if earlier["sessions"] is None else earlier["sessions"] + 1}
        if energy is None and now["energy_j"] is not None:
            out["energy_note"] = "an earlier session of this run had no energy counter: its energy is unknown"
        if "earlier_sessions" in earlier:
            out["earlier_sessions"] = earlier["earlier_sessions"]
        return out

    def stop(self, out_dir: Path | str | None, **produced) -> dict:
        self.rec.update(self.so_far())
        self.rec.update(produced)
        if out_dir is not None:
            from medtune.report import write_json

            Path(out_dir).mkdir(parents=True, exist_ok=True)
            write_json(Path(out_dir) / "cost.json", self.rec)
        return self.rec


def device_summary() -> dict:
    """Device kind, name and count as medtune's hardware detection sees them (the CPU's model name on CPU)."""
    from medtune.hardware import detect

    info = detect()
    if info.kind == "cpu" or not info.names:
        return {"device_kind": "cpu", "device_name": cpu_name(), "device_count": 1}
    return {"device_kind": info.kind, "device_name": info.names[0], "device_count": info.count}


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


class EnergyMeter:
    """Reads one cumulative energy counter family at start and at stop()."""

    def __init__(self, kind: str):
        self.source, self.reason, self._read = None, None, None
        readers = {"cuda": [("nvml", _nvml_reader)], "rocm": [("amdsmi", _amdsmi_reader)],
                   "cpu": [("rapl", _rapl_reader)]}.get(kind, [])
        problems = []
        for name, make in readers:
            try:
                self._read = make()
                self.source, self._start = name, self._read()
                break
            except Exception as e:  # noqa: BLE001 - a missing library or counter is a normal case: say why, go on
                problems.append(f"{name}: {type(e).__name__}: {e}".strip())
                self._read = None
        if self._read is None:
            self.reason = "; ".join(problems) or f"no energy counter is known for device kind {kind!r}"

    def stop(self) -> dict:
        if self._read is None:
            return {"energy_source": None, "energy_j": None, "energy_note": f"no energy counter: {self.reason}"}
        end = self._read()
        joules = sum(_delta(a, b, wrap) for (a, wrap), (b, _) in zip(self._start, end)) / 1e6
        return {"energy_source": self.source, "energy_j": round(joules, 6),
                "energy_note": "whole-device counters: other work on the same devices is included"}


def _delta(a: int, b: int, wrap: int | None) -> int:
    """A counter difference in uJ, allowing one wrap-around (RAPL wraps at max_energy_range_uj)."""
    return b - a if b >= a or not wrap else b + wrap - a


def _rapl_reader():
    """Package-level RAPL domains (intel-rapl:N, not their :N:M subdomains, which the package already includes)."""
    domains = sorted(p for p in RAPL.glob("intel-rapl:*") if p.name.count(":") == 1)
    if not domains:
        raise FileNotFoundError(f"no RAPL package domain under {RAPL}")
    wraps = [int((d / "max_energy_range_uj").read_text()) if (d / "max_energy_range_uj").is_file() else None
             for d in domains]

    def read() -> list[tuple[int, int | None]]:
        return [(int((d / "energy_uj").read_text()), w) for d, w in zip(domains, wraps)]

    read()  # PermissionError here when the counter is root-only
    return read


def _nvml_reader():
    import pynvml

    pynvml.nvmlInit()
    handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in visible_indices(pynvml.nvmlDeviceGetCount())]

    def read() -> list[tuple[int, None]]:
        return [(pynvml.nvmlDeviceGetTotalEnergyConsumption(h) * 1000, None) for h in handles]  # mJ -> uJ

    return read


def _amdsmi_reader():
    import amdsmi

    amdsmi.amdsmi_init()
    handles = amdsmi.amdsmi_get_processor_handles()
    handles = [handles[i] for i in visible_indices(len(handles))]

    def read() -> list[tuple[int, None]]:
        out = []
        for h in handles:
            e = amdsmi.amdsmi_get_energy_count(h)
            out.append((int(e["energy_accumulator"] * e["counter_resolution"]), None))
        return out

    return read


def visible_indices(count: int) -> list[int]:
    """The devices this process may use: CUDA/HIP_VISIBLE_DEVICES when they list indices, else all."""
    for var in ("CUDA_VISIBLE_DEVICES", "HIP_VISIBLE_DEVICES", "ROCR_VISIBLE_DEVICES"):
        value = os.environ.get(var)
        if value is not None and all(x.strip().isdigit() for x in value.split(",") if x.strip()):
            return [int(x) for x in value.split(",") if x.strip() and int(x) < count]
    return list(range(count))


# ---- reading and pricing recorded runs ------------------------------------------------------------------------------

def collect(run_dir: Path) -> dict:
    """Every cost.json of a run dir (its own and its eval subdirs'), summed, with training tokens and the accuracy
    gain from results.json (permutation-debiased when the run measured it)."""
    run_dir = Path(run_dir)
    parts = {}
    for path in sorted([run_dir / "cost.json", *run_dir.glob("*/cost.json")]):
        if path.is_file():
            rec = read_record(path, "cost")
            parts[path.parent.name if path.parent != run_dir else rec["kind"]] = rec  # train, base, tuned, ...
    if not parts:
        raise MedtuneError(f"{run_dir}: no cost.json here or in its subdirs; runs recorded by this version of "
                           "medtune write one per training and eval job")
    first = next(iter(parts.values()))
    energies = [p.get("energy_j") for p in parts.values()]
    out = {"run": str(run_dir), "parts": parts, "wall_s": round(sum(p["wall_s"] for p in parts.values()), 3),
           "device_kind": first["device_kind"], "device_name": first["device_name"],
           "device_count": max(p["device_count"] for p in parts.values()),
           "energy_j": round(sum(energies), 3) if all(e is not None for e in energies) else None,
           "energy_note": "; ".join(sorted({p["energy_note"] for p in parts.values() if p.get("energy_note")})),
           "train_tokens": sum(p.get("train_tokens") or 0 for p in parts.values()) or None,
           "train_wall_s": sum(p["wall_s"] for p in parts.values() if p["kind"] == "train") or None,
           "notes": [f"{name}: {p['earlier_sessions']}" for name, p in parts.items() if "earlier_sessions" in p]}
    out.update(_gain(run_dir))
    return out


def _gain(run_dir: Path) -> dict:
    path = run_dir / "results.json"
    if not path.is_file() or _kind(path) not in (None, "run"):  # an eval or train dir: a cost, no before/after
        return {"gain_points": None, "gain_kind": None}
    comparison = read_record(path, "run").get("comparison")
    if not comparison:
        return {"gain_points": None, "gain_kind": None}
    kind = "debiased" if isinstance(comparison.get("debiased"), dict) else "raw"
    return {"gain_points": round(comparison[kind]["diff"] * 100, 4), "gain_kind": kind}


def _kind(path: Path):
    """results.json's kind, or None when unreadable (read_record then names what is wrong)."""
    from medtune.data.formats import load_json

    try:
        record = load_json(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError):
        return None
    return record.get("kind", "eval") if isinstance(record, dict) else None


def load_prices(path: Path) -> dict[str, float]:
    """A YAML mapping of device name -> price per device-hour (names as `medtune cost` prints them)."""
    from medtune.config import load_yaml

    if not Path(path).is_file():  # a FIFO or a device would block or never end
        raise MedtuneError(f"{path}: not a regular file; pass a YAML file of device name -> price per device-hour")
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise MedtuneError(f"{path}: cannot read prices: {e}") from None
    data = load_yaml(text, str(path))  # safe, one line per error, a device listed twice refused
    if not isinstance(data, dict) or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and
                                             math.isfinite(v) and 0 <= v <= 1e6 for v in data.values()):
        raise MedtuneError(f"{path}: expected a mapping of device name to price per device-hour, e.g. "
                           "'NVIDIA H100 80GB HBM3: 2.5'")
    return {str(k): float(v) for k, v in data.items()}


def price(c: dict, price_per_hour: float | None = None, prices: dict[str, float] | None = None) -> dict:
    """Cost = wall hours x device count x price per device-hour; per million training tokens (training part only);
    per accuracy point gained (the whole run: both evals and the training)."""
    if price_per_hour is None:
        if not prices or c["device_name"] not in prices:
            raise MedtuneError(f"{c['run']}: no price for device {c['device_name']!r}; add it to the prices file "
                               f"or pass --price-per-hour")
        price_per_hour = prices[c["device_name"]]
    rate = price_per_hour * c["device_count"] / 3600  # per second
    total = c["wall_s"] * rate
    train_cost = c["train_wall_s"] * rate if c["train_wall_s"] else None
    gain = c["gain_points"]
    return {"price_per_device_hour": price_per_hour, "cost": total,
            "cost_per_million_train_tokens": train_cost / c["train_tokens"] * 1e6 if c["train_tokens"] and
            train_cost else None,
            "cost_per_point": total / gain if gain and gain > 0 else None}


def render(rows: list[tuple[dict, dict]]) -> str:
    """One table row per run, then one line per run on energy and on which accuracy the gain is measured with."""
    from medtune.report import render_table

    table = []
    notes = []
    for c, p in rows:
        gain = "-" if c["gain_points"] is None else f"{c['gain_points']:+.1f} ({c['gain_kind']})"
        table.append({
            "run": c["run"], "device": f"{c['device_count']} x {c['device_name']}", "wall": f"{c['wall_s']:.1f} s",
            "energy": "-" if c["energy_j"] is None else f"{c['energy_j'] / 3600:.3f} Wh",
            "price/device-h": f"{p['price_per_device_hour']:g}", "cost": f"{p['cost']:.4f}",
            "per M train tokens": _money(p["cost_per_million_train_tokens"]), "accuracy gain (points)": gain,
            "per point gained": _money(p["cost_per_point"])})
        notes.append(f"{c['run']}: energy: {c['energy_note'] or '-'}")
        notes += [f"{c['run']}: {note}" for note in c["notes"]]
        if c["gain_kind"] == "raw":
            notes.append(f"{c['run']}: no permutation-debiased accuracy in this run; the raw accuracy gain was used")
        elif c["gain_points"] is not None and c["gain_points"] <= 0:
            notes.append(f"{c['run']}: no accuracy gained, so no cost per point")
    return render_table(table, title="cost (wall time x devices x price per device-hour)").rstrip() + "\n" + \
        "\n".join(notes)


def _money(v: float | None) -> str:
    return "-" if v is None else f"{v:.4f}"
