import os

import torch

# Triton kernels run in Triton's CPU interpreter when no GPU is present. The variable
# must be set before any kernel is decorated, so it is set here, before test modules import.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

torch.set_num_threads(max(1, os.cpu_count() or 1))
