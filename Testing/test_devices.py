"""The allocator setting training runs under (`keep_freed_memory`): freed tensor memory is reused, not re-faulted."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

from training import training_loop
from training.config import TrainConfig

GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"

# Allocates, writes and frees a 48 MB tensor (above glibc's largest own mmap threshold, 32 MB) 12 times and
# prints the minor page faults of the last 10 rounds; with the setting asked for first when argv[1] == "keep".
_FAULTS = """
import resource, sys, torch
from RadiogenomicGANLib.devices import keep_freed_memory
if sys.argv[1] == "keep":
    assert keep_freed_memory()
def once():
    torch.ones(12, 1024, 1024).mul_(2.0)
once(); once()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    once()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _faults(mode: str) -> int:
    done = subprocess.run([sys.executable, "-c", _FAULTS, mode], capture_output=True, text=True, timeout=120,
                          check=True)
    return int(done.stdout.split()[-1])


@pytest.mark.skipif(not GLIBC, reason="the setting is glibc's; elsewhere keep_freed_memory does nothing")
def test_freed_memory_is_reused_instead_of_faulted_in_again() -> None:
    plain = _faults("plain")
    # Without it every round maps the 48 MB afresh (~12 k faults a round with 4 KiB pages); a kernel that backs
    # such mappings with huge pages faults far less, and then there is nothing for the setting to save.
    if plain < 10 * 5000:
        pytest.skip(f"only {plain} page faults in 10 rounds without the setting (huge pages?): nothing to compare")
    kept = _faults("keep")
    # with it the heap block is reused (~3.7 k a round here: part of each block is still faulted in again)
    assert kept < plain / 2, (kept, plain)


def test_training_asks_for_it(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    monkeypatch.setattr(training_loop, "keep_freed_memory", lambda: calls.append(True) or True)
    training_loop.seed_and_configure_torch(TrainConfig(data="synthetic", out="-"), training_loop.torch.device("cpu"))
    assert calls == [True]
