"""The stdlib corpus: split by file, deterministic by path, no file on both sides."""

from __future__ import annotations

import pytest

from rwkv_zoo.data import make_data
from rwkv_zoo.data.corpus import is_heldout, split_files, stdlib_corpus, stdlib_files


def _tree(root, n=40):
    for i in range(n):
        d = root / f"pkg{i % 4}"
        d.mkdir(exist_ok=True)
        (d / f"mod{i}.py").write_text(f"# module {i}\n" + f"x{i} = {i}\n" * 50)
    (root / "site-packages").mkdir()
    (root / "site-packages" / "other.py").write_text("installed = True\n")
    (root / "pkg0" / "notes.txt").write_text("not python")


def test_the_split_puts_no_file_on_both_sides_and_depends_only_on_the_path(tmp_path):
    _tree(tmp_path)
    files = stdlib_files(tmp_path)
    assert len(files) == 40 and not any("site-packages" in f or f.endswith(".txt") for f in files)
    train, held = split_files(files, 0.25)
    assert train and held and not set(train) & set(held) and sorted(train + held) == files
    # The same file goes to the same side whatever else is in the list (a pure function of its path).
    sub_train, sub_held = split_files(files[::3], 0.25)
    assert set(sub_train) <= set(train) and set(sub_held) <= set(held)
    assert is_heldout("a/b.py", 0.5) == is_heldout("a/b.py", 0.5)


def test_the_stream_holds_the_training_files_then_the_held_out_ones(tmp_path):
    _tree(tmp_path)
    data = stdlib_corpus(heldout=0.25, root=str(tmp_path))
    train, held = split_files(stdlib_files(tmp_path), 0.25)
    train_bytes = b"".join((tmp_path / f).read_bytes() for f in train)
    assert data.split_point(16) == len(train_bytes) and bytes(data.tokens[: len(train_bytes)]) == train_bytes
    assert bytes(data.tokens[len(train_bytes):]) == b"".join((tmp_path / f).read_bytes() for f in held)
    assert data.vocab_size == 256 and data.bytes_per_token == 1.0


def test_training_windows_never_read_held_out_bytes(tmp_path):
    _tree(tmp_path)
    for f in stdlib_files(tmp_path):  # held-out files hold only "Z", which no training file has
        if is_heldout(f, 0.25):
            (tmp_path / f).write_text("Z" * 300)
    data = stdlib_corpus(heldout=0.25, root=str(tmp_path))
    for step in range(20):
        x, y = data.batch(0, step, 64, 16)
        assert x.shape == (64, 16) and not (x == ord("Z")).any() and not (y == ord("Z")).any()
    inputs, _ = data.eval_batch(0, 4, 16)
    assert (inputs == ord("Z")).all()


def test_the_real_stdlib_corpus_loads_through_make_data():
    data = make_data({"corpus": "stdlib", "max_bytes": 100_000})
    assert 100_000 <= len(data) <= 100_000 + 65536 and "stdlib" in data.describe()
    assert len(stdlib_files()) > 500
    with pytest.raises(ValueError, match="unknown option"):
        make_data({"corpus": "stdlib", "helduot": 0.1})
    with pytest.raises(ValueError, match="unknown corpus"):
        make_data({"corpus": "wikipedia"})
