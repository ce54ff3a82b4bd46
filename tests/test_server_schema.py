"""A property-based run of the server's OpenAPI schema (schemathesis): whatever a client sends, in or out of
the schema, the answer is never a 500. Generation itself is stubbed (each job finishes at once), so the run
exercises everything before the queue: validation, decoding, name lookup, the A1111 and native mappings."""

from __future__ import annotations

import pytest
import schemathesis
import torch
from hypothesis import HealthCheck, settings

from imprompt import toy
from imprompt.models.catalog import roots_from
from imprompt.server.app import create_app
from imprompt.server.config import ServerConfig
from imprompt.server.engine import Engine


class InstantEngine(Engine):
    """The real engine with a worker that finishes every job without generating."""

    def _run(self, job) -> None:
        job.step = job.total_steps


def make_app():
    config = ServerConfig(ui=False)
    return create_app(config, InstantEngine(config, roots_from([]), [toy.PACKAGE_DIR]))


# Hypothesis refuses to draw floats where subnormals flush to zero, which other test modules turn on
# (tiny random models run 10x slower with denormals): off while this module collects and runs.
torch.set_flush_denormal(False)
APP = make_app()
schema = schemathesis.openapi.from_asgi("/openapi.json", APP)


@pytest.fixture(autouse=True)
def subnormal_floats():
    torch.set_flush_denormal(False)
    yield
    torch.set_flush_denormal(True)


@pytest.mark.slow
@schema.parametrize()
@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
def test_no_request_gets_a_500(case):
    response = case.call()
    assert response.status_code < 500, (case.method, case.path, response.status_code, response.text[:300])
