"`compare_mixers`: the pairing of a seed's runs, resume after an interrupt, failed runs, metrics where lower is better, bad arguments, processes"
import json, math, random, sys, types
import numpy as np, pandas as pd, pytest, torch, torch.nn as nn
from fastcore.test import test_eq as eq_, test_close as close_, test_fail as fail_
from fastai.callback.core import Callback
from fastai.data.block import CategoryBlock
from fastai.metrics import accuracy
from fastai.tabular.all import TabularDataLoaders, tabular_learner, Normalize, rmse, mae
from fastai_mix.callback import MixUp, CutMix
from fastai_mix.manifold import ManifoldMixup
from fastai_mix.compare import compare_mixers, train_run, paired_summary, seeds_needed, Comparison

def table(n:int=96, seed:int=0, classes:bool=False) -> pd.DataFrame:
    "A synthetic table of three columns: y is their weighted sum plus noise (or, with `classes`, whether it is positive)"
    rng = np.random.default_rng(seed)
    df = pd.DataFrame(rng.normal(size=(n, 3)).astype('float32'), columns=['a', 'b', 'c'])
    y = df.a + 2 * df.b - df.c + rng.normal(scale=.1, size=n)
    df['y'] = (y > 0).astype(int) if classes else y.astype('float32')
    return df

DF, DFC = table(), table(classes=True)

class Record(Callback):
    "Keep the first weights and each training batch's rows, read before any mixer (order 0)"
    order = 0
    def before_fit(self): self.learn.first_weights, self.learn.batches = [p.detach().clone() for p in self.model.parameters()], []
    def before_batch(self):
        if self.training: self.learn.batches.append(self.xb[1].clone())

def learner(seed:int):
    "A tiny tabular regression, its split drawn from the seeded state"
    dls = TabularDataLoaders.from_df(DF, y_names='y', cont_names=['a', 'b', 'c'], procs=[Normalize], bs=16)
    return tabular_learner(dls, layers=[8], metrics=[rmse, mae], cbs=Record())

def classifier():
    "A tiny tabular classifier (targets: one column of class indices), built without the seed"
    dls = TabularDataLoaders.from_df(DFC, y_names='y', cont_names=['a', 'b', 'c'], procs=[Normalize], y_block=CategoryBlock(), bs=16)
    return tabular_learner(dls, layers=[8], metrics=accuracy)

def seen(learn) -> dict:
    "What a run saw: its first weights, its validation rows, the rows of each training batch"
    return dict(first=[float(p.sum()) for p in learn.first_weights], valid=learn.dls.valid.items.index.tolist(),
                batches=torch.stack(learn.batches).sum((1, 2)).tolist())

QUIET = dict(jobs=1, progress=False)

def strip(runs): return [{k: v for k, v in r.items() if k != 'sec_per_epoch'} for r in runs]

def test_pairing():
    "Within a seed every mixer gets the same weights, validation set and data order; one mixer and seed twice: the same numbers"
    res = compare_mixers(learner, {'none': None, 'mixup': MixUp, 'manifold': ManifoldMixup(), 'mixup_again': MixUp()}, seeds=[3, 4], fit=2,
                         measure=seen, **QUIET)
    runs = {(r['mixer'], r['seed']): r for r in res.runs}
    for s in (3, 4):
        none = runs['none', s]
        eq_(len(none['batches']), 2 * len(learner(s).dls.train)) # every training batch of both epochs
        for m in ('mixup', 'manifold', 'mixup_again'):
            eq_((runs[m, s]['first'], runs[m, s]['valid'], runs[m, s]['batches']), (none['first'], none['valid'], none['batches']))
            assert runs[m, s]['history'] != none['history'] # the mixer trained differently
        eq_(runs['mixup', s]['history'], runs['mixup_again', s]['history']) # a class and an instance: the same mixer, the same numbers
    assert runs['none', 3]['valid'] != runs['none', 4]['valid'] and runs['none', 3]['first'] != runs['none', 4]['first'] # another seed, other data
    again = compare_mixers(learner, {'none': None, 'mixup': MixUp}, seeds=[3, 4], fit=2, measure=seen, **QUIET)
    eq_(strip(again.runs), strip([runs[m, s] for s in (3, 4) for m in ('none', 'mixup')])) # run again: the same numbers

def test_random_state_and_mixer_left_alone():
    "The caller's random state is put back, and a mixer given as an instance is copied for each run, never trained itself"
    mix = MixUp(alpha=.3)
    random.seed(5); torch.manual_seed(5); np.random.seed(5)
    compare_mixers(learner, [None, mix], seeds=2, fit=1, **QUIET)
    a = random.random(), torch.rand(1).item(), np.random.rand()
    random.seed(5); torch.manual_seed(5); np.random.seed(5)
    eq_(a, (random.random(), torch.rand(1).item(), np.random.rand()))
    assert getattr(mix, 'learn', None) is None and mix.alpha == .3 and mix.lam is None

class Interrupt(Exception): pass

BUILT, MEASURED, INTERRUPT_AT = [], [], [0]

def counted(seed:int):
    "`learner`, counting the learners built"
    BUILT.append(seed)
    return learner(seed)

def interrupting(learn) -> dict:
    "No numbers; raises KeyboardInterrupt, as Ctrl-C would, when the `INTERRUPT_AT`-th run ends"
    MEASURED.append(1)
    if len(MEASURED) == INTERRUPT_AT[0]: raise KeyboardInterrupt
    return {}

def test_resume_after_interrupt(tmp_path):
    "An interrupt keeps the finished runs in the results file; called again, only the missing runs train, to the same numbers"
    f, kw = tmp_path/'runs.json', dict(seeds=2, fit=1, measure=interrupting, **QUIET)
    BUILT.clear(); MEASURED.clear(); INTERRUPT_AT[0] = 3 # the third run
    with pytest.raises(KeyboardInterrupt): compare_mixers(counted, [None, MixUp], results=f, **kw)
    kept = json.loads(f.read_text())
    eq_([(r['mixer'], r['seed']) for r in kept['runs']], [('none', 0), ('MixUp', 0)])
    eq_(BUILT, [0, 0, 0, 1]) # the check before training, the two runs of seed 0, the interrupted run
    BUILT.clear(); INTERRUPT_AT[0] = 0
    res = compare_mixers(counted, [None, MixUp], results=f, **kw)
    eq_(BUILT, [0, 1, 1]) # the check, then only seed 1's two runs
    fresh = compare_mixers(counted, [None, MixUp], **kw)
    eq_(strip(res.runs), strip(fresh.runs))
    eq_(res.table(), fresh.table())
    BUILT.clear()
    more = compare_mixers(counted, [None, MixUp], results=f, **{**kw, 'seeds': 3}) # one more seed: only its runs train
    eq_((BUILT, len(more.runs)), ([0, 2, 2], 6))
    fail_(compare_mixers, args=(counted, [None, MixUp]), kwargs=dict(kw, fit=2, results=f), contains="holds the runs of another comparison (fit '1' then, '2' now)")
    fail_(compare_mixers, args=(counted, [None, MixUp(alpha=1.)]), kwargs=dict(kw, results=f), contains="mixer 'MixUp'")
    fail_(compare_mixers, args=(learner, [None, MixUp]), kwargs=dict(kw, results=f), contains="learner 'test_compare.counted' then")

class FailOnSeed1(Callback):
    "A callback whose fit raises on seed 1 (torch's seed is the run's)"
    def before_fit(self):
        if torch.initial_seed() == 1: raise RuntimeError('boom on seed 1')

def test_failing_runs(tmp_path):
    "A run that raises is reported with its error, the others go on; the table pairs on the seeds that ran; resume trains it again"
    f, lines = tmp_path/'runs.json', []
    res = compare_mixers(learner, {'none': None, 'cutmix': CutMix, 'flaky': FailOnSeed1}, seeds=3, fit=1, results=f, on_run=lines.append, **QUIET)
    eq_(sorted((r['mixer'], r['seed']) for r in res.failed), [('cutmix', 0), ('cutmix', 1), ('cutmix', 2), ('flaky', 1)])
    assert all('CutMix pastes boxes into inputs with spatial dims' in r['error'] and 'Traceback' in r['traceback'] for r in res.failed if r['mixer'] == 'cutmix')
    eq_(len(res.runs), 5); eq_(len(lines), 9)
    none, cutmix, flaky = res.summary
    eq_((cutmix['verdict'], cutmix['failed']), ('failed on 3 seeds', [0, 1, 2]))
    eq_((flaky['seeds'], flaky['failed']), ([0, 2], [1]))
    close_(flaky['diffs'], [res.runs[i]['_rmse'] - res.runs[j]['_rmse'] for i, j in ((1, 0), (4, 3))]) # paired on seeds 0 and 2
    assert flaky['verdict'].endswith('failed on seed 1')
    assert '| cutmix | - |' in res.table() and 'cutmix, seed 0, failed: ValueError' in res.notes()
    eq_(len(json.loads(f.read_text())['failed']), 4)
    again = compare_mixers(learner, {'none': None, 'cutmix': CutMix, 'flaky': FailOnSeed1}, seeds=3, fit=1, results=f, on_run=lines.append, **QUIET)
    eq_(len(lines), 9 + 4) # the failed runs are tried again, and only they
    eq_(strip(again.runs), strip(res.runs))

class Sabotage(Callback):
    "Predict 10 for every sample: a much larger error than any trained model's"
    order = 100
    def after_pred(self): self.learn.pred = self.learn.pred * 0 + 10 # still a function of the weights: training goes on

def test_lower_is_better():
    "rmse and mae: lower is better, known without being told; a mixer with a larger error is worse, one with a smaller error better"
    res = compare_mixers(learner, {'none': None, 'sabotage': Sabotage}, seeds=3, fit=1, metric='rmse', **QUIET)
    eq_((res.metric, res.higher, res.ece), ('_rmse', False, False))
    row = res.summary[1]
    assert row['diff_lo'] > 0, row # a larger error on both seeds
    eq_(row['verdict'], 'worse than none')
    res = compare_mixers(learner, {'none': None, 'sabotage': Sabotage}, seeds=3, fit=1, metric='mae', base='sabotage', **QUIET)
    eq_((res.higher, res.summary[0]['verdict']), (False, 'better than sabotage'))
    assert '| none | ' in res.table() and 'lower mae is better' in res.notes()
    runs = [dict(mixer=m, seed=s, err=v) for m, vs in dict(none=[.3, .32, .31], mixup=[.28, .30, .29]).items() for s, v in enumerate(vs)]
    eq_([r.get('verdict') for r in paired_summary(runs, metric='err', higher=False, stats=())], [None, 'better than none'])
    eq_(paired_summary(runs, metric='err', higher=True, stats=())[1]['verdict'], 'worse than none')

def test_classifier_measures_ece(tmp_path):
    "A classifier's runs measure the ECE (its targets are class indices), compared seed by seed, with the pictures"
    res = compare_mixers(classifier, [None, MixUp], seeds=2, fit=1, **QUIET)
    eq_((res.metric, res.higher, res.ece), ('accuracy', True, True))
    assert all(r['calibration'] and 0 <= r['ece'] <= 1 for r in res.runs)
    assert 'calibration' in res.summary[1] and 'ECE vs none' in res.table()
    for name, fig in dict(plot=res.plot(tmp_path/'p.png'), cal=res.plot_calibration(tmp_path/'c.png'), curves=res.plot_curves(tmp_path/'k.png')).items():
        assert fig is not None, name
    assert all((tmp_path/f).stat().st_size > 1000 for f in ('p.png', 'c.png', 'k.png'))
    eq_(list(res.frame().columns[:4]), ['mixer', 'seed', 'train_loss', 'valid_loss'])
    learn = res.learner('MixUp', 1)
    assert any(isinstance(cb, MixUp) for cb in learn.cbs)

def test_bad_arguments(tmp_path):
    "Each bad argument is refused before any training, naming it"
    for mixers, msg in [([None, 'mixup'], "mixer 'str' is str 'mixup', not a mixer"), ({'none': None, 'three': 3}, "mixer 'three' is int 3, not a mixer"),
                        ([None, accuracy], 'not a mixer'), ({'none': None, 'lin': nn.Linear(2, 2)}, 'not a mixer'), ({'none': None, 'str': str}, 'not a mixer'),
                        ([None, MixUp(), MixUp(alpha=1)], 'appear more than once'), ('mixup', 'mixers must be a list'), ([], 'mixers is empty'),
                        ({'none': None, 'm': ManifoldMixup(module_list=[nn.Linear(2, 2)])}, 'holds modules of a model'),
                        ({'none': None, 'f': lambda learn: 'cutmix'}, "made str 'cutmix', not a fastai Callback")]:
        fail_(compare_mixers, args=(learner, mixers), kwargs=QUIET, contains=msg)
    for seeds, msg in [(0, 'seeds must be at least 1'), (-1, 'seeds must be at least 1'), ([], 'seeds is empty'), ([1, 1], 'seeds must be distinct'),
                       (True, 'seeds must be a number'), (1.5, 'seeds must be a number'), ([0, -2], 'non-negative int seeds')]:
        fail_(compare_mixers, args=(learner, [None, MixUp]), kwargs=dict(seeds=seeds, **QUIET), contains=msg)
    for kw, msg in [(dict(metric='accuracy'), "metric 'accuracy' is not one of the learner's: it has ['valid_loss', '_rmse', 'mae', 'train_loss']"),
                    (dict(fit=0), 'fit must be a positive number of epochs'), (dict(fit=lambda l: l.fit(1), lr=.1), 'but fit is a function'),
                    (dict(lr=-1.), 'lr must be a positive finite number'), (dict(jobs=0), 'jobs must be a positive integer'),
                    (dict(base='cutmix'), "base must be one of the mixers' names"), (dict(ece=True), 'ece=True needs a classifier'),
                    (dict(level=95), 'level must be a confidence level')]:
        fail_(compare_mixers, args=(learner, [None, MixUp]), kwargs={**QUIET, **kw}, contains=msg)
    def custom(inp, targ): return (inp - targ).abs().mean()
    fail_(compare_mixers, args=(lambda s: tabular_learner(learner(s).dls, layers=[8], metrics=custom), [None, MixUp]), kwargs=QUIET,
          contains="whether a higher 'custom' is better is not known here: give higher=True or higher=False")
    fail_(compare_mixers, args=(learner(0), [None, MixUp]), kwargs=QUIET, contains='learner must be a function that builds a Learner')
    fail_(compare_mixers, args=(lambda: 'a learner', [None, MixUp]), kwargs=QUIET, contains='learner must build a fastai Learner')
    (tmp_path/'mine.json').write_text('{"my": "data"}')
    fail_(compare_mixers, args=(learner, [None, MixUp]), kwargs=dict(results=tmp_path/'mine.json', **QUIET), contains='was not written by compare_mixers')
    eq_((tmp_path/'mine.json').read_text(), '{"my": "data"}')

def test_seeds_needed():
    eq_([seeds_needed(1, 1), seeds_needed(-.5, 1), seeds_needed(4.3, 1.2), seeds_needed(1, 0), seeds_needed(0, 1)], [7, 18, 3, 2, None])
    fail_(seeds_needed, args=(1, -1), contains='diff_std >= 0')

NOTEBOOK_CELL = '''
import pandas as pd
from fastai.tabular.all import TabularDataLoaders, tabular_learner, Normalize, rmse
def make_learner(seed):
    dls = TabularDataLoaders.from_df(df, y_names='y', cont_names=['a', 'b', 'c'], procs=[Normalize], bs=16)
    return tabular_learner(dls, layers=[8], metrics=rmse)
'''

def test_processes_take_a_notebooks_function():
    "With jobs=2 the runs train in worker processes, a learner function defined in a notebook (in __main__) included: the same numbers as in this process"
    ns = {'__name__': '__main__', 'df': DF} # as a notebook's cell defines it: pickle cannot find it by name, cloudpickle sends it whole
    exec(NOTEBOOK_CELL, ns)
    make = ns['make_learner']
    eq_(make.__module__, '__main__')
    two = compare_mixers(make, [None, MixUp], seeds=2, fit=1, jobs=2, progress=False)
    eq_(two.settings['jobs'], 2)
    one = compare_mixers(make, [None, MixUp], seeds=2, fit=1, **QUIET)
    eq_(strip(two.runs), strip(one.runs))

def test_progress_bar_and_results_folder(tmp_path):
    "With the progress bar over the runs, and a results file in a folder still to make"
    res = compare_mixers(learner, [None, MixUp], seeds=1, fit=1, jobs=1, results=tmp_path/'new'/'runs.json')
    eq_(len(json.loads((tmp_path/'new'/'runs.json').read_text())['runs']), 2)
    eq_(res.summary[1]['verdict'], 'one seed: no spread to compare with')

@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA GPU')
def test_on_gpu():
    "On a GPU the runs go one after another in this process, on the GPU, and one mixer and seed twice give the same numbers"
    res = compare_mixers(classifier, {'none': None, 'mixup': MixUp, 'mixup_again': MixUp()}, seeds=2, fit=1, progress=False)
    eq_(res.settings['jobs'], 1); assert res.settings['device'].startswith('cuda'), res.settings
    eq_(*[[r['history'] for r in res.runs if r['mixer'] == m] for m in ('mixup', 'mixup_again')])
