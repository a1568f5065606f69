import pytest


def test_postgres_data_moves_out_of_homes_the_postgres_user_cannot_reach(tmp_path):
    import os
    from pathlib import Path

    from labbus.deploy.local.postgres import server_dir

    if os.geteuid() != 0:
        pytest.skip("only root runs the server as another user")
    assert server_dir(Path("/root/project/.local")).parent == Path("/var/tmp")
    assert server_dir(Path("/tmp") / ("x" * 120)).parent == Path("/var/tmp")  # socket too long
    assert server_dir(Path("/tmp/labbus-home")) == Path("/tmp/labbus-home/postgres")
