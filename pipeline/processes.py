"""Worker processes that end with the job that started them."""

import ctypes
import os
import signal

_PR_SET_PDEATHSIG = 1


def end_with_parent(parent_pid: int) -> None:
  """Process-pool initializer: the kernel kills this process when the job's process ends (Linux;
  elsewhere a no-op), so a killed job leaves no worker running on, holding memory and writing
  into a staging dir that the next run removes."""
  try:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
  except (OSError, AttributeError):
    return
  if os.getppid() != parent_pid:     # the job ended before the call above
    os._exit(1)
