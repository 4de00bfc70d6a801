"""What ``sagaplane dlq list`` costs each broker: the versions it warns on (RabbitMQ 4.0 to
4.2, which count every return toward a default delivery limit of 20)."""

from __future__ import annotations

import pytest

from coordinator.cli import build_parser
from coordinator.cli.dlq import listing_counts_toward_the_limit


@pytest.mark.parametrize(
    ("version", "counted"),
    [((3, 10), False), ((3, 13), False), ((4, 0), True), ((4, 2), True), ((4, 3), False)],
)
def test_a_listing_counts_toward_the_limit_only_on_rabbitmq_4_0_to_4_2(
    version: tuple[int, int], counted: bool
) -> None:
    assert listing_counts_toward_the_limit(version) is counted


def test_dlq_list_help_says_what_a_listing_costs(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        build_parser({}).parse_args(["dlq", "list", "--help"])
    shown = capsys.readouterr().out
    assert "basic.nack" in shown and "DELIVERY COUNT" in shown and "4.0 to 4.2" in shown
