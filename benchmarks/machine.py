"""Machine description printed by the benchmark scripts beside their figures."""

from __future__ import annotations

import platform


def cpu_model() -> str:
    """Return the CPU model name from /proc/cpuinfo, or platform's guess."""
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"
