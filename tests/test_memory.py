import json
import subprocess
import sys

import pytest

# Allocate and free an 80 MB array 20 times; report the minor page faults that cost.
_PROBE = """
import json, resource, sys
import numpy as np
from edgemeta.runtime.malloc import retain_freed_memory
took = retain_freed_memory() if sys.argv[1] == "retain" else None
np.ones(10_000_000).sum()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):
    np.ones(10_000_000).sum()
print(json.dumps({"took": took, "faults": resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before}))
"""


def _faults(mode: str) -> dict:
    out = subprocess.run([sys.executable, "-c", _PROBE, mode], capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt: Linux only")
def test_retained_memory_is_reused_without_page_faults():
    default, retained = _faults("default"), _faults("retain")
    if retained["took"] is False:
        pytest.skip("this libc has no mallopt (not glibc)")
    # default glibc maps and unmaps each 80 MB block, so every allocation faults its pages in again
    # (12,500 faults for the 20 here, with transparent huge pages); retained, the heap is reused
    assert default["faults"] >= 20
    assert retained["faults"] * 20 < default["faults"]

