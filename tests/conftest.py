import os, pathlib, warnings
_root = pathlib.Path(__file__).parents[1]
os.environ.setdefault('IPYTHONDIR', str(_root/'.cache'/'ipython'))
os.environ.setdefault('MPLCONFIGDIR', str(_root/'.cache'/'mpl'))
warnings.filterwarnings('ignore', message='.*torch.jit.script.*')
