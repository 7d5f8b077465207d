"`show_batch`: what it draws is the mixed batch, its titles are the loss's labels and shares read back from the pixels, and it leaves no trace; tables and signals too"
import json, os, random, subprocess, sys, textwrap
import numpy as np, pandas as pd, pytest, torch
import matplotlib; matplotlib.use('Agg')
import matplotlib.pyplot as plt
from matplotlib.figure import Figure
from fastcore.test import test_eq as eq_, test_close as close_
from fastai.data.core import Datasets, DataLoaders
from fastai.data.transforms import ItemGetter, Categorize, Normalize
from fastai.tabular.data import TabularDataLoaders
from fastai.tabular.core import Normalize as TabularNormalize
from fastai.torch_core import TensorImage, TensorMask, no_random, set_seed
from fastai_mix import MixHandler, MixUp, CutMix, ResizeMix, MixChoice, mix_title
import fastai_mix.show
from fastai_mix.show import untouched
from fastai_mix.test_utils import synth_learner, synth_dls, blend_shares, paste_shares

MIXERS = [MixUp, CutMix, ResizeMix]
VOCAB = ['ant', 'bee', 'cat', 'dog']

@pytest.fixture(autouse=True)
def close_figures():
    yield
    plt.close('all')

def named_dls(n=32, bs=8, shape=(3, 12, 16), seed=0):
    "Random images with names for labels, normalised on the batch: a pipeline whose decoding matters"
    g = torch.Generator().manual_seed(seed)
    xs, ys = torch.rand(n, *shape, generator=g), torch.randint(0, len(VOCAB), (n,), generator=g)
    items = [(TensorImage(x), VOCAB[y]) for x, y in zip(xs, ys)]
    dsets = Datasets(items, tfms=[[ItemGetter(0)], [ItemGetter(1), Categorize(vocab=VOCAB)]], splits=[range(n), range(n)])
    return dsets.dataloaders(bs=bs, after_batch=[Normalize.from_stats([.5] * 3, [.25] * 3, cuda=False)])

def pixel_shares(mixer, x, xm, perm):
    if isinstance(mixer, MixUp): return blend_shares(x, xm, perm)
    if isinstance(mixer, CutMix): return paste_shares(x, xm, perm)
    return 1 - (xm != x).flatten(2).any(1).float().mean(1) # ResizeMix: the pixels outside the box

def shown(fig): return torch.stack([torch.as_tensor(np.asarray(ax.images[0].get_array())).permute(2, 0, 1) for ax in fig.axes])

@pytest.mark.parametrize('mixer', MIXERS)
def test_draws_the_decoded_mixed_batch_titled_with_pixel_shares(mixer):
    mixer, dls = mixer(), named_dls()
    fig = mixer.show_batch(dls, seed=3, max_n=8, show=False)
    eq_(len(fig.axes), 8)
    dl = dls.train
    with untouched(dl, 3): # the same draws again, to know the originals and the partners
        x, y = dl.one_batch()
        _, perm, _ = mixer.mix((x,), (y,), inplace=False)
    x = dl.decode((x,))[0] # denormalised, as shown
    xm = shown(fig)
    assert xm.min() >= 0 and xm.max() <= 1 # denormalised: the random images were in [0, 1]
    shares = pixel_shares(mixer, x, xm, perm)
    for i, ax in enumerate(fig.axes):
        pct = 100 if perm[i] == i else round(100 * shares[i].item())
        eq_(ax.get_title(), mix_title(VOCAB[y[i]], VOCAB[y[perm[i]]], pct))
    assert any(perm[i] != i and 0 < shares[i] < 1 for i in range(8)) # the batch was mixed

@pytest.mark.parametrize('mixer', MIXERS)
def test_leaves_learner_data_and_random_states_as_they_were(mixer):
    def train(show):
        with no_random(1): learn = synth_learner(cbs=mixer(), shape=(3, 8, 8))
        set_seed(2)
        if show:
            cb = learn.cbs.filter(lambda o: isinstance(o, MixHandler))[0]
            learn_vars, dl_vars = dict(vars(learn)), [dict(vars(dl)) for dl in learn.dls]
            states = random.getstate(), np.random.get_state()[1].copy(), torch.get_rng_state()
            w = [p.clone() for p in learn.model.parameters()]
            n_figs = len(plt.get_fignums())
            eq_(getattr(learn, cb.name).show_batch(max_n=4), None) # shown through pyplot, as fastai's show_batch
            eq_(len(plt.get_fignums()), n_figs + 1); eq_(len(plt.gcf().axes), 4)
            assert all(vars(learn)[k] is v for k, v in learn_vars.items()) and vars(learn).keys() == learn_vars.keys()
            for dl, before in zip(learn.dls, dl_vars): assert vars(dl).keys() == before.keys() and all(vars(dl)[k] is v for k, v in before.items())
            eq_(random.getstate(), states[0]); eq_(np.random.get_state()[1], states[1]); eq_(torch.get_rng_state(), states[2])
            assert all(torch.equal(p, q) for p, q in zip(learn.model.parameters(), w)) and cb.perm is None
        learn.fit(1)
        return learn.recorder.losses
    eq_(train(show=True), train(show=False)) # training after a look is training without it

@pytest.mark.parametrize('mixer', [CutMix, ResizeMix]) # the two that paste in place
def test_a_given_batch_is_left_unchanged(mixer):
    dls = named_dls()
    b = dls.one_batch()
    b0 = tuple(o.clone() for o in b)
    fig = mixer().show_batch(dls, b=b, seed=0, max_n=3, show=False)
    assert all(torch.equal(o, o0) for o, o0 in zip(b, b0))
    for i, ax in enumerate(fig.axes): assert ax.get_title().startswith(VOCAB[b[1][i]]) # the given batch is the one shown

def test_seeds():
    dls = named_dls()
    a, b, c = (shown(CutMix().show_batch(dls, seed=s, max_n=4, show=False)) for s in (5, 5, None))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert not torch.equal(c, shown(CutMix().show_batch(dls, max_n=4, show=False))) # a new batch each call

def test_set_seed_shows_the_same_batches():
    dls = named_dls()
    def look(): return shown(CutMix().show_batch(dls, max_n=4, show=False))
    set_seed(7); a = look()
    set_seed(7); b = look()
    assert torch.equal(a, b) # as everything fastai draws after set_seed
    set_seed(8); assert not torch.equal(a, look())
    set_seed(7); random.random(); torch.rand(1) # anything that draws: from then on each look is a new batch
    c, d = look(), look()
    assert not torch.equal(c, d) and not torch.equal(a, c)

def test_bad_batch():
    dls = named_dls()
    x, y = dls.one_batch()
    with pytest.raises(ValueError, match=r'b must hold at least one sample, got an empty batch \(inputs of shape \(0, 3, 12, 16\)\)'):
        CutMix().show_batch(dls, b=(x[:0], y[:0]))
    for b, got in [(x, 'TensorImage'), ((x,), 'tuple of 1'), ([], 'list of 0')]:
        with pytest.raises(TypeError, match=f'b must be a batch as the dataloader gives it, .*, got a {got}'): CutMix().show_batch(dls, b=b)

IPYTHON_RUN = textwrap.dedent('''
    import json, sys
    from execnb.shell import CaptureShell
    SETUP = """
    from pathlib import Path
    import numpy as np
    from PIL import Image
    from torch import nn
    from fastai.vision.data import ImageDataLoaders
    from fastai.vision.augment import Resize
    from fastai.learner import Learner
    from fastai_mix import MixUp, CutMix, ResizeMix, MixChoice
    path, g = Path(sys.argv[1]), np.random.default_rng(0)
    for i in range(16): # a real image folder, two classes
        (path/'ab'[i % 2]).mkdir(parents=True, exist_ok=True)
        Image.fromarray(g.integers(0, 255, (12, 12, 3), dtype=np.uint8)).save(path/'ab'[i % 2]/f'{i}.png')
    dls = ImageDataLoaders.from_folder(path, valid_pct=0.25, seed=0, item_tfms=Resize(12), bs=4, num_workers=0)
    learn = Learner(dls, nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(3, 2)), cbs=CutMix())
    """
    sh = CaptureShell()
    def run(src):
        outs = sh.run(src)
        assert not [o for o in outs if o['output_type'] == 'error'], [o.get('evalue') for o in outs]
        return [o['output_type'] for o in outs if 'image/png' in o.get('data', {})]
    run("import sys"); run(SETUP)
    print(json.dumps({src: run(src) for src in sys.argv[2:]}))
''')

@pytest.mark.slow
def test_shown_once_in_ipython(tmp_path):
    "In an IPython kernel (execnb's, as nbdev runs notebooks) one call shows one picture, as fastai's `dls.show_batch()` does"
    calls = ['dls.show_batch(max_n=4)', 'learn.cut_mix.show_batch(max_n=4)',
             *(f'{m}.show_batch(dls, max_n=4)' for m in ('MixUp()', 'CutMix()', 'ResizeMix()', 'MixChoice([MixUp(), CutMix()])')),
             'fig = MixUp().show_batch(dls, max_n=4, show=False)', 'fig']
    env = dict(os.environ, IPYTHONDIR=str(tmp_path/'ipython'), MPLBACKEND='Agg')
    res = subprocess.run([sys.executable, '-c', IPYTHON_RUN, str(tmp_path/'images'), *calls], capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr
    outs = json.loads(res.stdout.strip().splitlines()[-1])
    eq_(outs.pop('dls.show_batch(max_n=4)'), ['display_data']) # fastai's, the reference
    eq_(outs, {**{c: ['display_data'] for c in calls[1:6]}, calls[6]: [], 'fig': ['execute_result']})

@pytest.mark.parametrize('shape,lines', [((10,), 1), ((2, 30), 2), ((3, 8, 8), None), ((1, 4, 6, 6), None)], ids=['features', 'signal', 'image', 'volume'])
@pytest.mark.parametrize('mixer', MIXERS)
def test_every_rank(mixer, shape, lines):
    dls = synth_dls(shape=shape, bs=8)
    if len(shape) == 1 and mixer is not MixUp:
        with pytest.raises(ValueError, match='use MixUp'): mixer().show_batch(dls)
        return
    fig = mixer().show_batch(dls, max_n=5, seed=0, show=False)
    eq_(len(fig.axes), 5)
    for ax in fig.axes:
        if lines: eq_(len(ax.lines), lines) # one line per channel
        else: eq_((len(ax.images), ax.images[0].get_array().shape[:2]), (1, shape[-2:])) # a volume: one slice
        assert ax.get_title()

@pytest.mark.parametrize('dtype', [torch.float16, torch.bfloat16])
def test_half_precision_batch(dtype):
    dls = synth_dls(bs=8)
    x, y = dls.one_batch()
    fig = CutMix().show_batch(dls, b=(x.to(dtype), y), max_n=4, seed=0, show=False)
    assert all(len(ax.images) == 1 for ax in fig.axes)

def test_multi_label_titles():
    dls = synth_dls(bs=8, multi_label=True)
    fig = MixUp().show_batch(dls, max_n=8, seed=0, show=False)
    assert any('%) + ' in ax.get_title() for ax in fig.axes)

def test_grid_and_errors():
    dls = named_dls()
    fig = MixUp().show_batch(dls, max_n=6, nrows=1, figsize=(12, 2), show=False)
    eq_([ax.get_subplotspec().get_geometry()[:2] for ax in fig.axes], [(1, 6)] * 6)
    eq_(tuple(fig.get_size_inches()), (12., 2.))
    eq_(len(MixUp().show_batch(dls, max_n=100, show=False).axes), 8) # no more than the batch
    with pytest.raises(ValueError, match=r'learn\.cut_mix\.show_batch\(\)'): CutMix().show_batch()
    for kw, msg in [(dict(max_n=0), 'max_n must be a positive int, got 0'), (dict(max_n=2.5), 'max_n must be'),
                    (dict(nrows=0), 'nrows must be a positive int or None'), (dict(max_n=5, nrows=2, ncols=2), 'no room for 5 samples')]:
        with pytest.raises(ValueError, match=msg): MixUp().show_batch(dls, **kw)

@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA GPU')
@pytest.mark.parametrize('mixer', MIXERS)
def test_cuda(mixer):
    dls = named_dls().to('cuda')
    states = torch.get_rng_state(), torch.cuda.get_rng_state()
    fig = mixer().show_batch(dls, max_n=4, show=False)
    eq_(len(fig.axes), 4)
    assert torch.equal(states[0], torch.get_rng_state()) and torch.equal(states[1], torch.cuda.get_rng_state())

# ---- Off the image path: a tabular batch as a mixed table, signal segmentation with its masks; a new batch on each
# call after `set_seed` ----

def table_dls(n=16, bs=8):
    "A continuous-only table with named classes, normalised: the tabular data where MixUp applies"
    g = np.random.default_rng(0)
    df = pd.DataFrame(g.normal(3, 2, size=(n, 3)), columns=['a', 'b', 'c'])
    df['y'] = np.array(['no', 'yes'])[g.integers(0, 2, n)]
    return TabularDataLoaders.from_df(df, cont_names=['a', 'b', 'c'], y_names='y', procs=[TabularNormalize], bs=bs)

@pytest.mark.parametrize('mixer', [MixUp, lambda: MixChoice([MixUp(), MixUp(alpha=1.)])], ids=['MixUp', 'MixChoice'])
def test_tabular_shows_the_mixed_table(mixer):
    mixer, dls = mixer(), table_dls()
    df = mixer.show_batch(dls, max_n=6, seed=1, show=False)
    assert isinstance(df, pd.DataFrame)
    ref = dls.train.show_batch(show=False)[0].decode().items # fastai's own: the decoded table it shows
    eq_(list(df.columns), [*ref.columns, 'partner y', 'share %'])
    eq_(len(df), 6)
    dl = dls.train
    with untouched(dl, 1): # the same draws again: the batch, the partners and the shares
        cats, conts, y = dl.one_batch()
        _, perm, lam = mixer.mix((cats, conts), (y,), inplace=False)
    raw = dl.decode((cats, conts, y)).decode().items.reset_index(drop=True) # the rows unmixed, decoded (denormalised, class names)
    lam = torch.as_tensor(lam, dtype=torch.float64).expand(len(perm))
    for i in range(6):
        j, l = int(perm[i]), float(lam[i])
        close_(df.loc[i, ['a', 'b', 'c']].to_numpy(float), l * raw.loc[i, ['a', 'b', 'c']].to_numpy(float) + (1 - l) * raw.loc[j, ['a', 'b', 'c']].to_numpy(float), eps=1e-4)
        eq_((df.loc[i, 'y'], df.loc[i, 'partner y'], df.loc[i, 'share %']), (raw.loc[i, 'y'], raw.loc[j, 'y'], 100 if i == j else round(100 * l)))
    assert set(df['y']) <= {'no', 'yes'} and (df['share %'] < 100).any() # decoded through the vocab, and mixed
    n_figs = len(plt.get_fignums())
    eq_(mixer.show_batch(dls, max_n=3), None) # shown as fastai shows a table: no figure
    eq_(len(plt.get_fignums()), n_figs)

SIGNAL_MASKS = [(CutMix, lambda m: TensorMask(m)), (CutMix, lambda m: m), (MixUp, lambda m: TensorMask(m.float()))]

@pytest.mark.parametrize('mixer,as_mask', SIGNAL_MASKS, ids=['CutMix-TensorMask', 'CutMix-int', 'MixUp-float-TensorMask'])
def test_signal_segmentation_draws_lines_and_mixed_masks(mixer, as_mask):
    "Signals (N, C, L) with (N, L) masks, through fastai's own `DataLoaders`: each signal's lines, its mixed mask as a band under them"
    g = torch.Generator().manual_seed(0)
    x, m = torch.randn(16, 2, 12, generator=g), as_mask(torch.randint(0, 3, (16, 12), generator=g))
    items = [(x[i], m[i]) for i in range(16)]
    dls = DataLoaders.from_dsets(items, items, bs=8)
    mixer = mixer()
    fig = mixer.show_batch(dls, max_n=4, seed=2, show=False)
    assert isinstance(fig, Figure)
    eq_(len(fig.axes), 4)
    dl = dls.train
    with untouched(dl, 2):
        xb, yb = dl.one_batch()
        (xm, ym), perm, lam = mixer.mix((xb,), (yb,), inplace=False)
    for i, ax in enumerate(fig.axes):
        eq_(len(ax.lines), 2) # one line per channel
        for c, line in enumerate(ax.lines): close_(line.get_ydata(), xm[0][i, c].numpy())
        eq_(len(ax.images), 1) # the mask, as a band one step per column
        eq_(np.asarray(ax.images[0].get_array()), ym[0][i].float()[None].numpy())
    assert any(not torch.equal(ym[0][i], yb[i]) for i in range(4)) # the masks shown are mixed

def lines_shown(dls): return [l.get_ydata().copy() for ax in CutMix().show_batch(dls, max_n=2, show=False).axes for l in ax.lines]
def same_lines(a, b): return all(np.array_equal(o, p) for o, p in zip(a, b))
def random_states(): return random.getstate(), np.random.get_state()[1].copy(), torch.get_rng_state()

def test_each_call_after_set_seed_shows_a_new_batch_and_set_seed_repeats_them():
    dls = synth_dls(shape=(2, 16), bs=8)
    set_seed(0)
    states = random_states()
    a, b = lines_shown(dls), lines_shown(dls)
    assert not same_lines(a, b) # a new batch each call, also when nothing drew in between
    eq_(random_states()[0], states[0]); eq_(random_states()[1], states[1]); eq_(random_states()[2], states[2]) # the random states as they were
    set_seed(0)
    c, d = lines_shown(dls), lines_shown(dls)
    assert same_lines(a, c) and same_lines(b, d) # set_seed shows the same ones again
    set_seed(1); assert not same_lines(a, lines_shown(dls))
    set_seed(0); lines_shown(dls); CutMix().show_batch(dls, seed=5, show=False) # a call with a seed of its own does not count
    assert same_lines(b, lines_shown(dls))

def test_without_a_seeding_mark_the_states_decide(monkeypatch):
    "A torch that queues no seeding to read: right after `set_seed` every call shows that seed's batch (the rule documented in 03_show)"
    monkeypatch.setattr(fastai_mix.show, '_seed_mark', lambda: None)
    dls = synth_dls(shape=(2, 16), bs=8)
    set_seed(0); a, b = lines_shown(dls), lines_shown(dls)
    assert same_lines(a, b)
    random.random(); c, d = lines_shown(dls), lines_shown(dls)
    assert not same_lines(c, d)
