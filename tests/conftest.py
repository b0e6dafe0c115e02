"""Fixtures shared by the tests. Helpers that tests, benchmarks and tools share live in cdiff.testing."""

import os

import pytest
import torch

from cdiff import testing

# Triton kernels run in Triton's CPU interpreter when no GPU is present. The variable
# must be set before any kernel is decorated, so it is set here, before test modules import.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

torch.set_num_threads(max(1, os.cpu_count() or 1))


@pytest.fixture
def one_thread():
    """The test on one torch thread: two OpenMP threads on two shared, busy cores run 10-30x slower."""
    with testing.one_thread():
        yield


@pytest.fixture(scope="session")
def small_config():
    """small_config(model_path, *sets): the run config of cdiff.testing.SMALL_RUN from the native
    file ``model_path`` (e.g. cdiff.testing.micro_model), with ``--set`` overrides ``sets``."""
    from cdiff.train.configfile import load_config

    def make(model_path, *sets: str):
        return load_config(None, [f"model.init={model_path}", *testing.SMALL_RUN, *sets])

    return make


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """A tiny C-DiffSET native file with seeded random weights and a custom stored prompt (the translate tests')."""
    from cdiff import save_native
    from tests.translating import PROMPT, tiny_modules

    path = tmp_path_factory.mktemp("model") / "tiny.safetensors"
    return save_native(path, *tiny_modules(), prompt=PROMPT)


@pytest.fixture
def inputs(tmp_path):
    """A folder of SAR images: two 64-px greys (PNG, JPEG) and a 72x100 RGB in a subfolder."""
    from tests.translating import sar_png

    folder = tmp_path / "sar"
    sar_png(folder / "a.png", 64)
    sar_png(folder / "sub" / "b.png", (72, 100), seed=1, rgb=True)  # not a multiple of 64: padded, cropped back
    sar_png(folder / "c.jpg", 64, seed=2)
    return folder
