"""Every subcommand's parser: short errors with a did-you-mean hint, no prefix matching, readable type errors;
and `byol-fast --help` answers without importing torch."""

from __future__ import annotations

import subprocess
import sys

import pytest

from byol_fast import cli, evaluate, export, train
from pipelines import check_data, show_views, synthetic


def _error_of(parser, argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        parser.parse_args(argv)
    assert exit_info.value.code == 2
    return capsys.readouterr().err


def test_a_mistyped_train_flag_is_a_short_error_with_the_flag_meant(capsys):
    error = _error_of(train.build_parser(), ["--epoch", "3"], capsys)  # was silently taken as --epochs
    assert error == ("byol-fast train: error: unrecognized arguments: --epoch 3; did you mean --epochs?\n"
                     "(`byol-fast train --help` lists every option)\n")  # not 26 lines of usage first
    error = _error_of(train.build_parser(), ["--batch-size", "256"], capsys)
    assert "did you mean --global-batch (source images per step, summed over all ranks)?" in error
    error = _error_of(train.build_parser(), ["--lr=0.1", "--wrokers", "2"], capsys)
    assert "did you mean --base-lr (per 256 images; the peak lr is base_lr * global_batch / 256) for --lr, " \
           "--workers for --wrokers?" in error


@pytest.mark.parametrize("argv,message", [
    (["--global-batch", "abc"], "--global-batch: 'abc' is not an integer"),  # was "invalid <class 'int'> value"
    (["--base-lr", "fast"], "--base-lr: 'fast' is not a number"),
    (["--max-steps", "all"], "--max-steps: 'all' is not an integer or none"),
])
def test_train_type_errors_read_as_sentences(argv, message, capsys):
    assert _error_of(train.build_parser(), argv, capsys).startswith(f"byol-fast train: error: {message}\n")


def test_train_flags_still_parse():
    args = train.build_parser().parse_args(["--epochs", "3", "--max-steps", "none", "--no-tensorboard"])
    assert (args.epochs, args.max_steps, args.tensorboard) == (3, None, False)


@pytest.mark.parametrize("parser,argv,message", [
    (check_data.build_parser(), ["DIR", "--worker", "2"], "did you mean --workers?"),
    (check_data.build_parser(), ["DIR", "--workers", "many"], "--workers: 'many' is not an integer"),
    (synthetic.build_parser(), ["DIR", "--images", "1k"], "--images: '1k' is not an integer"),
    (synthetic.build_parser(), ["DIR", "--image", "8"], "did you mean --images?"),  # no prefix matching
    (show_views.build_parser(), ["DIR", "--pair", "4"], "did you mean --pairs?"),
    (evaluate.build_parser(), ["knn", "--data", "D", "--weights", "W", "--temprature", "0.1"],
     "did you mean --temperature?"),
    (evaluate.build_parser(), ["knn", "--data", "D", "--weights", "W", "--k", "many"], "--k: 'many' is not an integer"),
    (export.build_parser(), ["CKPT", "OUT", "--arc", "resnet18"], "did you mean --arch?"),
])
def test_every_subcommand_parses_alike(parser, argv, message, capsys):
    error = _error_of(parser, argv, capsys)
    assert message in error and "usage:" not in error and len(error.splitlines()) == 2


def test_an_unknown_command_names_the_closest(capsys):
    assert cli.main(["trian"]) == 2
    assert capsys.readouterr().err == ("byol-fast: unknown command 'trian'; did you mean 'train'? "
                                       "(`byol-fast --help` lists the commands)\n")


def test_help_imports_no_torch():
    # It took 3-20 s, all of it importing torch through byol_fast/__init__.py.
    probe = ("import sys; from byol_fast.cli import main; main(['--help']); "
             "print('torch' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, check=True)
    assert "train" in result.stdout and result.stdout.splitlines()[-1] == "False"
    import byol_fast  # the public names still import, on first use
    assert byol_fast.WarmupCosineLR.__module__ == "byol_fast.schedules" and "BYOL" in dir(byol_fast)
