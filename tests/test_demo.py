"The `fastai-mix demo` command end to end: the digits, `--data` folders, label noise, the paired comparison, the written results, its usage errors, `--jobs`"
import json, math, subprocess, sys
import numpy as np, pytest, torch
from pathlib import Path
from PIL import Image
from fastcore.test import test_eq as eq_, test_close as close_, test_fail as fail_
from fastai.data.transforms import get_image_files, parent_label
from fastai.torch_core import defaults
from fastai.learner import Learner
from fastai.losses import CrossEntropyLossFlat
from fastai_mix.demo import (DEFAULT_MIX, main, run_demo, train_mixer, write_digits, stage_folder, noisy_labels, true_label, image_datasets,
                             image_dls, make_model, memorisation, paired_summary, results_table, MIXERS)

NUMS = ('train_loss', 'valid_loss', 'accuracy', 'sec_per_epoch')

def read_results(out:Path, n:int) -> dict:
    "Check the files the demo writes into `out` for `n` runs, and return results.json"
    res = json.loads((out/'results.json').read_text())
    eq_(len(res['runs']), n)
    for r in res['runs']:
        assert r['mixer'] in MIXERS and isinstance(r['seed'], int)
        assert all(math.isfinite(r[k]) for k in NUMS), r
        assert 0 <= r['accuracy'] <= 1 and r['sec_per_epoch'] > 0
        assert r['memorised'] is None or 0 <= r['memorised'] <= 1
        assert r['history'] and all(math.isfinite(v) for h in r['history'] for v in h.values())
    mixers = list(dict.fromkeys(r['mixer'] for r in res['runs']))
    eq_([r['mixer'] for r in res['summary']], mixers)
    eq_(res['summary'], json.loads(json.dumps(paired_summary(res['runs'])))) # the summary is recomputed from the per-seed numbers
    rows = [l for l in (out/'results.md').read_text().splitlines() if l.startswith('| ') and not l.startswith('| mixer')]
    eq_([l.split('|')[1].strip() for l in rows], mixers)
    mixed = [m for m in mixers if m != 'none']
    eq_(sorted(o.name for o in out.glob('batch_*.png')), sorted(f'batch_{m}.png' for m in mixed)) # one mixed batch per mixer
    for f in ['accuracy.png', 'curves.png', *(f'batch_{m}.png' for m in mixed)]:
        with Image.open(out/f) as im:
            eq_(im.format, 'PNG'); im.load()
            assert im.size[0] > 100 and im.size[1] > 100 and np.asarray(im).std() > 0, f # drawn, not blank
    return res

def random_images(path:Path, classes=('cat', 'dog', 'emu'), n:int=8, seed:int=0) -> Path:
    "A folder of one sub-folder of `n` random RGB PNGs (of varied sizes) per class"
    rng = np.random.default_rng(seed)
    for c in classes:
        (path/c).mkdir(parents=True)
        for i in range(n):
            h, w = rng.integers(10, 30, 2)
            Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path/c/f'{c}{i}.png')
    return path

TINY = ['--epochs', '1', '--n-train', '64', '--size', '16', '--bs', '32', '--jobs', '1'] # in this process: no workers to start

@pytest.mark.slow
def test_demo_end_to_end(tmp_path, capsys):
    "The whole experiment at tiny size: 4 mixers x 2 seeds, paired, with its pictures and every per-seed number"
    main(['demo', *TINY, '--seeds', '2', '--noise', '0.25', '--out', str(tmp_path)])
    res = read_results(tmp_path, 8)
    eq_([(r['mixer'], r['seed']) for r in res['runs']], [(m, s) for s in (0, 1) for m in DEFAULT_MIX])
    s = res['settings']
    eq_((s['epochs'], s['n_train'], s['size'], s['bs'], s['arch'], s['noise'], s['seeds'], s['n_changed']), (1, 64, 16, 32, 'small', .25, [0, 1], 16))
    for seed in (0, 1):
        tr = get_image_files(tmp_path/'digits'/f'seed{seed}'/'train')
        eq_(len(tr), 64); eq_(sum(parent_label(f) != true_label(f) for f in tr), 16)
        eq_(len(get_image_files(tmp_path/'digits'/f'seed{seed}'/'valid')), 359)
    assert get_image_files(tmp_path/'digits'/'seed0'/'train') != get_image_files(tmp_path/'digits'/'seed1'/'train') # each seed its own subset
    for r in res['runs']: eq_(len(r['history']), 1); eq_(r['n_changed'], 16)
    acc = {(r['mixer'], r['seed']): r['accuracy'] for r in res['runs']}
    for row in res['summary'][1:]: # the paired differences are those of the per-seed numbers
        close_(row['diffs'], [acc[row['mixer'], s] - acc['none', s] for s in (0, 1)])
    printed = capsys.readouterr().out
    assert results_table(paired_summary(res['runs'])) in printed and 'wall time' in printed
    assert 'within the noise' in printed # the printed rule

def test_paired_summary_by_hand():
    "Paired by seed (not by position), with the t interval and the verdict in words"
    acc = dict(none=[.70, .72, .68], mixup=[.78, .80, .76], cutmix=[.74, .70, .69])
    runs = [dict(mixer=m, seed=s, accuracy=a, memorised=.9 if m == 'none' else .2) for m, v in acc.items() for s, a in zip((5, 6, 7), v)]
    runs = runs[::-1] # the order of the runs does not matter, the seeds do: here none's come as 7, 6, 5 and the others' too,
    runs = runs[:6] + [runs[7], runs[8], runs[6]] # then none's as 6, 5, 7: pairing by position would pair other seeds
    summ = {r['mixer']: r for r in paired_summary(runs)}
    eq_(list(summ), ['cutmix', 'mixup', 'none'])
    close_(summ['none']['accuracy'], .70); close_(summ['none']['accuracy_std'], .02); close_(summ['none']['memorised'], .9)
    close_(summ['mixup']['diffs'], [.08, .08, .08]); close_(summ['mixup']['diff_std'], 0); eq_(summ['mixup']['verdict'], 'better than none')
    d = np.array([.04, -.02, .01])
    close_(summ['cutmix']['diffs'], d); close_(summ['cutmix']['diff'], d.mean()); close_(summ['cutmix']['diff_std'], d.std(ddof=1))
    half = 4.302653 * d.std(ddof=1) / math.sqrt(3) # t(0.975, 2)
    close_((summ['cutmix']['diff_lo'], summ['cutmix']['diff_hi']), (d.mean() - half, d.mean() + half), eps=1e-6)
    eq_(summ['cutmix']['verdict'], 'within the noise')
    worse = paired_summary([dict(mixer=m, seed=s, accuracy=a, memorised=None) for m, v in dict(none=[.9, .8, .85], resizemix=[.85, .76, .8]).items()
                            for s, a in enumerate(v)])[1]
    eq_(worse['verdict'], 'worse than none'); eq_(worse['memorised'], None)
    table = results_table(paired_summary(runs))
    assert '| mixup | 78.0 ± 2.0 | +8.0 ± 0.0 | +8.0 to +8.0 | 20.0 ± 0.0 | better than none |' in table, table
    fail_(paired_summary, args=(runs[:-1],), contains='a paired comparison needs the same seeds') # none lacks seed 7

@pytest.mark.slow
def test_same_seed_same_table(tmp_path, capsys):
    "The same seeds give the same numbers and the same table; another seed gives others"
    tables = []
    for i, seed in enumerate((3, 3, 4)):
        res = run_demo(mix=('none', 'cutmix'), epochs=1, n_train=64, size=16, bs=32, seed=seed, seeds=1, out=tmp_path/str(i), jobs=1, progress=False)
        tables.append((results_table(res['summary']), [(r['history'], r['memorised']) for r in res['runs']]))
    eq_(tables[0], tables[1])
    assert tables[0][1] != tables[2][1]

def test_batch_picture_changes_nothing(tmp_path):
    "Drawing the mixed batch before training leaves the run as it would be without it"
    dsets = image_datasets(write_digits(tmp_path/'digits', n_train=128), size=16)
    runs = [train_mixer(dsets, 'cutmix', epochs=1, bs=32, show=show, progress=False) for show in (tmp_path/'b.png', None)]
    eq_(runs[0]['history'], runs[1]['history'])
    assert (tmp_path/'b.png').stat().st_size > 1000

def test_memorisation_bookkeeping(tmp_path):
    "`memorisation` compares each changed image's prediction with its own labels: a model predicting the wrong labels memorised all"
    dsets = image_datasets(write_digits(tmp_path/'digits', n_train=40, noise=.5, seed=1), size=16)
    files = dsets.train.items
    learn = Learner(image_dls(dsets, bs=8), make_model('small', 10), loss_func=CrossEntropyLossFlat())
    def oracle(label_of):
        "get_preds that predicts `label_of(file)` for every file of the dataloader"
        def get_preds(dl): return torch.eye(10)[[int(label_of(f)) for f in dl.dataset.items]], None
        return get_preds
    learn.get_preds = oracle(parent_label) # the wrong labels it was trained on
    eq_(memorisation(learn, files), dict(memorised=1., corrected=0., n_changed=20))
    learn.get_preds = oracle(true_label) # the right ones
    eq_(memorisation(learn, files), dict(memorised=0., corrected=1., n_changed=20))
    learn.get_preds = oracle(lambda f: true_label(f) if int(f.stem[:4]) % 2 else parent_label(f)) # by the image's index
    m = memorisation(learn, files)
    even = np.mean([int(f.stem[:4]) % 2 == 0 for f in files if parent_label(f) != true_label(f)])
    close_((m['memorised'], m['corrected']), (even, 1 - even))
    assert 0 < even < 1
    eq_(memorisation(learn, image_datasets(write_digits(tmp_path/'clean', n_train=40), size=16).train.items),
        dict(memorised=None, corrected=None, n_changed=0))

@pytest.mark.slow
def test_python_m(tmp_path, capsys):
    "`python -m fastai_mix` is the `fastai-mix` command (its help read in this process: one child process is enough)"
    with pytest.raises(SystemExit) as e: main(['demo', '--help'])
    out = capsys.readouterr().out
    eq_(e.value.code, 0); assert '--mix NAMES' in out and 'batch_<mixer>.png' in out and '--seeds N' in out
    r = subprocess.run([sys.executable, '-m', 'fastai_mix', 'demo', '--mix', 'none,mixup', *TINY, '--seeds', '1', '--out', str(tmp_path)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    assert '| mixup |' in r.stdout and 'one seed: no spread' in r.stdout
    read_results(tmp_path, 2)

@pytest.mark.parametrize('split', [False, True])
def test_data_folder(tmp_path, split):
    src = tmp_path/'src'
    if split: random_images(src/'train', n=8); random_images(src/'valid', n=3, seed=1)
    else: random_images(src, n=10)
    before = sorted(get_image_files(src))
    out = tmp_path/'out'
    main(['demo', '--data', str(src), '--mix', 'none,cutmix', '--epochs', '1', '--bs', '8', '--size', '16', '--seeds', '1', '--jobs', '1',
          '--noise', '0', '--n-train', 'all', '--out', str(out)])
    res = read_results(out, 2)
    eq_(res['settings']['data'], str(src)); eq_(res['settings']['images'], str(src)) # read in place
    assert not (out/'digits').exists() and not (out/'data').exists()
    eq_(sorted(get_image_files(src)), before)

@pytest.mark.parametrize('split', [False, True])
def test_data_folder_subset_and_noise(tmp_path, split):
    "With --n-train or --noise, a --data folder is linked under --out with the changed labels, and left as it was"
    src = tmp_path/'src'
    if split: random_images(src/'train', n=8); random_images(src/'valid', n=2, seed=1)
    else: random_images(src, n=10)
    before = sorted(get_image_files(src))
    out = tmp_path/'out'
    main(['demo', '--data', str(src), '--mix', 'resizemix', '--epochs', '1', '--bs', '4', '--size', '16', '--seeds', '1',
          '--n-train', '12', '--noise', '0.5', '--out', str(out)])
    res = read_results(out, 1)
    eq_(res['settings']['images'], str(out/'data')); eq_(res['runs'][0]['n_changed'], 6)
    tr = get_image_files(out/'data'/'seed0'/'train')
    eq_(len(tr), 12); eq_(sum(parent_label(f) != true_label(f) for f in tr), 6)
    va = get_image_files(out/'data'/'seed0'/'valid')
    eq_(len(va), 6); eq_(sum(parent_label(f) != true_label(f) for f in va), 0)
    eq_(sorted(get_image_files(src)), before) # the original is not touched
    for f in tr: eq_(np.asarray(Image.open(f)).shape[2], 3) # the links open as the images

@pytest.mark.parametrize('noise', [0., 0.1, 0.3, 0.5, 1.])
def test_noise_digits(tmp_path, noise):
    "The share of changed training labels is `noise`, up to the rounding of one label; validation stays clean"
    p = write_digits(tmp_path/'digits', noise=noise, seed=3)
    tr, va = get_image_files(p/'train'), get_image_files(p/'valid')
    changed = np.mean([parent_label(f) != true_label(f) for f in tr])
    assert abs(changed - noise) <= 1 / len(tr), (changed, noise)
    assert all(parent_label(f) == true_label(f) for f in va)
    if noise == 0: eq_(sorted(f.name for f in tr), sorted(f.name for f in get_image_files(write_digits(tmp_path/'d2', seed=3)/'train')))

def test_noisy_labels_properties():
    y = np.random.default_rng(0).integers(0, 10, 5000)
    for seed in range(5):
        for noise in (0.05, 0.2, 0.8):
            yn = noisy_labels(y, noise, 10, seed=seed)
            eq_(int((yn != y).sum()), round(noise * len(y)))
            assert yn.min() >= 0 and yn.max() < 10
    yn = noisy_labels(y, 1., 10)
    assert (yn != y).all()
    shift = (yn - y) % 10 # the new class is uniform among the 9 others
    counts = np.bincount(shift, minlength=10)
    eq_(counts[0], 0); assert counts[1:].min() > 0.8 * len(y) / 9 and counts[1:].max() < 1.2 * len(y) / 9
    eq_(y, np.random.default_rng(0).integers(0, 10, 5000)) # the input is not changed

def test_cli_errors(tmp_path, capsys):
    for argv, msg in [(['demo', '--data', str(tmp_path/'nowhere')], 'is not a folder'),
                      (['demo', '--mix', 'mixup,cutout'], 'unknown mixer(s)'),
                      (['demo', '--noise', '-0.1'], 'noise must be a number in [0, 1]'),
                      (['demo', '--n-train', '0'], "expected a positive integer or 'all'"),
                      (['demo', '--seeds', '0'], 'expected a positive integer'),
                      ([], 'required')]:
        with pytest.raises(SystemExit) as e: main(argv)
        eq_(e.value.code, 2)
        assert msg in capsys.readouterr().err, argv
    src = random_images(tmp_path/'src', n=5) # 12 training images, fewer than a batch
    with pytest.raises(SystemExit): main(['demo', '--data', str(src), '--mix', 'none', '--noise', '0', '--n-train', 'all', '--jobs', '1', '--out', str(tmp_path/'o')])
    assert 'give a smaller --bs' in capsys.readouterr().err
    (tmp_path/'mine'/'digits').mkdir(parents=True); (tmp_path/'mine'/'digits'/'keep.txt').write_text('x')
    with pytest.raises(SystemExit): main(['demo', '--out', str(tmp_path/'mine')])
    assert 'was not written by the demo' in capsys.readouterr().err
    assert (tmp_path/'mine'/'digits'/'keep.txt').exists()

@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA GPU')
def test_demo_on_gpu(tmp_path, monkeypatch):
    monkeypatch.setattr(defaults, 'use_cuda', None) # fastai's own choice: the GPU (conftest keeps the other tests on the CPU)
    res = run_demo(seeds=1, out=tmp_path, progress=False) # the default settings, one seed
    read_results(tmp_path, 4)
    assert res['settings']['device'].startswith('cuda')
    none, *mixed = res['summary']
    assert none['memorised'] > .5 and all(r['accuracy'] > none['accuracy'] for r in mixed), res['summary']


def test_fmix_and_manifold_in_the_demo(tmp_path):
    "FMix and ManifoldMixup (at the small CNN's conv layers) run in the same paired experiment, with their pictures"
    main(['demo', *TINY, '--seeds', '1', '--noise', '0.25', '--mix', 'none,fmix,manifold', '--out', str(tmp_path)])
    res = read_results(tmp_path, 3)
    eq_([r['mixer'] for r in res['runs']], ['none', 'fmix', 'manifold'])
    for m in ('fmix', 'manifold'): assert (tmp_path/f'batch_{m}.png').stat().st_size > 1000

def test_tabular_command(capsys):
    "`fastai-mix tabular`: no mixing against ManifoldMixup on a bundled table, paired over seeds"
    main(['tabular', '--dataset', 'wine', '--seeds', '2', '--epochs', '1'])
    out = capsys.readouterr().out
    assert 'wine: error rate %: none' in out and 'paired difference' in out and 'over 2 seeds' in out

@pytest.mark.parametrize('argv, names', [
    (['--mix', 'none,snapmix', '--arch', 'vit'], ['--mix snapmix and --arch vit', 'SnapMix found no last feature map', 'give --arch small or --arch resnet18']),
    (['--mix', 'none,manifold', '--arch', 'vit'], ['--mix manifold and --arch vit', 'ManifoldMixup found no hidden place', 'give --arch small or --arch resnet18']),
    (['--mix', 'none,cutmix,snapmix', '--decoupled', '0.1'], ['--mix snapmix with --decoupled 0.1', 'use decoupled=0 with SnapMix', 'leave snapmix out of --mix, or give --decoupled 0']),
    (['--mix', 'none,transmix', '--arch', 'resnet18'], ['--mix transmix and --arch resnet18', 'TransMix found no attention module', 'give --arch vit']),
    (['--arch', 'vit', '--size', '2'], ['--arch vit with --size 2']),
    (['--arch', 'resnet18', '--bs', '1', '--n-train', '8'], ['--arch resnet18 with --size 16 and --bs 1', 'Expected more than 1 value per channel']),
])
def test_runs_that_cannot_train_are_usage_errors(tmp_path, capsys, monkeypatch, argv, names):
    "A mixer, arch and options that cannot train together stop the command with a usage error naming them, before anything is written or trained (issue 29, item 8)"
    from fastai_mix import demo
    def no_training(*args, **kwargs): raise AssertionError('a run started')
    monkeypatch.setattr(demo, 'compare_mixers', no_training) # the demo's runs go through compare_mixers
    monkeypatch.setattr(demo, 'train_mixer', no_training)
    with pytest.raises(SystemExit) as e: main(['demo', '--epochs', '1', '--seeds', '1', '--jobs', '1', *argv, '--out', str(tmp_path/'out')])
    eq_(e.value.code, 2)
    err = capsys.readouterr().err
    assert 'cannot train' in err and all(n in err for n in names), err
    assert not (tmp_path/'out').exists() # nothing written

# ---- The command line on tiny image folders: --out and --data that would overwrite or train on each other, nested
# class folders, stray images, usage errors, and --jobs (the runs in worker processes give the same numbers) ----

CLI_TINY = ['--epochs', '1', '--seeds', '1', '--n-train', '20', '--bs', '8', '--size', '16', '--mix', 'none,cutmix', '--jobs', '1']

def images(folder:Path, n:int=6, seed:int=0) -> Path:
    "Write `n` small random RGB PNGs into `folder`"
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n): Image.fromarray(rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)).save(folder/f'{folder.name}{i}.png')
    return folder

def class_folders(src:Path, classes=('a', 'b', 'c'), n:int=10) -> Path:
    for i, c in enumerate(classes): images(src/c, n, seed=i)
    return src

def tree(path:Path) -> dict:
    "Every file under `path`, with its bytes"
    return {str(f.relative_to(path)): f.read_bytes() for f in sorted(Path(path).rglob('*')) if f.is_file()}

def usage_error(argv, capsys) -> str:
    "The message of the usage error (exit code 2) that `fastai-mix` stops with on `argv`"
    with pytest.raises(SystemExit) as e: main(argv)
    eq_(e.value.code, 2)
    return capsys.readouterr().err

# --out inside --data (or --data inside --out) would train on the demo's own output
def test_out_inside_data_refused(tmp_path, capsys, monkeypatch):
    src = class_folders(tmp_path/'src')
    before = tree(src)
    for noise in ('0', '0.5'): # read in place, and staged under --out
        err = usage_error(['demo', '--data', str(src), *CLI_TINY, '--noise', noise, '--n-train', 'all' if noise == '0' else '20',
                           '--out', str(src/'results')], capsys)
        assert f'--out {src/"results"} is inside --data {src}' in err, err
    monkeypatch.chdir(src) # from inside the image folder, with the default --out (./demo_out)
    err = usage_error(['demo', '--data', '.', *CLI_TINY], capsys)
    assert '--out demo_out is inside --data .' in err, err
    eq_(tree(src), before) # nothing written into the images
    out = tmp_path/'out'
    class_folders(out/'imgs')
    err = usage_error(['demo', '--data', str(out/'imgs'), *CLI_TINY, '--out', str(out)], capsys)
    assert f'--data {out/"imgs"} is inside --out {out}' in err, err
    err = usage_error(['demo', '--data', str(src), *CLI_TINY, '--out', str(src)], capsys)
    assert 'is inside --data' in err, err
    eq_(tree(src), before)

# the whole --out folder must be the demo's
@pytest.mark.slow
def test_out_the_user_owns_is_refused(tmp_path, capsys, monkeypatch):
    mine = tmp_path/'mine'; mine.mkdir()
    for f in ('results.md', 'results.json', 'accuracy.png', 'curves.png', 'batch_cutmix.png', 'notes.txt'): (mine/f).write_text('mine')
    before = tree(mine)
    err = usage_error(['demo', *CLI_TINY, '--out', str(mine)], capsys)
    assert f'{mine} is not empty and was not written by the demo' in err and 'give a new or empty folder as --out' in err, err
    eq_(tree(mine), before) # nothing written, nothing removed
    monkeypatch.chdir(tmp_path) # the default --out, twice in a row, and an empty folder given as --out
    for _ in range(2): main(['demo', *CLI_TINY])
    assert (tmp_path/'demo_out'/'.fastai_mix_demo').exists() and (tmp_path/'demo_out'/'results.md').exists()
    (tmp_path/'empty').mkdir()
    main(['demo', *CLI_TINY, '--mix', 'none,mixup', '--out', 'empty'])
    main(['demo', *CLI_TINY, '--out', 'empty']) # its own former output: the stale batch_mixup.png goes
    eq_(sorted(o.name for o in (tmp_path/'empty').glob('batch_*.png')), ['batch_cutmix.png'])

# class folders holding sub-folders, and images beside the class folders
@pytest.mark.parametrize('split', [False, True])
def test_nested_class_folders(tmp_path, capsys, split):
    "Images in sub-folders of a class folder are of that class, read in place or staged"
    src = tmp_path/'src'
    roots = [src/'train', src/'valid'] if split else [src]
    for k, r in enumerate(roots):
        images(r/'a'/'indoor', 4, seed=k); images(r/'a'/'outdoor'/'deep', 4, seed=k + 1); images(r/'b', 8, seed=k + 2)
    main(['demo', '--data', str(src), *CLI_TINY, '--noise', '0', '--n-train', 'all', '--out', str(tmp_path/'o1')]) # in place
    res = json.loads((tmp_path/'o1'/'results.json').read_text())['settings']
    eq_((res['n_train_images'], res['n_valid_images']), (16, 16) if split else (13, 3)) # every nested image is used
    main(['demo', '--data', str(src), *CLI_TINY, '--noise', '0.5', '--n-train', '12', '--out', str(tmp_path/'o2')]) # staged
    tr = get_image_files(tmp_path/'o2'/'data'/'seed0'/'train')
    eq_(len(tr), 12); assert {true_label(f) for f in tr} == {parent_label(f) for f in tr} == {'a', 'b'}

@pytest.mark.parametrize('split', [False, True])
def test_stray_images_refused(tmp_path, capsys, split):
    src = tmp_path/'src'
    if split: class_folders(src/'train'); class_folders(src/'valid', n=3)
    else: class_folders(src)
    Image.new('RGB', (12, 12)).save((src/'train' if split else src)/'stray.png')
    err = usage_error(['demo', '--data', str(src), *CLI_TINY, '--noise', '0', '--n-train', 'all', '--out', str(tmp_path/'o')], capsys)
    assert f"--data {src}: 1 image lies beside the class folders, in no class ({'train/' if split else ''}stray.png)" in err, err
    assert not (tmp_path/'o').exists()

# usage errors, not tracebacks or meaningless runs
def test_usage_errors(tmp_path, capsys):
    one = images(tmp_path/'one'/'cat', 30).parent
    for noise in ('0', '0.4'):
        err = usage_error(['demo', '--data', str(one), *CLI_TINY, '--noise', noise, '--out', str(tmp_path/'o')], capsys)
        assert f"--data {one} has a single class folder ('cat'): the demo trains a classifier, which needs at least 2" in err, err
    (tmp_path/'file.txt').write_text('mine')
    err = usage_error(['demo', *CLI_TINY, '--out', str(tmp_path/'file.txt')], capsys)
    assert f'--out {tmp_path/"file.txt"} is a file, not a folder' in err, err
    eq_((tmp_path/'file.txt').read_text(), 'mine')
    err = usage_error(['demo', *CLI_TINY, '--seed', '-1', '--out', str(tmp_path/'o')], capsys)
    assert "argument --seed: expected a non-negative integer, got '-1'" in err, err
    for lr in ('-1', '0', 'nan', 'inf', 'fast'):
        err = usage_error(['demo', *CLI_TINY, '--lr', lr, '--out', str(tmp_path/'o')], capsys)
        assert f"argument --lr: expected a positive finite number, got '{lr}'" in err, (lr, err)
    for opt in ('--jobs', '--threads'):
        assert f"argument {opt}: expected a positive integer, got '0'" in usage_error(['demo', opt, '0'], capsys)
    assert not (tmp_path/'o').exists()

# --jobs: the runs in worker processes give the same numbers
@pytest.mark.slow
def test_jobs_same_results(tmp_path, capsys):
    res, printed = [], []
    for jobs in ('1', '2'):
        argv = ['demo', *CLI_TINY, '--mix', 'none,mixup,cutmix', '--seeds', '2', '--noise', '0.25', '--jobs', jobs, '--threads', '1',
                '--out', str(tmp_path/jobs)]
        main(argv)
        printed.append(capsys.readouterr().out)
        res.append(json.loads((tmp_path/jobs/'results.json').read_text()))
    runs = [[{k: v for k, v in r.items() if k != 'sec_per_epoch'} for r in o['runs']] for o in res]
    eq_([(r['mixer'], r['seed']) for r in runs[1]], [(m, s) for s in (0, 1) for m in ('none', 'mixup', 'cutmix')]) # the fixed order
    eq_(runs[0], runs[1]) # accuracies, memorisation and every epoch's losses, bit for bit
    eq_(res[0]['summary'], res[1]['summary'])
    eq_((res[0]['settings']['jobs'], res[1]['settings']['jobs'], res[1]['settings']['threads']), (1, 2, 1))
    for f in ('batch_mixup.png', 'batch_cutmix.png', 'accuracy.png'): # the first seed's mixed batches, drawn in the workers
        assert np.array_equal(np.asarray(Image.open(tmp_path/'1'/f)), np.asarray(Image.open(tmp_path/'2'/f))), f
    for p in printed: eq_(sum(': accuracy ' in l for l in p.splitlines()), 6) # one line per run
