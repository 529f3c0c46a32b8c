"""systems/<system>.json: the system description the submission checker requires.

What can be measured is: `host_facts()` is recorded in results.json when the run
starts (processor, cores, sockets, memory, accelerators, OS, software versions).
What cannot (the system's name and availability, storage, networking, cooling,
memory configuration) comes from the user's --system-desc YAML; without it, or
with a field missing or empty, packaging is refused with the list of what is
missing. Field names follow the checker's SYSTEM_DESC_REQUIRED_FIELDS.
"""
from __future__ import annotations

import os
import platform
from importlib import metadata
from pathlib import Path

import torch

from wallperf.harness.config import ConfigError, read_yaml
from wallperf.harness.hardware.probe import _cpu_name, _physical_memory_gb
from wallperf.harness.loadgen.results import wallperf_version

# Asked of the user: nothing on the machine says them.
USER_FIELDS = ("system_name", "status", "host_memory_configuration", "host_storage_capacity", "host_storage_type",
               "host_networking", "host_network_card_count", "host_networking_topology", "cooling")
# Required by the checker, but free text that may be empty.
OPTIONAL_FIELDS = ("host_processor_frequency", "host_processor_caches", "host_processor_interconnect",
                   "accelerator_frequency", "accelerator_interconnect_topology", "accelerator_on-chip_memories",
                   "hw_notes", "sw_notes", "system_type_detail")
STATUSES = ("available", "preview", "rdi")


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def _sockets() -> int:
    try:
        ids = {line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
               if line.startswith("physical id")}
    except OSError:
        ids = set()
    return max(1, len(ids))


def host_facts() -> dict:
    """What this machine says about itself, recorded with each run."""
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    gpu = torch.cuda.get_device_properties(0) if gpus else None
    return {
        "host_processor_model_name": _cpu_name(),
        "host_processors_per_node": _sockets(),
        "host_processor_core_count": len(os.sched_getaffinity(0)),
        "host_memory_capacity": f"{_physical_memory_gb():.0f} GB",
        "accelerators_per_node": gpus,
        "accelerator_model_name": gpu.name if gpu else "N/A (CPU only)",
        "accelerator_memory_capacity": f"{gpu.total_memory / 1e9:.0f} GB" if gpu else "N/A",
        "operating_system": f"{platform.system()} {platform.release()}",
        "framework": f"wallperf {wallperf_version()}, PyTorch {torch.__version__}",
        "other_software_stack": f"Python {platform.python_version()}, mlcommons-loadgen "
                                f"{_version('mlcommons-loadgen')}",
    }


def read_system_desc(path: Path | None) -> dict:
    """The user's part of the description; refused (ConfigError) with every missing field named."""
    data = read_yaml(path) if path is not None else {}
    missing = [k for k in USER_FIELDS if data.get(k) in (None, "")]
    if missing:
        where = path if path is not None else "--system-desc"
        raise ConfigError(where, None, f"the system description lacks {', '.join(missing)}; write them in a "
                          "YAML file and pass it with --system-desc (status: available, preview or rdi)")
    if data["status"] not in STATUSES:
        raise ConfigError(path, "status", f"{data['status']!r} is not allowed; allowed: {', '.join(STATUSES)}")
    return data


def system_json(host: dict, user: dict, division: str, submitter: str, system_type: str) -> dict:
    """Every field the checker requires: measured, the user's, or stated for a CPU-only host."""
    no_accelerator = not host.get("accelerators_per_node")
    stated = {"number_of_nodes": 1, "system_type": system_type,
              # The checker wants a non-empty answer; a bare 0 reads to it as empty.
              "accelerators_per_node": str(host.get("accelerators_per_node", 0)),
              "accelerator_host_interconnect": "N/A" if no_accelerator else "",
              "accelerator_interconnect": "N/A" if no_accelerator else "",
              "accelerator_memory_configuration": "N/A" if no_accelerator else ""}
    desc = {**{k: "" for k in OPTIONAL_FIELDS}, **host, **stated, **user,
            "division": division, "submitter": submitter}
    empty = [k for k in ("accelerator_host_interconnect", "accelerator_interconnect",
                         "accelerator_memory_configuration") if not desc.get(k)]
    if empty:
        raise ConfigError("--system-desc", None, f"the system has accelerators; describe {', '.join(empty)}")
    return dict(sorted(desc.items()))
