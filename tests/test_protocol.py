"""The hub protocol: one table gives every reason the hub answers with its HTTP status."""

import httpx
import pytest
from datasette.utils.asgi import BadRequest, Forbidden, NotFound, PayloadTooLarge

from datasette_sync import views
from sqlite_utils_sync import errors, protocol


def catalogue() -> set[str]:
    return {value for name, value in vars(errors).items() if name.isupper() and isinstance(value, str)}


def test_every_reason_has_a_hub_status_or_is_the_clients_own():
    assert catalogue() - set(protocol.STATUS) == protocol.CLIENT_REASONS
    assert set(protocol.STATUS) <= catalogue()


def test_endpoint_errors_are_datasettes_with_the_tables_status():
    for cls, datasette_cls in [
        (views.SyncBadRequest, BadRequest),
        (views.SyncForbidden, Forbidden),
        (views.SyncNotFound, NotFound),
        (views.SyncPayloadTooLarge, PayloadTooLarge),
    ]:
        error = cls("message")
        assert isinstance(error, datasette_cls)
        assert error.status == datasette_cls.status == protocol.STATUS[error.reason]
    assert views.MethodNotAllowed("Use GET").status == 405
    assert views.EndpointError("gone", errors.DEVICE_OWNED).status == 403


def test_clock_encoding_round_trips():
    clock = {"b" * 32: 2, "a" * 32: 1}
    text = protocol.encode_clock(clock)
    assert text == '{"' + "a" * 32 + '":1,"' + "b" * 32 + '":2}'
    assert protocol.decode_clock(text, "clock") == clock
    assert protocol.decode_clock(None, "clock") == {}


def test_a_clock_too_long_for_a_pulls_url_is_refused_in_words():
    # The pull's since travels in the URL; httpx refuses one past 64 KB as "not a valid URL",
    # which blamed a URL the user never typed.
    devices = {f"{i:032x}": i + 1 for i in range(2000)}
    with pytest.raises(errors.SyncError) as refused:
        protocol.since_param(devices)
    assert refused.value.reason == "too_many_devices"
    assert str(refused.value) == (
        "this copy's clock names 2000 devices, too many for a pull through a hub, whose URL carries the clock "
        "(about 1,200 at most): sync by bundle files instead (export-bundle, import-bundle)"
    )
    few = dict(list(devices.items())[:1000])
    assert len(httpx.URL("http://hub/data/-/sync/export", params={"since": protocol.since_param(few)}).query) < 65536
    assert protocol.decode_clock(protocol.since_param(few), "since") == few
