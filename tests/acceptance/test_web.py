"""The operator web page in a real browser: Playwright driving Debian's chromium
(``scripts/browser-setup``; Playwright never downloads a browser) against a real
coordinator serving the page. The saga's replies are applied through the store, as the
reply consumer applies a participant's (tests/helpers/transitions.py), so each
transition happens exactly when the test says.

The screenshot of a compensated saga's timeline is saved under ``$SAGAPLANE_TEST_ARTIFACTS``
(default ``tests/artifacts/``, gitignored).
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from coordinator.app import Coordinator
from helpers.broker import commands_sink
from helpers.coordinators import coordinator_settings
from helpers.transitions import fail_compensation, request, succeed, undo_all
from sagaplane import SagaClient

playwright_api = pytest.importorskip("playwright.async_api")
expect = playwright_api.expect

CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = Path(
    os.environ.get("SAGAPLANE_TEST_ARTIFACTS") or Path(__file__).parents[1] / "artifacts"
)
WAIT_MS = 15_000

pytestmark = pytest.mark.skipif(
    not CHROMIUM.exists(), reason="no /usr/bin/chromium: run scripts/browser-setup"
)


def _fresh_artifact(name: str) -> Path:
    """Where to save an artifact, with no file of an earlier run there."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / name
    path.unlink(missing_ok=True)
    return path


def _size(path: Path) -> int:
    """Bytes in ``path``; 0 if it was not written."""
    return path.stat().st_size if path.exists() else 0


@pytest.fixture
async def web(database_url: str, amqp_url: str) -> AsyncIterator[Coordinator]:
    """A coordinator serving its web page on a free port; its commands are delivered
    (to a queue that never answers: the tests reply through the store)."""
    settings = coordinator_settings(database_url, amqp_url, http_listen="127.0.0.1:0")
    async with commands_sink(amqp_url), Coordinator(settings) as running:
        yield running


@pytest.fixture
async def page(web: Coordinator) -> AsyncIterator[object]:
    """A page of a headless chromium, its base URL the coordinator's web page."""
    expect.set_options(timeout=WAIT_MS)
    async with playwright_api.async_playwright() as playwright:
        browser = await playwright.chromium.launch(
            executable_path=str(CHROMIUM), headless=True, args=["--no-sandbox"]
        )
        context = await browser.new_context(
            base_url=f"http://127.0.0.1:{web.http_port}", viewport={"width": 1200, "height": 900}
        )
        page = await context.new_page()
        errors: list[str] = []
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        yield page
        await browser.close()
    assert not errors, f"the page's script failed: {errors}"


async def test_an_operator_follows_and_compensates_a_saga(web: Coordinator, page: object) -> None:
    assert web.store is not None
    p = page  # type: ignore[assignment]
    await p.goto("/sagas")
    await expect(p.locator("table.sagas")).to_contain_text("No saga matches.")
    async with SagaClient(f"127.0.0.1:{web.port}") as client:
        saga_id = (await client.start_saga_request(request("order.place"))).id

        # The list shows the running saga (it refreshes itself: no reload).
        row = p.locator(f"tr[data-saga='{saga_id}']")
        await expect(row).to_contain_text("order.place")
        await expect(row.locator(".state")).to_have_text("started")
        await expect(p.locator(".counts [data-state=started] .count")).to_have_text("1")

        # Its page shows the steps.
        await row.locator("a").click()
        await expect(p).to_have_url(f"/sagas/{saga_id}")
        steps = p.locator("#steps tbody tr")
        await expect(steps).to_have_count(3)
        await expect(steps.nth(0)).to_contain_text("create")
        await expect(steps.nth(0).locator(".state")).to_have_text("started")
        await expect(steps.nth(1).locator(".state")).to_have_text("pending")

        # A transition appears without a reload (a reload would lose this mark).
        await p.evaluate("window.notReloaded = true")
        await succeed(web.store, saga_id)
        await expect(steps.nth(0).locator(".state")).to_have_text("completed")
        await expect(steps.nth(1).locator(".state")).to_have_text("started")
        await expect(p.locator("#history")).to_contain_text("step_completed")
        assert await p.evaluate("window.notReloaded") is True

        # Compensate, after confirming, moves the saga to compensating.
        await p.get_by_role("button", name="Compensate").click()
        dialog = p.locator("dialog#compensate")
        await expect(dialog).to_be_visible()
        await dialog.get_by_label("Reason").fill("customer called")
        await dialog.get_by_role("button", name="Compensate").click()
        await expect(dialog).to_be_hidden()
        await expect(p.locator("#summary h1 .state")).to_have_text("compensating")
        assert (await client.get_saga(saga_id)).state == "compensating"
        assert await p.evaluate("window.notReloaded") is True

        # The step in flight is awaited (it fails), then create is undone: the timeline
        # shows the undo in a colour of its own.
        await succeed(web.store, saga_id, fail=True)
        await undo_all(web.store, saga_id)
        await expect(p.locator("#summary h1 .state")).to_have_text("compensated")
        await expect(p.locator("[data-live-status]")).to_have_text("ended")
        timeline = p.locator("#timeline")
        await expect(timeline.locator("rect.bar.compensate")).to_have_count(1)
        await expect(timeline.locator("rect.bar.execute.succeeded")).to_have_count(1)
        await expect(timeline.locator("rect.bar.execute.failed")).to_have_count(1)

        shot = _fresh_artifact("web-timeline-compensated.png")
        await timeline.screenshot(path=str(shot))
        assert _size(shot) > 0


async def test_a_stuck_compensation_is_resolved_from_its_page(
    web: Coordinator, page: object
) -> None:
    assert web.store is not None
    async with SagaClient(f"127.0.0.1:{web.port}") as client:
        saga_id = (await client.start_saga_request(request())).id
        await succeed(web.store, saga_id)
        p = page  # type: ignore[assignment]
        await p.goto(f"/sagas/{saga_id}")

        # Cancelling the dialog does nothing.
        await p.get_by_role("button", name="Compensate").click()
        dialog = p.locator("dialog#compensate")
        await dialog.get_by_role("button", name="Cancel").click()
        await expect(dialog).to_be_hidden()
        assert (await client.get_saga(saga_id)).state == "started"

        # The undo of create fails for good: the page offers to resolve it.
        await client.compensate(saga_id, "test")
        await succeed(web.store, saga_id, fail=True)
        await fail_compensation(web.store, saga_id, "refund service gone")
        await expect(p.locator("#summary h1 .state")).to_have_text("compensation_failed")
        await expect(p.locator("#summary")).to_contain_text("refund service gone")
        await p.get_by_role("button", name="Resolve compensation").click()
        dialog = p.locator("dialog#resolve")
        await dialog.get_by_label("Mark it compensated").check()
        await dialog.get_by_label("Reason").fill("refunded by hand")
        await dialog.get_by_role("button", name="Resolve").click()
        await expect(dialog).to_be_hidden()
        await expect(p.locator("#summary h1 .state")).to_have_text("compensated")
        await expect(p.locator("#history")).to_contain_text("refunded by hand")
