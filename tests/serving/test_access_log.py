"""Access logs never hold credentials: uvicorn's access lines lose their query strings."""

from __future__ import annotations

import logging

import pytest

from broadfast.serving.server import NoQueryStrings, hide_query_strings


def test_a_token_in_the_query_string_never_reaches_the_access_log(caplog: pytest.LogCaptureFixture) -> None:
    hide_query_strings()
    hide_query_strings()  # idempotent
    access = logging.getLogger("uvicorn.access")
    assert sum(isinstance(f, NoQueryStrings) for f in access.filters) == 1
    with caplog.at_level(logging.INFO, logger="uvicorn.access"):
        access.info('%s - "%s %s HTTP/%s" %d', "127.0.0.1:5000", "GET", "/admin/models?token=s3cret-t0ken&x=1", "1.1", 401)
        access.info('%s - "%s %s HTTP/%s" %d', "127.0.0.1:5000", "POST", "/v1/score", "1.1", 200)
    text = caplog.text
    assert "s3cret-t0ken" not in text and "token=" not in text
    assert '"GET /admin/models?… HTTP/1.1" 401' in text and '"POST /v1/score HTTP/1.1" 200' in text
