"""One CLI convention, checked on every command the app has (walked from the Typer app, so
options and commands added later are checked too): every option shows its default or is
required, no boolean flag shows a `<bool>` value, and `--debug` works after the command."""

import pytest
import typer
from typer.testing import CliRunner

from odis_cli.app import app

runner = CliRunner()


def walk(command, ctx, path=()):
    """(path, command) for the app and every group and command below it."""
    yield path, command
    if isinstance(command, typer.core.TyperGroup):
        for name in command.list_commands(ctx):
            sub = command.get_command(ctx, name)
            sub_ctx = typer.Context(sub, info_name=name, parent=ctx)
            yield from walk(sub, sub_ctx, (*path, name))


def all_commands():
    root = typer.main.get_command(app)
    return list(walk(root, typer.Context(root, info_name="odis")))


COMMANDS = all_commands()


def test_the_walk_finds_every_command():
    paths = {" ".join(path) for path, _ in COMMANDS}
    assert {"pretrain", "export", "embed", "knn", "demo", "masks coco", "masks sam",
            "masks stats", "masks show", "data scenes fashion-mnist"} <= paths


def _ctx_of(path):
    root = typer.main.get_command(app)
    ctx = typer.Context(root, info_name="odis")
    command = root
    for name in path:
        command = command.get_command(ctx, name)
        ctx = typer.Context(command, info_name=name, parent=ctx)
    return command, ctx


@pytest.mark.parametrize(
    "path", [path for path, _ in COMMANDS], ids=lambda path: " ".join(path) or "odis"
)
def test_help_shows_every_default_and_no_bool_placeholder(path):
    command, ctx = _ctx_of(path)
    missing = []
    for param in command.get_params(ctx):
        if param.param_type_name != "option" or param.is_eager or param.required:
            continue  # --help/--version act at once; required options have no default
        shown = isinstance(param.show_default, str) or (
            param.show_default and param.default is not None
        )
        if not shown:
            missing.append(param.opts[0])
    assert not missing, f"odis {' '.join(path)}: no default shown for {missing}"
    result = runner.invoke(app, [*path, "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "<bool>" not in result.output
    if path and not isinstance(command, typer.core.TyperGroup):
        assert "--debug" in result.output


def test_sam_defaults_shown_are_sams_own():
    import inspect

    from segment_anything import SamAutomaticMaskGenerator

    from odis_cli.masks import SAM_GENERATOR_DEFAULTS

    signature = inspect.signature(SamAutomaticMaskGenerator.__init__).parameters
    assert {name: signature[name].default for name in SAM_GENERATOR_DEFAULTS} == (
        SAM_GENERATOR_DEFAULTS)


def test_debug_after_the_command_shows_the_traceback():
    quiet = runner.invoke(app, ["pretrain", "--config", "no-such-recipe", "--show-config"])
    assert quiet.exit_code == 1 and isinstance(quiet.exception, SystemExit)
    loud = runner.invoke(app, ["pretrain", "--config", "no-such-recipe", "--show-config",
                               "--debug"])
    assert isinstance(loud.exception, ValueError)
    before = runner.invoke(app, ["--debug", "pretrain", "--config", "no-such-recipe",
                                 "--show-config"])
    assert isinstance(before.exception, ValueError)


def test_knn_table_title_lines_stay_whole_at_80_columns():
    from rich.console import Console

    from odis_cli.knn import knn_table

    report = {"results": {"20": {"top1": 71.3, "top5": 93.0}}}
    console = Console(width=80, record=True)
    title = "weighted k-NN, T=0.07\n50000 train / 10000 test, faiss"
    console.print(knn_table(title, {"": report}))
    text = console.export_text()
    assert all(line in text for line in title.splitlines()), text
