#!/usr/bin/env python
# Refresh a notebook's committed outputs: `.venv/bin/python tools/run_nb.py nbs/03_show.ipynb`, then `nbdev-clean`.
"Execute a notebook in place with execnb (as nbdev does), keeping its outputs but not stderr (environment warnings)"
import sys
from execnb.shell import CaptureShell
from fastcore.nbio import read_nb, write_nb

if __name__ == '__main__': # worker processes a notebook starts (`compare_mixers`, spawned) import this file again: they must not run it
    p = sys.argv[1]
    CaptureShell(mpl_format='png').execute(p, p, exc_stop=True)
    nb = read_nb(p)
    for c in nb.cells:
        if c.cell_type == 'code': c.outputs = [o for o in c.outputs if not (o.output_type == 'stream' and o.name == 'stderr')]
    write_nb(nb, p)
