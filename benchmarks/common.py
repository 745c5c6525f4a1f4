"""Shared benchmark utilities: machine description, atomic JSON output."""
from __future__ import annotations

import datetime
import os
import platform
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent
RESULTS = ROOT / "results"
sys.path.insert(0, str(ROOT.parent))

from oba_fx.io import write_json  # noqa: E402

COMP = "+compensate"  # suffix naming a criterion run with compensate=True ("oba+compensate")


def t95(n: int) -> float:
    """Two-sided 95% Student-t quantile for a mean of ``n`` values (nan for one value)."""
    from scipy.stats import t

    return float(t.ppf(0.975, n - 1)) if n > 1 else float("nan")


def mean_ci(vals, t95: dict):
    """Mean of ``vals`` and the half-width of its 95% interval, from a table ``{str(n): t-quantile}``
    (the table is stored in the result JSON, so a report needs no scipy); nan half-width for one value."""
    import statistics

    n = len(vals)
    mean = statistics.mean(vals)
    half = t95[str(n)] * statistics.stdev(vals) / n ** 0.5 if n > 1 else float("nan")
    return mean, half


def machine() -> dict:
    """What the numbers were measured on."""
    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    mem_gb = None
    try:
        with open("/proc/meminfo") as f:
            mem_gb = round(int(f.readline().split()[1]) / 1024**2, 1)
    except OSError:
        pass
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                text=True).stdout.strip()
    except OSError:
        commit = ""
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "memory_gb": mem_gb,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "commit": commit,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def command_line() -> str:
    """The command that is running, as typed from the repository root."""
    return "python " + " ".join([os.path.relpath(sys.argv[0], ROOT.parent)] + sys.argv[1:])


def save(name: str, payload: dict) -> Path:
    payload = {"benchmark": name, "machine": machine(), "command": command_line(), **payload}
    return write_json(RESULTS / f"{name}.json", payload)
