import os, pathlib, warnings
_root = pathlib.Path(__file__).parents[1]
os.environ.setdefault('IPYTHONDIR', str(_root/'.cache'/'ipython'))
os.environ.setdefault('MPLCONFIGDIR', str(_root/'.cache'/'mpl'))
warnings.filterwarnings('ignore', message='.*torch.jit.script.*')

# The suite's learners stay on the CPU on a GPU machine too (fastai would pick the GPU): the CPU tests compare with
# references computed on the CPU, and the CUDA tests (marked `cuda`) move their data to the GPU themselves.
from fastai.torch_core import defaults
defaults.use_cuda = False
