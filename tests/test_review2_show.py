"`show_batch` off the image path (issue 20, items 9, 10 and 17): a tabular batch as a mixed table, signal segmentation with its masks, and a new batch on each call after `set_seed`"
import random
import numpy as np, pandas as pd, pytest, torch
import matplotlib; matplotlib.use('Agg')
import matplotlib.pyplot as plt
from matplotlib.figure import Figure
from fastcore.test import test_eq as eq_, test_close as close_
from fastai.data.core import DataLoaders
from fastai.tabular.data import TabularDataLoaders
from fastai.tabular.core import Normalize
from fastai.torch_core import TensorMask, set_seed
from fastai_mix import MixUp, CutMix, MixChoice
import fastai_mix.show
from fastai_mix.show import untouched
from fastai_mix.test_utils import synth_dls

@pytest.fixture(autouse=True)
def close_figures():
    yield
    plt.close('all')

def table_dls(n=16, bs=8):
    "A continuous-only table with named classes, normalised: the tabular data where MixUp applies"
    g = np.random.default_rng(0)
    df = pd.DataFrame(g.normal(3, 2, size=(n, 3)), columns=['a', 'b', 'c'])
    df['y'] = np.array(['no', 'yes'])[g.integers(0, 2, n)]
    return TabularDataLoaders.from_df(df, cont_names=['a', 'b', 'c'], y_names='y', procs=[Normalize], bs=bs)

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

def look(dls): return [l.get_ydata().copy() for ax in CutMix().show_batch(dls, max_n=2, show=False).axes for l in ax.lines]
def same(a, b): return all(np.array_equal(o, p) for o, p in zip(a, b))
def random_states(): return random.getstate(), np.random.get_state()[1].copy(), torch.get_rng_state()

def test_each_call_after_set_seed_shows_a_new_batch_and_set_seed_repeats_them():
    dls = synth_dls(shape=(2, 16), bs=8)
    set_seed(0)
    states = random_states()
    a, b = look(dls), look(dls)
    assert not same(a, b) # a new batch each call, also when nothing drew in between
    eq_(random_states()[0], states[0]); eq_(random_states()[1], states[1]); eq_(random_states()[2], states[2]) # the random states as they were
    set_seed(0)
    c, d = look(dls), look(dls)
    assert same(a, c) and same(b, d) # set_seed shows the same ones again
    set_seed(1); assert not same(a, look(dls))
    set_seed(0); look(dls); CutMix().show_batch(dls, seed=5, show=False) # a call with a seed of its own does not count
    assert same(b, look(dls))

def test_without_a_seeding_mark_the_states_decide(monkeypatch):
    "A torch that queues no seeding to read: right after `set_seed` every call shows that seed's batch (the rule documented in 03_show)"
    monkeypatch.setattr(fastai_mix.show, '_seed_mark', lambda: None)
    dls = synth_dls(shape=(2, 16), bs=8)
    set_seed(0); a, b = look(dls), look(dls)
    assert same(a, b)
    random.random(); c, d = look(dls), look(dls)
    assert not same(c, d)
