"""What every benchmark prints: a header naming the machine and the library versions it ran
on, then its table, on stdout and, when asked, in a markdown file (docs/benchmarks.md quotes
these files)."""

from __future__ import annotations

import os
import platform
from pathlib import Path


def machine() -> str:
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
        mem_kib = next(
            int(line.split()[1])
            for line in Path("/proc/meminfo").read_text().splitlines()
            if line.startswith("MemTotal")
        )
        ram = f"{mem_kib / 1024**2:.0f} GiB RAM"
    except OSError:
        ram = "unknown RAM"
    return f"{os.cpu_count()} CPUs ({cpu}), {ram}, {platform.system()} {platform.release()}"


def versions() -> str:
    import peft
    import torch
    import transformers
    import trl

    return (
        f"Python {platform.python_version()}, torch {torch.__version__}, transformers "
        f"{transformers.__version__}, peft {peft.__version__}, TRL {trl.__version__}"
    )


def publish(header: str, text: str, markdown: Path | None) -> None:
    """Print the header and the table; also write them to ``markdown`` when given."""
    print(header + "\n\n" + text)
    if markdown:
        markdown.write_text(header + "\n\n" + text + "\n")
