"""The ablation harness: config checking, grid, results files, plots, table; the CLI."""

from __future__ import annotations

import csv
import json

import pytest

from rwkv_zoo.cli import main
from rwkv_zoo.train.ablate import DEFAULT_CONFIG, ablate, parse_config, run_specs

CONFIG = """
[ablate]
name = "mini"
seeds = [0, 1]
jobs = 1

[train]
steps = 2
batch_size = 4
eval_batches = 1

[[models]]
model = "v4-tiny"

[[models]]
label = "v6 with a v5 time-mix"
model = "v6-tiny"
time_mix = "v5"

[[tasks]]
task = "mqar"
num_pairs = [2, 3]
num_keys = 6
num_values = 6

[[tasks]]
label = "copy"
task = "copying"
length = 4
"""


def test_the_default_config_is_the_v4_to_v7_mqar_comparison():
    cfg = parse_config(DEFAULT_CONFIG)
    assert [m.model for m in cfg.models] == ["v4-tiny", "v5-tiny", "v6-tiny", "v7-tiny"]
    assert [t.data["task"] for t in cfg.tasks] == ["mqar"] and len(cfg.seeds) >= 2
    runs = run_specs(cfg)
    assert len(runs) == 4 * len(cfg.seeds)
    assert runs[0]["train"]["model"] == "v7-tiny"  # the slowest runs start first
    assert len({r["train"]["steps"] for r in runs}) == 1 and len({r["train"]["batch_size"] for r in runs}) == 1


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("[train]\nsteps = 1\n[[tasks]]\ntask='mqar'\n", "at least one"),
        ("[trian]\n", "unknown section.*trian"),
        ("[train]\nmodel = 'v6-tiny'\n", "decides per run"),
        ("[train]\nstep = 3\n", "unknown train option.*step"),
        ("[[models]]\nsize='tiny'\n[[tasks]]\ntask='mqar'\n", "needs model ="),
        ("[[models]]\nmodel='v4-tiny'\n[[models]]\nmodel='v4-tiny'\n[[tasks]]\ntask='mqar'\n", "distinct"),
        ("[ablate]\nseed = [1]\n", "unknown \\[ablate\\] key"),
    ],
)
def test_config_errors_name_the_problem(text, match):
    with pytest.raises(ValueError, match=match):
        parse_config(text)


def test_ablate_writes_results_plots_and_a_table(tmp_path):
    conf = tmp_path / "mini.toml"
    conf.write_text(CONFIG)
    lines = []
    out = ablate(str(conf), out_dir=str(tmp_path / "out"), log=lines.append)
    names = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert names == ["accuracy_vs_pairs.png", "accuracy_vs_state.png", "loss_curves.png", "results.csv",
                     "results.json"]
    doc = json.loads((tmp_path / "out" / "results.json").read_text())
    assert len(doc["runs"]) == 2 * 2 * 2 and len(doc["summary"]) == 4
    hybrid = next(r for r in doc["runs"] if r["model"] == "v6 with a v5 time-mix")
    assert hybrid["identity"] == "hybrid[v5/v6,v5/v6]" and hybrid["params"] > 0 and len(hybrid["loss_curve"]) == 2
    rows = list(csv.DictReader((tmp_path / "out" / "results.csv").open()))
    assert len(rows) == 8 and {"acc", "acc@pairs=2", "params", "state_size", "seed"} <= set(rows[0])
    table = "\n".join(lines)
    assert "± " in table and "v6 with a v5 time-mix" in table and "acc@pairs=3" in table
    assert out["rows"][0]["seeds"] == 2


@pytest.mark.slow
def test_ablate_command_runs_workers_in_parallel(tmp_path, capsys):
    conf = tmp_path / "mini.toml"
    conf.write_text(CONFIG.replace("jobs = 1", "jobs = 2").replace("seeds = [0, 1]", "seeds = [0]"))
    rc = main(["ablate", str(conf), "--out", str(tmp_path / "o"), "--no-plots", "--steps", "1"])
    out = capsys.readouterr().out
    assert rc == 0 and "2 at a time" in out and "[4/4]" in out
    assert not list((tmp_path / "o").glob("*.png"))
    rc = main(["ablate", str(tmp_path / "missing.toml")])
    assert rc == 2 and "no such config file" in capsys.readouterr().err
    assert main(["ablate", "--show-config"]) == 0 and "[[models]]" in capsys.readouterr().out
