__version__ = "0.1.0"
# The one file of the package written by hand: nbdev-export keeps it, and only gathers the public names here.
from .core import *
from .callback import *
from .show import *
from .fmix import *
from .manifold import *
from .calibration import *
from .snapmix import *
from .transmix import *
from .compare import *
