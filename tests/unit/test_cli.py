"""Every `labbus` command answers --help; bad configuration names the variable."""

import click
import pytest
from click.testing import CliRunner

from labbus.deploy.cli import main


def commands(group: click.Group, prefix=()):
    for name, cmd in group.commands.items():
        yield (*prefix, name)
        if isinstance(cmd, click.Group):
            yield from commands(cmd, (*prefix, name))


@pytest.mark.parametrize("path", [(), *commands(main)], ids=lambda p: " ".join(p) or "labbus")
def test_help_everywhere(path):
    result = CliRunner().invoke(main, [*path, "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage:" in result.output


def test_bad_config_names_the_variable():
    result = CliRunner().invoke(main, ["config"], env={"LABBUS_API_PORT": "eighty"})
    assert result.exit_code != 0
    assert "LABBUS_API_PORT" in result.output


def test_bad_fraction_out_of_range_is_a_usage_error():
    result = CliRunner().invoke(main, ["agent", "sim", "--bad-fraction", "2", "--metrics-port",
                                       "-1"])
    assert result.exit_code == 2 and "--bad-fraction" in result.output

