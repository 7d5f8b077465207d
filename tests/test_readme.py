"""The README as a user reads it: every Python block runs as written, top to bottom in one process, and every link to a
file or to a section of a notebook or a markdown file resolves (the section anchors as Quarto, through pandoc, makes them
for the docs site nbdev builds)."""
import json, os, re
from pathlib import Path
import pytest, torch.nn as nn
from fastcore.test import test_eq as eq_
from fastai.learner import Learner
from fastai.losses import CrossEntropyLossFlat
from fastai_mix import MixHandler, ResizeMix
from fastai_mix.test_utils import synth_dls
from test_callback import Mixing

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT/'README.md').read_text()

def python_blocks(text:str) -> list[str]: return re.findall(r"^```python\n(.*?)^```", text, re.S | re.M)

def anchor(heading:str) -> str:
    "pandoc's `auto_identifiers` (Quarto's): formatting and links dropped, only letters, digits, `_-.` and spaces kept, spaces to hyphens, lower case, nothing before the first letter"
    s = re.sub(r'\[([^\]]*)\]\([^)]*\)', r'\1', heading).replace('`', '').replace('*', '')
    s = ''.join(ch for ch in s if ch.isalnum() or ch in '_-.' or ch.isspace())
    s = re.sub(r'^[^a-z]+', '', re.sub(r'\s+', '-', s.strip()).lower())
    return s or 'section'

def headings(markdown:str) -> list[str]:
    "The headings of a markdown text, outside fenced code"
    out, fenced = [], False
    for line in markdown.splitlines():
        if line.startswith('```'): fenced = not fenced
        elif not fenced and (m := re.match(r'#{1,6}\s+(.*?)\s*#*\s*$', line)): out.append(m[1])
    return out

def anchors(path:Path) -> set[str]:
    "The section anchors of a notebook (its markdown cells) or of a markdown file"
    if path.suffix == '.ipynb':
        cells = json.loads(path.read_text())['cells']
        text = '\n\n'.join(''.join(c['source']) for c in cells if c['cell_type'] == 'markdown')
    else: text = path.read_text()
    return {anchor(h) for h in headings(text)}

def links(text:str) -> list[str]:
    "The targets of the markdown links and images of `text`, outside fenced code"
    prose = re.sub(r"^```.*?^```", '', text, flags=re.S | re.M)
    return re.findall(r'\]\(([^)\s]+)\)', prose)

def test_anchor_rule():
    "pandoc's rule, as Quarto applies it (https://pandoc.org/MANUAL.html#extension-auto_identifiers)"
    assert anchor('When does mixing pay? Three measured settings') == 'when-does-mixing-pay-three-measured-settings'
    assert anchor('The `FMix` callback') == 'the-fmix-callback'
    assert anchor('1. Label noise: the digits') == 'label-noise-the-digits'
    assert anchor('Writing *a* [mixer](x.md)') == 'writing-a-mixer'

def test_links_resolve():
    "Every link of the README to a file exists, and every `file#section` names a heading of that file"
    targets = [t for t in links(README) if not re.match(r'[a-z]+:', t)]
    assert len(targets) > 20 and any('.ipynb#' in t for t in targets)
    bad = []
    for t in targets:
        file, _, sec = t.partition('#')
        path = ROOT/file if file else ROOT/'README.md'
        if not path.exists(): bad.append(f"{t}: no file {file}"); continue
        if sec and sec not in anchors(path): bad.append(f"{t}: {file or 'README.md'} has no section #{sec} ({sorted(anchors(path))})")
    assert not bad, '\n'.join(bad)

def test_a_broken_link_is_found():
    assert links("see [x](nbs/00_core.ipynb#nowhere) and ![p](assets/x.png)\n```python\n[a](b)\n```") == ['nbs/00_core.ipynb#nowhere', 'assets/x.png']
    assert 'nowhere' not in anchors(ROOT/'nbs'/'00_core.ipynb')

def test_readme_is_short():
    "The README is a landing page; the notebooks hold the reference"
    assert len(README.splitlines()) <= 150

@pytest.mark.loader_workers # as the user runs it: fastai's loaders with their worker processes
def test_python_blocks_run(tmp_path, monkeypatch):
    "Every Python block of the README, as written, top to bottom in one namespace, in a fresh working directory"
    import matplotlib; matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    blocks = python_blocks(README)
    assert blocks and 'fit_one_cycle' in blocks[0] and 'show_batch' in blocks[0]
    monkeypatch.chdir(tmp_path)
    ns = {}
    for b in blocks: exec(compile(b, 'README.md', 'exec'), ns)
    plt.close('all')
    learn = ns['learn']
    assert type(learn.cut_mix).__name__ == 'CutMix' and len(learn.recorder.values) == 1 # the last fit's one epoch
    assert learn.loss_func is learn.dls.loss_func or type(learn.loss_func).__name__ == 'CrossEntropyLossFlat'

def test_sidebar_lists_every_notebook():
    "nbs/sidebar.yml (committed, in reading order: `custom_sidebar`) gives every notebook a page in the docs site, once"
    import yaml
    from nbdev.config import get_config
    assert get_config(str(ROOT)).custom_sidebar # else nbdev-proc-nbs would rewrite it in file order
    def files(items): return [f for i in items for f in (files(i['contents']) if isinstance(i, dict) else [i])]
    listed = files(yaml.safe_load((ROOT/'nbs'/'sidebar.yml').read_text())['website']['sidebar']['contents'])
    assert sorted(listed) == sorted(p.name for p in (ROOT/'nbs').glob('*.ipynb')), listed

def test_options_each_mixer_refuses_are_the_readmes():
    "The README says which mixers refuse `decoupled`, `remix`, `label_mode='union'` and `partner='kernel'` (every other mixer takes them): "
    "each mixer, made with each option, refuses exactly those"
    from fastai_mix import MixUp, CutMix, ResizeMix, FMix, TransMix, SnapMix, ManifoldMixup, OutputMixup
    opts = {"`decoupled`": dict(decoupled=.1), "`remix`": dict(remix=(3, .5)), "`label_mode='union'`": dict(label_mode='union'),
            "`partner='kernel'`": dict(partner='kernel')}
    prose = ' '.join(README.split())
    said = {m: set(re.findall(r"`[^`]+`", what)) for m, what in re.findall(r"(\w+) refuses ((?:`[^`]+`(?:, | and )?)+)", prose)}
    assert set(said) == {'SnapMix', 'TransMix'}, said
    for cls in (MixUp, CutMix, ResizeMix, FMix, TransMix, SnapMix, ManifoldMixup, OutputMixup):
        refused = set()
        for name, kw in opts.items():
            try: cls(**kw)
            except ValueError: refused.add(name)
        assert refused == said.get(cls.__name__, set()), (cls.__name__, refused)

# ---- the Usage block, on small synthetic images: the mixer on the learner, and one given to a fit ----

def readme_usage():
    usage = README.split('## Usage', 1)[1]
    return re.search(r"```python\n(.*?)```", usage, re.S).group(1)

def test_readme_usage_block(monkeypatch, tmp_path):
    "The README's Usage block as written, on small synthetic images: CutMix on the learner mixes the fit, and stays on it"
    import fastai.vision.all as va
    spy = Mixing()
    made, lfs = [], []
    def vision_learner(dls, arch, loss_func=None, cbs=None, **kwargs): # the README's call, on a tiny model (no download)
        made.append(Learner(dls, nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, dls.c)), loss_func=loss_func or CrossEntropyLossFlat(), cbs=[cbs, spy]))
        lfs.append(made[-1].loss_func) # fastai infers this loss from the digits' labels
        return made[-1]
    dls = synth_dls(n=16, bs=16)
    dls.c = 4
    class ImageDataLoaders: from_folder = staticmethod(lambda *a, **k: dls) # the README's folder of digits, as small synthetic images
    monkeypatch.setattr(va, 'vision_learner', vision_learner)
    monkeypatch.setattr(va, 'ImageDataLoaders', ImageDataLoaders)
    monkeypatch.chdir(tmp_path) # the block writes its digits into the working directory
    code = readme_usage()
    assert 'cbs=CutMix()' in code and 'show_batch' in code
    exec(code, {})
    learn = made[0]
    eq_(spy.fits, [[['CutMix']]]) # one epoch of one batch, mixed by CutMix (show_batch trains nothing)
    assert [type(cb).__name__ for cb in learn.cbs if isinstance(cb, MixHandler)] == ['CutMix']
    assert learn.loss_func is lfs[0] # the learner's own loss, after the fit
    learn.fit(1, cbs=ResizeMix()) # the README's "for one fit only", with another mixer: it replaces CutMix there
    eq_(spy.seen, [['ResizeMix']])
    assert not hasattr(learn, 'resize_mix') and learn.loss_func is lfs[0]
