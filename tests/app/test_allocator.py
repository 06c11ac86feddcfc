"""keep_freed_memory (app/allocator.py): a large tensor reuses the pages of a freed larger one.

Counted in page faults (``ru_minflt``), not in seconds: a fresh 256 MB tensor faults in
each of its 65 536 pages of 4 kB when first written (fewer with transparent huge pages),
one placed in freed memory almost none.  (The freed block is larger so that the tensor
fits in it whatever small allocations came after it: a block of exactly the same size is
not always reused, as the aligned request is slightly larger.)  Run in a subprocess: the
setting is for the whole process.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

SCRIPT = """
import resource, sys, torch
from subriemann.app.allocator import keep_freed_memory
applied = keep_freed_memory() if sys.argv[1] == "keep" else None
big = torch.empty(2**26, dtype=torch.float64)  # 512 MB, written and freed
big.fill_(1.0)
del big
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
t = torch.empty(2**25, dtype=torch.float64)  # 256 MB: fits in the freed block
t.fill_(1.0)
print(applied, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _faults(mode: str) -> tuple[str, int]:
    out = subprocess.run([sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True,
                         check=True)  # fmt: skip
    applied, faults = out.stdout.split()
    return applied, int(faults)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc only")
def test_freed_memory_is_reused_without_page_faults():
    applied, kept = _faults("keep")
    if applied != "True":
        pytest.skip("not glibc")
    _, fresh = _faults("default")
    assert kept < 1_000 and fresh > 10 * max(kept, 100), (kept, fresh)
