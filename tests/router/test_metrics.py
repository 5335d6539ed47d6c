"""The Prometheus text of ``/metrics``: values written exactly."""

from __future__ import annotations

from router.metrics import Metrics


def test_counters_and_gauges_past_a_million_are_written_exactly():
    """``{:g}`` wrote 1234567 as ``1.23457e+06``: a counter past a million stood still in
    ``rate()`` until its sixth digit moved."""
    metrics = Metrics()
    metrics.inc("contact_router_messages_received_total", value=1_234_567, channel="webform")
    metrics.inc("contact_router_messages_received_total", channel="webform")
    metrics.gauge("contact_router_outbox_rows", lambda: [({"state": "pending"}, 2_000_001.0), ({"state": "sent"}, 0.25)])
    metrics.gauge("contact_router_odd", lambda: [({"v": "nan"}, float("nan")), ({"v": "inf"}, float("inf"))])
    lines = metrics.render().splitlines()
    assert 'contact_router_messages_received_total{channel="webform"} 1234568' in lines
    assert 'contact_router_outbox_rows{state="pending"} 2000001' in lines
    assert 'contact_router_outbox_rows{state="sent"} 0.25' in lines
    assert 'contact_router_odd{v="nan"} NaN' in lines and 'contact_router_odd{v="inf"} +Inf' in lines
