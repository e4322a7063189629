"""ptqat-fx: the subcommands run end to end in a fresh process; bad arguments fail in one line."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ptqat_fx.cli import main

ROOT = Path(__file__).resolve().parents[1]
MLP = ["examples.mlp:build", "--input-shape", "4,1,28,28"]


def _run(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "ptqat_fx.cli", *args], cwd=cwd, capture_output=True, text=True, timeout=120,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )


def test_demo_prints_the_report_of_the_bundled_resnet(tmp_path):
    result = _run("demo", "--html", str(tmp_path / "demo.html"), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""  # progress bars stay silent off a terminal
    for layer in ("stem.0", "layers.2.conv2", "fc"):
        assert f" {layer} " in result.stdout
    assert "10 quantizable layers, 5 trainable" in result.stdout
    assert "<td class=\"name\">fc</td>" in (tmp_path / "demo.html").read_text()


def test_analyze_calibrates_on_the_given_data_and_writes_html(tmp_path):
    torch.save(torch.randn(8, 1, 28, 28), tmp_path / "calib.pt")
    result = _run("analyze", *MLP, "--data", str(tmp_path / "calib.pt"), "--w-bits", "8",
                  "--fraction", "0.34", "--html", str(tmp_path / "r.html"))
    assert result.returncode == 0, result.stderr
    lines = [line.split() for line in result.stdout.splitlines() if line.split()[1:2] in (["fc1"], ["fc2"], ["fc3"])]
    assert [line[1] for line in lines] == ["fc1", "fc2", "fc3"]
    assert all(line[4] == "W8A8" for line in lines)
    assert sum(line[-1] == "yes" for line in lines) == 1
    assert (tmp_path / "r.html").read_text().count('<td class="name">') == 3


def test_dump_writes_every_stage_and_the_converted_graph(tmp_path, capsys):
    result = _run("dump", *MLP, "--dir", str(tmp_path / "d"))
    assert result.returncode == 0, result.stderr
    names = sorted(path.name for path in (tmp_path / "d").glob("*.json"))
    assert names[0] == "01_traced.json" and names[-1] == "09_converted.json"
    with pytest.raises(SystemExit):
        main(["dump", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    for name in (names[0], names[-2], names[-1]):  # --help names the files as written
        assert name.replace(".json", ".*") in help_text
    converted = json.loads((tmp_path / "d" / "09_converted.json").read_text())
    assert [layer["name"] for layer in converted["layers"]] == ["fc1", "fc2", "fc3"]


def test_bad_factory_fails_in_one_line_with_status_2():
    result = _run("analyze", "examples.mlp:no_such_factory", "--input-shape", "1,784")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "ptqat-fx: error: module 'examples.mlp' has no callable 'no_such_factory'; name a function that returns the model"
    ]


@pytest.mark.parametrize("argv, message", [
    (["analyze", "examples.mlp:build", "--input-shape", "4,x"], "--input-shape '4,x'"),
    (["analyze", "examples.mlp:build", "--input-shape", "0,3"], "--input-shape '0,3'"),
    (["analyze", "examples.mlp", "--input-shape", "1,784"], "write MODULE:FACTORY"),
    (["analyze", "no_such_module:build", "--input-shape", "1,784"], "cannot import module 'no_such_module'"),
    (["dump", "examples.mlp:build", "--input-shape", "1,784", "--data", "missing.pt", "--dir", "d"], "no such file"),
])
def test_bad_arguments_name_the_culprit(argv, message, capsys):
    assert main(argv) == 2
    error = capsys.readouterr().err
    assert message in error and error.count("\n") == 1


@pytest.mark.parametrize("argv", [["analyze", *MLP, "--strategy", "smallest"], ["dump", *MLP], []])
def test_usage_errors_are_one_line_pointing_to_help(argv, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    error = capsys.readouterr().err
    assert error.startswith("ptqat-fx") and error.count("\n") == 1 and "--help)" in error


def test_demo_validates_the_config_before_printing_anything(capsys):
    assert main(["demo", "--w-bits", "16"]) == 1
    out, err = capsys.readouterr()
    assert out == "" and "ConfigError: QuantConfig.w_bits=16" in err


def test_pipeline_errors_exit_1(capsys):
    assert main(["analyze", *MLP, "--a-bits", "9"]) == 1
    assert "ConfigError: QuantConfig.a_bits=9" in capsys.readouterr().err


def test_help_explains_every_subcommand(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    for word in ("demo", "analyze", "dump", "MODULE:FACTORY", "--input-shape"):
        assert word in text
