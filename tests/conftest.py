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

# fastai's DataLoaders (`TfmdDL`) start `defaults.cpus` worker processes at every epoch, training and validation. The
# suite's data are a few small tensors in memory: starting the workers (forks of a process that holds torch) took
# most of each tiny fit's time. The suite's fastai loaders load in the main process, as fastai's do on macOS; the
# tests marked `loader_workers` keep fastai's default (what a user on Linux gets), and so do child processes.
_CPUS = defaults.cpus
defaults.cpus = 0

@pytest.fixture(autouse=True)
def _fastai_defaults(request, monkeypatch):
    "Tests marked `cuda` get fastai's own choice of device, the GPU, so its transforms and learners live there; tests marked `loader_workers`, fastai's loader workers"
    if request.node.get_closest_marker('cuda'): monkeypatch.setattr(defaults, 'use_cuda', None)
    if request.node.get_closest_marker('loader_workers'): monkeypatch.setattr(defaults, 'cpus', _CPUS)

def pytest_configure(config):
    config.addinivalue_line('markers', "loader_workers: fastai's loaders start their worker processes, as fastai's default (the suite's load in-process)")

def pytest_collection_modifyitems(config, items):
    """The tests marked `slow` (child processes, long fits) run first, in the order collected: under pytest-xdist the
    two workers start them at once and the many short tests fill in around them, rather than one of them starting
    last and the other worker waiting for it"""
    items.sort(key=lambda item: item.get_closest_marker('slow') is None) # a stable sort

# Under pytest-xdist (`-n 2`, as tools/test.sh runs the suite), each worker gets one of the cores: torch's own
# threads on top would oversubscribe them.
if os.environ.get('PYTEST_XDIST_WORKER'):
    import torch
    torch.set_num_threads(1)
