"""Peak resident memory of the current process, for the benchmarks (Linux).

The benchmarks measure a call's memory as the resident-set high-water mark
(``VmHWM``) after resetting it just before the call, minus the resident set
before the input was loaded.
"""

from __future__ import annotations


def status_kib(field: str) -> int:
    """A field of ``/proc/self/status`` in KiB (e.g. ``VmRSS``, ``VmHWM``)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def reset_peak() -> None:
    """Reset ``VmHWM`` to the current resident set (``clear_refs`` value 5)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
