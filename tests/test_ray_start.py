"""A local Ray that fails to start is one line and exit status 1, not a traceback.

Ray raises a bare ``Exception`` ("node timed out during startup") when its processes miss
their start-up deadline on an overloaded machine; a cluster that cannot be reached stays
the user's to fix (exit 2). ``ray.init`` is replaced here: the failure cannot be provoked
on demand.
"""

from __future__ import annotations

import pytest
import ray

from calotune.cli import run_cli
from calotune.errors import ServiceError, UserError
from calotune.tuning import orchestrate


def _failing_init(exc: BaseException):
    def init(*args, **kwargs):
        raise exc
    return init


@pytest.mark.parametrize("exc", [Exception("The current node timed out during startup."),
                                 RuntimeError("raylet died"), ConnectionError("refused")])
def test_a_local_ray_that_does_not_start_is_a_service_error(monkeypatch, exc) -> None:
    monkeypatch.setattr(ray, "init", _failing_init(exc))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    with pytest.raises(ServiceError) as info:
        orchestrate._init_ray(None)
    assert "could not start a local Ray" in str(info.value)
    assert str(exc) in str(info.value)
    assert info.value.exit_code == 1


def test_an_unreachable_cluster_stays_the_users_error(monkeypatch) -> None:
    monkeypatch.setattr(ray, "init", _failing_init(Exception("timed out")))
    with pytest.raises(UserError) as info:
        orchestrate._init_ray("127.0.0.1:1")
    assert not isinstance(info.value, ServiceError)
    assert "--address 127.0.0.1:1" in str(info.value)


def test_the_command_line_exits_with_the_errors_own_status(capsys) -> None:
    def body() -> int:
        raise ServiceError("could not start a local Ray (boom)")

    assert run_cli(body) == 1
    assert capsys.readouterr().err.strip() == "error: could not start a local Ray (boom)"
