# `python -m fastai_mix`: the `fastai-mix` command. Written by hand like __init__.py: nbdev 3 cannot export
# to a module that a notebook does not own (`#| export __main__` appends on every export).
from .demo import main
if __name__ == "__main__": main()
