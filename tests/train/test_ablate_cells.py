"""Cells: an interrupted grid resumes with only the missing cells; devices; shards."""

from __future__ import annotations

import json

import pytest

from rwkv_zoo.train.ablate import ablate, assign_device, load_config, run_one, run_specs, shard_of

GRID = """
[ablate]
name = "resume"
seeds = [0, 1]
lrs = [1e-3, 1e-2]
jobs = 1

[train]
steps = 1
batch_size = 2
eval_batches = 1

[[models]]
model = "v4-tiny"

[[tasks]]
task = "mqar"
num_pairs = 2
num_keys = 4
num_values = 4
"""


class Killed(Exception):
    pass


def test_a_grid_killed_midway_reruns_only_the_missing_cells(tmp_path):
    conf = tmp_path / "grid.toml"
    conf.write_text(GRID)
    out = tmp_path / "out"
    ran: list[str] = []

    def dies_after_two(run, out_dir, device):
        if len(ran) == 2:
            raise Killed("the machine went away")
        ran.append(run["key"])
        return run_one(run, out_dir, device)

    with pytest.raises(Killed):
        ablate(str(conf), out_dir=str(out), plots=False, log=lambda s: None, runner=dies_after_two)
    first = set(ran)
    assert {p.stem for p in (out / "cells").glob("*.json")} == first and len(first) == 2
    assert not list((out / "cells").glob(".*"))  # no half-written cell left behind

    ran.clear()
    lines: list[str] = []
    res = ablate(str(conf), out_dir=str(out), plots=False, log=lines.append,
                 runner=lambda run, out_dir, device: (ran.append(run["key"]), run_one(run, out_dir, device))[1])
    keys = {r["key"] for r in run_specs(load_config(str(conf)))}
    assert set(ran) == keys - first and len(ran) == 2  # only the missing cells ran
    assert res["ran"] == 2 and res["cached"] == 2 and len(res["results"]) == 4 and res["missing"] == 0
    assert any("2 cached, 2 to run" in line for line in lines)

    ran.clear()  # the same command again: nothing to run, the same numbers
    again = ablate(str(conf), out_dir=str(out), plots=False, log=lambda s: None,
                   runner=lambda *a: ran.append(1) or run_one(*a))
    assert ran == [] and again["ran"] == 0
    assert [r["final"] for r in again["results"]] == [r["final"] for r in res["results"]]
    doc = json.loads((out / "results.json").read_text())
    assert len(doc["runs"]) == 4 and doc["missing_cells"] == 0


def test_shards_partition_the_cells_and_a_shard_reports_what_is_missing(tmp_path):
    conf = tmp_path / "grid.toml"
    conf.write_text(GRID)
    specs = run_specs(load_config(str(conf)))
    parts = [shard_of(specs, (i, 3)) for i in range(3)]
    keys = [r["key"] for p in parts for r in p]
    assert sorted(keys) == sorted(r["key"] for r in specs) and len(set(keys)) == len(keys)
    res = ablate(str(conf), out_dir=str(tmp_path / "o"), plots=False, log=lambda s: None, shard=(1, 3))
    assert res["ran"] == len(parts[1]) and res["missing"] == len(specs) - len(parts[1])
    assert "Incomplete" in (tmp_path / "o" / "report.md").read_text()


def test_workers_go_round_robin_over_the_visible_gpus():
    assert [assign_device(w, 0) for w in range(3)] == ["cpu"] * 3
    assert [assign_device(w, 2) for w in range(5)] == ["cuda:0", "cuda:1", "cuda:0", "cuda:1", "cuda:0"]
    assert [assign_device(w, 4, "cpu") for w in range(2)] == ["cpu", "cpu"]
    with pytest.raises(RuntimeError, match="no GPU"):
        assign_device(0, 0, "cuda")


def test_a_cell_written_meanwhile_by_another_process_is_not_run_again(tmp_path):
    from rwkv_zoo.train.ablate.cells import cell_path, run_cells

    conf = tmp_path / "grid.toml"
    conf.write_text(GRID)
    specs = run_specs(load_config(str(conf)))[:1]
    path = cell_path(tmp_path, specs[0]["key"])
    path.parent.mkdir(parents=True)
    record = {"key": specs[0]["key"], "model": "v4-tiny", "task": "mqar", "seed": 0, "lr": specs[0]["lr"],
              "final": {"acc": 0.5}, "wall_s": 1.0, "tokens_per_s": 1.0}
    path.write_text(json.dumps(record))

    def boom(*args):
        raise AssertionError("ran a finished cell")

    assert run_cells(specs, tmp_path, jobs=1, log=lambda s: None, runner=boom) == [record]
