#!/usr/bin/env python
"""Draw the README's picture, assets/mixed_batch.png: one training batch of real digits mixed by `CutMix(per_sample=True)`,
as `show_batch` draws it (each sample titled with its label and its partner's, with the shares the loss uses). Seeded: running
it again gives the same picture.

    .venv/bin/python tools/readme_picture.py"""
import tempfile
from pathlib import Path
import matplotlib
matplotlib.use('Agg')
from fastai_mix import CutMix
from fastai_mix.demo import write_digits, image_datasets, image_dls

ROOT = Path(__file__).resolve().parent.parent

if __name__ == '__main__':
    with tempfile.TemporaryDirectory() as d:
        dls = image_dls(image_datasets(write_digits(Path(d)/'digits', n_train=64), size=32), bs=16)
        fig = CutMix(per_sample=True).show_batch(dls, max_n=5, nrows=1, figsize=(11, 2.8), seed=3, show=False)
        fig.savefig(ROOT/'assets'/'mixed_batch.png', dpi=80, bbox_inches='tight')
    print(f"written {ROOT/'assets'/'mixed_batch.png'}")
