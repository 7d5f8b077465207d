import os, pathlib, warnings
import pytest
_root = pathlib.Path(__file__).parents[1]
os.environ.setdefault('IPYTHONDIR', str(_root/'.cache'/'ipython'))
os.environ.setdefault('MPLCONFIGDIR', str(_root/'.cache'/'mpl'))
warnings.filterwarnings('ignore', message='.*torch.jit.script.*')

# The suite's learners stay on the CPU on a GPU machine too (fastai would pick the GPU): the CPU tests compare with
# references computed on the CPU; the CUDA tests (marked `cuda`) get fastai's own choice, the GPU, back (below).
from fastai.torch_core import defaults
defaults.use_cuda = False

@pytest.fixture(autouse=True)
def _fastai_device(request, monkeypatch):
    "Tests marked `cuda` get fastai's own choice of device, the GPU, so its transforms and learners live there"
    if request.node.get_closest_marker('cuda'): monkeypatch.setattr(defaults, 'use_cuda', None)

# Under pytest-xdist (`-n 2`, as tools/test.sh runs the suite), each worker gets one of the cores: torch's own
# threads on top would oversubscribe them.
if os.environ.get('PYTEST_XDIST_WORKER'):
    import torch
    torch.set_num_threads(1)
