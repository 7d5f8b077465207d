"Issue 20, items 3, 7, 11 and 15, and `--jobs`: `fastai-mix demo` through its command line, on tiny image folders"
import json, os
import numpy as np, pytest
from pathlib import Path
from PIL import Image
from fastcore.test import test_eq as eq_
from fastai.data.transforms import get_image_files, parent_label
from fastai_mix.demo import main, true_label

TINY = ['--epochs', '1', '--seeds', '1', '--n-train', '20', '--bs', '8', '--size', '16', '--mix', 'none,cutmix', '--jobs', '1']

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

# item 3: --out inside --data (or --data inside --out) would train on the demo's own output
def test_out_inside_data_refused(tmp_path, capsys, monkeypatch):
    src = class_folders(tmp_path/'src')
    before = tree(src)
    for noise in ('0', '0.5'): # read in place, and staged under --out
        err = usage_error(['demo', '--data', str(src), *TINY, '--noise', noise, '--n-train', 'all' if noise == '0' else '20',
                           '--out', str(src/'results')], capsys)
        assert f'--out {src/"results"} is inside --data {src}' in err, err
    monkeypatch.chdir(src) # from inside the image folder, with the default --out (./demo_out)
    err = usage_error(['demo', '--data', '.', *TINY], capsys)
    assert '--out demo_out is inside --data .' in err, err
    eq_(tree(src), before) # nothing written into the images
    out = tmp_path/'out'
    class_folders(out/'imgs')
    err = usage_error(['demo', '--data', str(out/'imgs'), *TINY, '--out', str(out)], capsys)
    assert f'--data {out/"imgs"} is inside --out {out}' in err, err
    err = usage_error(['demo', '--data', str(src), *TINY, '--out', str(src)], capsys)
    assert 'is inside --data' in err, err
    eq_(tree(src), before)

# item 7: the whole --out folder must be the demo's
def test_out_the_user_owns_is_refused(tmp_path, capsys, monkeypatch):
    mine = tmp_path/'mine'; mine.mkdir()
    for f in ('results.md', 'results.json', 'accuracy.png', 'curves.png', 'batch_cutmix.png', 'notes.txt'): (mine/f).write_text('mine')
    before = tree(mine)
    err = usage_error(['demo', *TINY, '--out', str(mine)], capsys)
    assert f'{mine} is not empty and was not written by the demo' in err and 'give a new or empty folder as --out' in err, err
    eq_(tree(mine), before) # nothing written, nothing removed
    monkeypatch.chdir(tmp_path) # the default --out, twice in a row, and an empty folder given as --out
    for _ in range(2): main(['demo', *TINY])
    assert (tmp_path/'demo_out'/'.fastai_mix_demo').exists() and (tmp_path/'demo_out'/'results.md').exists()
    (tmp_path/'empty').mkdir()
    main(['demo', *TINY, '--mix', 'none,mixup', '--out', 'empty'])
    main(['demo', *TINY, '--out', 'empty']) # its own former output: the stale batch_mixup.png goes
    eq_(sorted(o.name for o in (tmp_path/'empty').glob('batch_*.png')), ['batch_cutmix.png'])

# item 11: class folders holding sub-folders, and images beside the class folders
@pytest.mark.parametrize('split', [False, True])
def test_nested_class_folders(tmp_path, capsys, split):
    "Images in sub-folders of a class folder are of that class, read in place or staged"
    src = tmp_path/'src'
    roots = [src/'train', src/'valid'] if split else [src]
    for k, r in enumerate(roots):
        images(r/'a'/'indoor', 4, seed=k); images(r/'a'/'outdoor'/'deep', 4, seed=k + 1); images(r/'b', 8, seed=k + 2)
    main(['demo', '--data', str(src), *TINY, '--noise', '0', '--n-train', 'all', '--out', str(tmp_path/'o1')]) # in place
    res = json.loads((tmp_path/'o1'/'results.json').read_text())['settings']
    eq_((res['n_train_images'], res['n_valid_images']), (16, 16) if split else (13, 3)) # every nested image is used
    main(['demo', '--data', str(src), *TINY, '--noise', '0.5', '--n-train', '12', '--out', str(tmp_path/'o2')]) # staged
    tr = get_image_files(tmp_path/'o2'/'data'/'seed0'/'train')
    eq_(len(tr), 12); assert {true_label(f) for f in tr} == {parent_label(f) for f in tr} == {'a', 'b'}

@pytest.mark.parametrize('split', [False, True])
def test_stray_images_refused(tmp_path, capsys, split):
    src = tmp_path/'src'
    if split: class_folders(src/'train'); class_folders(src/'valid', n=3)
    else: class_folders(src)
    Image.new('RGB', (12, 12)).save((src/'train' if split else src)/'stray.png')
    err = usage_error(['demo', '--data', str(src), *TINY, '--noise', '0', '--n-train', 'all', '--out', str(tmp_path/'o')], capsys)
    assert f"--data {src}: 1 image lies beside the class folders, in no class ({'train/' if split else ''}stray.png)" in err, err
    assert not (tmp_path/'o').exists()

# item 15: usage errors, not tracebacks or meaningless runs
def test_usage_errors(tmp_path, capsys):
    one = images(tmp_path/'one'/'cat', 30).parent
    for noise in ('0', '0.4'):
        err = usage_error(['demo', '--data', str(one), *TINY, '--noise', noise, '--out', str(tmp_path/'o')], capsys)
        assert f"--data {one} has a single class folder ('cat'): the demo trains a classifier, which needs at least 2" in err, err
    (tmp_path/'file.txt').write_text('mine')
    err = usage_error(['demo', *TINY, '--out', str(tmp_path/'file.txt')], capsys)
    assert f'--out {tmp_path/"file.txt"} is a file, not a folder' in err, err
    eq_((tmp_path/'file.txt').read_text(), 'mine')
    err = usage_error(['demo', *TINY, '--seed', '-1', '--out', str(tmp_path/'o')], capsys)
    assert "argument --seed: expected a non-negative integer, got '-1'" in err, err
    for lr in ('-1', '0', 'nan', 'inf', 'fast'):
        err = usage_error(['demo', *TINY, '--lr', lr, '--out', str(tmp_path/'o')], capsys)
        assert f"argument --lr: expected a positive finite number, got '{lr}'" in err, (lr, err)
    for opt in ('--jobs', '--threads'):
        assert f"argument {opt}: expected a positive integer, got '0'" in usage_error(['demo', opt, '0'], capsys)
    assert not (tmp_path/'o').exists()

# --jobs: the runs in worker processes give the same numbers
def test_jobs_same_results(tmp_path, capsys):
    res, printed = [], []
    for jobs in ('1', '2'):
        argv = ['demo', *TINY, '--mix', 'none,mixup,cutmix', '--seeds', '2', '--noise', '0.25', '--jobs', jobs, '--threads', '1',
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
