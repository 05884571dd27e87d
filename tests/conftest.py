import atexit
import os
import shutil
import tempfile

import pytest
import torch

# Without a GPU, Triton kernels run in Triton's CPU interpreter (must be set before import).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# A compile cache of this session only: PyTorch's AOTAutograd cache keys natkit's custom ops
# by name, so compiled backwards cached before a change of natkit's backward ops would be
# replayed against the new ops (and fail, or test old code). Removed at exit.
if "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
    _cache = tempfile.mkdtemp(prefix="natkit-tests-inductor-")
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = _cache
    atexit.register(shutil.rmtree, _cache, ignore_errors=True)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
