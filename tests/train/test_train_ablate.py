"""The ablation harness end to end: config checking, grid, results files, plots, report, table; the CLI."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from rwkv_zoo.cli import main
from rwkv_zoo.train.ablate import DEFAULT_CONFIG, SUITES, ablate, check_config, load_config, parse_config, run_specs

CONFIG = """
[ablate]
name = "mini"
seeds = [0, 1]
lrs = [1e-3, 1e-2]
jobs = 1

[train]
steps = 1
batch_size = 2
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
"""


def test_the_default_is_the_quick_suite_v4_to_v7_on_mqar_with_a_learning_rate_sweep():
    cfg = parse_config(DEFAULT_CONFIG)
    assert [m.model for m in cfg.models][:4] == ["v4", "v5", "v6", "v7"]
    assert {m.options["n_embd"] for m in cfg.models} == {64}
    assert [t.data["task"] for t in cfg.tasks] == ["mqar"] and len(cfg.seeds) >= 2 and len(cfg.lrs) >= 3
    runs = run_specs(cfg)
    assert len(runs) == len(cfg.models) * len(cfg.seeds) * len(cfg.lrs)
    assert runs[0]["train"]["model"] in ("v7", "attn")  # the slowest runs start first
    assert len({r["train"]["steps"] for r in runs}) == 1 and len({r["train"]["batch_size"] for r in runs}) == 1
    assert all(r["train"]["lr_final"] == pytest.approx(r["lr"] * cfg.lr_final_ratio) for r in runs)


def test_every_suite_validates_and_outside_quick_has_three_seeds():
    for name in SUITES:
        cfg = load_config(suite=name)
        if name != "quick":
            assert len(cfg.seeds) >= 3, name
        # The attention baseline is in every suite, by its registered name, when registered.
        attn = [m for m in cfg.models if m.model == "attn"]
        assert attn or any("attn" in s for s in cfg.skipped), name
    check_config(load_config(suite="recall"))  # widths expand, every model builds, every task loads
    labels = [m.label for m in load_config(suite="recall").models]
    assert "v7 d=32" in labels and "v7 d=128" in labels
    example = load_config(str(Path(__file__).parents[2] / "examples" / "ablate_hybrids_widths.toml"))
    check_config(example)
    assert [m.label for m in example.models][:4] == ["v7 d=32", "v7 d=64", "v7+v6 time-mix d=32",
                                                     "v7+v6 time-mix d=64"]


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
        ("[[models]]\nmodel='v9'\n[[tasks]]\ntask='mqar'\n", "unknown model 'v9'"),
        ("[ablate]\nlrs = [0.1]\n[train]\nlr = 0.1\n", "exclude each other"),
        ("[ablate]\nlrs = [-1]\n", "positive"),
        ("[[models]]\nmodel='v4'\nn_embd=[]\n[[tasks]]\ntask='mqar'\n", "empty"),
        ("[[models]]\nmodel='v4-tiny'\n[[tasks]]\ntask='mqar'\nextrapolate=[4]\n", "language-model"),
    ],
)
def test_config_errors_name_the_problem(text, match):
    with pytest.raises(ValueError, match=match):
        parse_config(text)


def test_ablate_writes_results_plots_report_and_a_table(tmp_path):
    conf = tmp_path / "mini.toml"
    conf.write_text(CONFIG)
    lines = []
    out = ablate(str(conf), out_dir=str(tmp_path / "out"), log=lines.append)
    names = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert names == ["accuracy_vs_pairs.png", "accuracy_vs_state.png", "cells", "loss_curves.png", "report.md",
                     "results.csv", "results.json"]
    assert len(list((tmp_path / "out" / "cells").glob("*.json"))) == 2 * 2 * 2
    doc = json.loads((tmp_path / "out" / "results.json").read_text())
    assert doc["schema"] == 2 and len(doc["runs"]) == 8 and len(doc["summary"]) == 2
    hybrid = next(r for r in doc["runs"] if r["model"] == "v6 with a v5 time-mix")
    assert hybrid["name"] == "hybrid[v5/v6,v5/v6]" or "hybrid" in hybrid["name"]
    assert hybrid["params"] > 0 and len(hybrid["loss_curve"]) == 1 and hybrid["lr"] in (1e-3, 1e-2)
    for row in doc["summary"]:  # exactly the chosen rate's runs are marked selected
        chosen = [r for r in doc["runs"] if r["model"] == row["model"] and r["selected"]]
        assert {r["lr"] for r in chosen} == {row["lr"]} and len(chosen) == 2
    rows = list(csv.DictReader((tmp_path / "out" / "results.csv").open()))
    assert len(rows) == 8
    assert {"model", "task", "seed", "lr", "acc", "loss", "acc@pairs=2", "params", "state_size", "tokens",
            "tokens_per_s", "wall_s"} <= set(rows[0])
    table = "\n".join(lines)
    assert "± " in table and "v6 with a v5 time-mix" in table and "95% CI" in table and "[" in table
    report = (tmp_path / "out" / "report.md").read_text()
    assert "![loss_curves](loss_curves.png)" in report and "| mqar | v4-tiny |" in report
    assert out["rows"][0]["seeds"] == 2 and out["ran"] == 8 and out["cached"] == 0


def test_one_seed_prints_n_1_never_plus_minus_zero(tmp_path):
    conf = tmp_path / "one.toml"
    conf.write_text(CONFIG.replace("seeds = [0, 1]", "seeds = [3]").replace("lrs = [1e-3, 1e-2]", "lrs = [1e-3]")
                    .replace("num_pairs = [2, 3]", "num_pairs = 2"))
    lines = []
    ablate(str(conf), out_dir=str(tmp_path / "o"), plots=False, log=lines.append)
    table = "\n".join(lines)
    assert "(n=1)" in table and "± 0.000" not in table and "–" in table


def test_ablate_command_runs_workers_in_parallel_and_config_errors_are_one_line(tmp_path, capsys):
    conf = tmp_path / "mini.toml"
    conf.write_text(CONFIG.replace("jobs = 1", "jobs = 2").replace("seeds = [0, 1]", "seeds = [0]")
                    .replace("lrs = [1e-3, 1e-2]", "lrs = [1e-3]"))
    rc = main(["ablate", str(conf), "--out", str(tmp_path / "o"), "--no-plots", "--steps", "1"])
    out = capsys.readouterr().out
    assert rc == 0 and "2 at a time" in out and "[2/2]" in out
    assert not list((tmp_path / "o").glob("*.png"))
    rc = main(["ablate", str(tmp_path / "missing.toml")])
    assert rc == 2 and "no such config file" in capsys.readouterr().err
    assert main(["ablate", "--show-config", "--suite", "text"]) == 0 and 'corpus = "stdlib"' in capsys.readouterr().out
    assert main(["ablate", "--list-suites"]) == 0
    listed = capsys.readouterr().out
    assert all(name in listed for name in ("quick", "recall", "text", "hybrids"))
    # A typo anywhere (version, build option, task, value) stops before any run, in one line, status 2.
    typos = [('model = "v4-tiny"', 'model = "v4-tiyn"', "unknown size 'tiyn' for v4"),
             ('model = "v4-tiny"', 'model = "v9"', "unknown model 'v9'"),
             ("time_mix", "time_mxi", "time_mxi"),
             ('task = "mqar"', 'task = "mqra"', "unknown task 'mqra'"),
             ("num_keys = 6", "num_keys = 1", "num_keys=1")]
    for old, new, words in typos:
        conf.write_text(CONFIG.replace(old, new))
        rc = main(["ablate", str(conf), "--out", str(tmp_path / "bad")])
        err = capsys.readouterr().err
        assert rc == 2, new
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err and words in err, err
        assert not (tmp_path / "bad").exists()
