"""The results file: `{"device", "torch", "triton", "transformers", "created", "records": [...]}`.

Every record carries the same keys (null where a key does not apply): the issue's
`op, mode, provider, dtype, B, Hq, Hkv, Lq, Lk, P, D, causal, median_ms, tflops, gbps,
peak_mem_mb`, plus `method` and `tokens_per_s` (train_step / generate), `terms`
(attention_terms: which term set), and `skipped`: null for
a measured case, else the reason it could not run (then every measurement is null).
"""
from __future__ import annotations

import datetime
import json
import platform
import re
from pathlib import Path

import torch

from .case import Case, Prepared

HEADER_KEYS = ("device", "torch", "triton", "transformers", "created")
CASE_KEYS = ("op", "mode", "provider", "method", "terms", "dtype", "B", "Hq", "Hkv", "Lq", "Lk",
             "P", "D", "causal")
MEASURE_KEYS = ("median_ms", "tflops", "gbps", "tokens_per_s", "peak_mem_mb")
RECORD_KEYS = CASE_KEYS + MEASURE_KEYS + ("skipped",)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            found = re.search(r"^model name\s*:\s*(.+)$", f.read(), re.MULTILINE)
        model = found.group(1).strip() if found else model
    except OSError:
        pass
    threads = torch.get_num_threads()
    return f"CPU: {model} ({threads} thread{'s' if threads != 1 else ''})"


def device_slug(device: torch.device) -> str:
    if device.type != "cuda":
        return "cpu"
    return re.sub(r"[^a-z0-9]+", "-", device_name(device).lower()).strip("-")


def _version(module: str) -> str | None:
    try:
        return __import__(module).__version__
    except ImportError:
        return None


def header(device: torch.device) -> dict:
    return {"device": device_name(device), "torch": torch.__version__, "triton": _version("triton"),
            "transformers": _version("transformers"),
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def measured_record(case: Case, prepared: Prepared, median_ms: float,
                    peak_mem_mb: float | None) -> dict:
    seconds = median_ms / 1e3
    rec = dict.fromkeys(RECORD_KEYS)
    rec.update(case.fields())
    rec["median_ms"] = median_ms
    rec["tflops"] = prepared.flops / seconds / 1e12 if prepared.flops else None
    rec["gbps"] = prepared.bytes / seconds / 1e9 if prepared.bytes else None
    rec["tokens_per_s"] = prepared.tokens / seconds if prepared.tokens else None
    rec["peak_mem_mb"] = peak_mem_mb
    return rec


def skipped_record(case: Case, reason: str) -> dict:
    rec = dict.fromkeys(RECORD_KEYS)
    rec.update(case.fields())
    rec["skipped"] = reason
    return rec


def write(path: Path, head: dict, records: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({**head, "records": records}, indent=1) + "\n")


def read(path: Path) -> tuple[dict, list[dict]]:
    data = json.loads(Path(path).read_text())
    return {k: data.get(k) for k in HEADER_KEYS}, data["records"]
