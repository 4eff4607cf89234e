"""The web dashboard, in a real browser: headless Chromium (Debian's, /usr/bin/chromium; the
Makefile installs it) driven by Playwright, against the real app over HTTP with a real worker
process training a real job on the tiny model.

Signed in with an API key, the page shows the job's loss curve growing while it trains,
pauses and resumes it from its buttons, downloads its adapters byte for byte, reports a bad
upload's line numbers, and never shows another owner's job.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from playwright.sync_api import expect, sync_playwright

from api.db import make_engine, make_sessionmaker
from tests.conftest import Api, WorkerProcess, chat_rows, create_api_key, insert_job

CHROMIUM = Path("/usr/bin/chromium")
# Nothing of the browser's own may reach the network, and no sandbox as root in a container.
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
WAIT_MS = 60_000


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    if not CHROMIUM.exists():
        pytest.fail("no /usr/bin/chromium: run `make install` (apt-get install chromium)")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture
def page(browser: Any, tmp_path: Path) -> Iterator[Any]:
    context = browser.new_context(accept_downloads=True, viewport={"width": 1280, "height": 900})
    page = context.new_page()
    page.set_default_timeout(WAIT_MS)
    problems: list[str] = []
    # A CSP violation or a script error shows as a console error: the page must have none.
    page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: problems.append(str(e)))
    yield page
    context.close()
    # The 401 and 404 the tests provoke on purpose log as failed loads; a CSP violation
    # ("Refused to ...") or an uncaught error does not look like that.
    assert [p for p in problems if not p.startswith("Failed to load resource")] == []


def sign_in(page: Any, api: Api, key: str | None = None, hash: str = "") -> None:
    page.goto(f"{api.url}/{hash}")
    page.fill("#api-key", key or api.key)
    page.click("#sign-in button[type=submit]")
    page.wait_for_selector("#nav:not([hidden])")


def points(page: Any, metric: str) -> int:
    value = page.get_attribute(f'figure.chart[data-metric="{metric}"]', "data-points")
    return int(value or 0)


def shows_absent_values(page: Any, selector: str) -> bool:
    """Whether the area shows a null or undefined written out as text (the page leaves an
    absent value out). The area must hold no data that says "null" itself."""
    text = page.text_content(selector)
    return "null" in text or "undefined" in text


def wait_until(check: Callable[[], bool], timeout_s: float = 60, what: str = "") -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def create_job(api: Api, rows: int, n_epochs: int) -> str:
    train = api.upload(chat_rows(rows, seed=7))
    response = api.http.post(
        "fine_tuning/jobs",
        json={
            "model": "tiny",
            "training_file": train["id"],
            "seed": 5,
            "suffix": "dash",
            "method": {
                "type": "supervised",
                "supervised": {
                    "hyperparameters": {
                        "n_epochs": n_epochs,
                        "batch_size": 1,
                        "learning_rate_multiplier": 10,
                    }
                },
            },
            "adapter": {"type": "lora", "r": 4},
            "max_seq_len": 64,
        },
    )
    assert response.status_code == 200, response.text
    return str(response.json()["id"])


def status_of(api: Api, job_id: str) -> str:
    return str(api.http.get(f"fine_tuning/jobs/{job_id}").json()["status"])


# -- the page and its assets, without a browser --------------------------------------------------


def test_dashboard_is_served_with_a_content_security_policy(pg_api: Api) -> None:
    index = httpx.get(f"{pg_api.url}/")
    assert index.status_code == 200
    assert index.headers["content-type"].startswith("text/html")
    assert "default-src 'self'" in index.headers["content-security-policy"]
    assert '<script type="module" src="/dashboard/main.js">' in index.text
    script = httpx.get(f"{pg_api.url}/dashboard/main.js")
    assert script.status_code == 200
    assert script.headers["content-type"].startswith("text/javascript")
    chart = httpx.get(f"{pg_api.url}/dashboard/vendor/uplot/uPlot.esm.js")
    assert chart.status_code == 200 and "export { uPlot as default }" in chart.text
    # Nothing outside the dashboard's folder, and only its kinds of file.
    for path in ("/dashboard/../app.py", "/dashboard/%2e%2e/app.py", "/dashboard/nope.js"):
        assert httpx.get(f"{pg_api.url}{path}").status_code == 404, path
    assert httpx.get(f"{pg_api.url}/dashboard/vendor/uplot/LICENSE").status_code == 404


@pytest.fixture
def sessions(pg_api: Api) -> Iterator[Any]:
    engine = make_engine(pg_api.settings)
    yield make_sessionmaker(engine)
    engine.dispose()


def test_jobs_list_filters_by_status(pg_api: Api, sessions: Any) -> None:
    owner = f"filter-{time.monotonic_ns()}"
    client = pg_api.as_owner(owner)
    done = insert_job(sessions, owner=owner, status="succeeded")
    gone = insert_job(sessions, owner=owner, status="cancelled")

    def ids(params: dict[str, str]) -> list[str]:
        page = client.get("fine_tuning/jobs", params=params).json()
        return [job["id"] for job in page["data"]]

    assert ids({"status": "succeeded"}) == [done]
    assert ids({"status": "cancelled"}) == [gone]
    assert ids({"status": "running"}) == []
    assert ids({}) == [gone, done]  # newest first, as without the filter
    bad = client.get("fine_tuning/jobs", params={"status": "sleeping"})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "status"


# -- in the browser -------------------------------------------------------------------------------


@pytest.mark.slow
def test_watch_pause_resume_and_download(page: Any, pg_api: Api, pg_worker: WorkerProcess) -> None:
    # 768 steps (128 rows, batch 1, 6 epochs): long enough, on a fast idle machine too, to
    # watch the curve grow, pause mid-run, and watch the list follow the resumed run.
    job_id = create_job(pg_api, rows=128, n_epochs=6)
    sign_in(page, pg_api)
    page.click(f'#jobs a[href="#/jobs/{job_id}"]')
    page.wait_for_selector("#job-header h1")
    assert page.text_content("#job-header h1") == job_id
    assert not shows_absent_values(page, "#controls")

    # The loss curve grows from the metrics stream, without a reload.
    page.wait_for_selector('figure.chart[data-metric="loss"]')
    wait_until(lambda: points(page, "loss") >= 3, what="the first loss points")
    first = points(page, "loss")
    wait_until(lambda: points(page, "loss") > first, what="the curve to grow")
    assert page.url.endswith(f"#/jobs/{job_id}")  # the same page, never reloaded
    assert page.locator('figure.chart[data-metric="learning_rate"]').count() == 1

    page.click("#pause-job")
    pg_api.wait_for(job_id, lambda job: job["status"] == "paused", 120)
    page.wait_for_selector("#job-status.paused")
    # The stream may still be delivering the points logged just before the pause: the curve
    # catches up with every step the job stored, then a paused job logs nothing more.
    series = pg_api.http.get(f"fine_tuning/jobs/{job_id}/metrics", params={"keys": "train_loss"})
    stored = len(series.json()["step"])
    wait_until(lambda: points(page, "loss") == stored, what="the curve to hold every stored step")
    time.sleep(1.5)
    assert points(page, "loss") == stored  # a paused job logs nothing

    # The pause saved a checkpoint: its adapter downloads through the page, byte for byte.
    checkpoint = pg_api.http.get(f"fine_tuning/jobs/{job_id}/checkpoints").json()["data"][0]
    page.wait_for_selector("#checkpoints button.download-checkpoint")
    with page.expect_download() as saved:
        page.locator("#checkpoints button.download-checkpoint").first.click()
    expected = pg_api.http.get(f"fine_tuning/jobs/{job_id}/checkpoints/{checkpoint['id']}/adapter")
    assert expected.status_code == 200
    assert Path(saved.value.path()).read_bytes() == expected.content
    assert saved.value.suggested_filename == f"{checkpoint['id']}-adapter.tar"

    page.click("#resume-job")
    pg_api.wait_for(job_id, lambda job: job["status"] in ("queued", "running", "succeeded"), 30)
    wait_until(lambda: points(page, "loss") > stored, 120, "the curve to continue")

    # The list follows a live job without a reload: its progress cell moves on.
    page.click('#nav a[data-page="jobs"]')
    progress = page.locator(f'#jobs tr[data-id="{job_id}"] td:nth-child(5)')
    before = progress.text_content()
    wait_until(lambda: progress.text_content() != before, 30, "the list to follow the job")
    page.click(f'#jobs a[href="#/jobs/{job_id}"]')

    job = pg_api.wait_terminal(job_id, 300)
    assert job["status"] == "succeeded", pg_worker.output()[-3000:]
    page.wait_for_selector("#job-status.succeeded")
    wait_until(lambda: points(page, "loss") == 768, 30, "every step drawn")
    with page.expect_download() as saved:
        page.click("#download-adapter")
    expected = pg_api.http.get(f"fine_tuning/jobs/{job_id}/adapter")
    assert Path(saved.value.path()).read_bytes() == expected.content


@pytest.mark.slow
def test_bad_upload_shows_its_line_numbers_and_files_delete(page: Any, pg_api: Api) -> None:
    good = chat_rows(2)
    bad = good + '{"messages": [{"role": "user", "content": "no answer"}]}\nnot json\n'
    sign_in(page, pg_api, hash="#/files")
    page.wait_for_selector("#upload-form")
    page.set_input_files(
        "#upload-file",
        {"name": "bad.jsonl", "mimeType": "application/json", "buffer": bad.encode()},
    )
    page.click("#upload-form button[type=submit]")
    page.wait_for_selector("#upload-status.error")
    assert "error" in page.text_content("#upload-status")
    lines = page.locator("#validation-errors tbody tr td:first-child").all_text_contents()
    assert lines == ["3", "4"]
    assert "line 3" in page.text_content("#status-details")
    assert not shows_absent_values(page, "#upload-report")

    # The list holds it; delete it from the page (after the confirm dialog) and it is gone.
    file_id = page.get_attribute("#upload-status", "data-file")
    assert file_id and pg_api.http.get(f"files/{file_id}").json()["filename"] == "bad.jsonl"
    page.wait_for_selector(f'#files tr[data-id="{file_id}"]')
    page.once("dialog", lambda dialog: dialog.accept())
    page.locator(f'#files tr[data-id="{file_id}"] button.delete-file').click()
    page.wait_for_selector(f'#files tr[data-id="{file_id}"]', state="detached")
    assert pg_api.http.get(f"files/{file_id}").status_code == 404


@pytest.mark.slow
def test_another_owners_job_is_not_reachable(page: Any, pg_api: Api, sessions: Any) -> None:
    # Terminal, so that no worker sweep picks it up: only its owner matters here.
    theirs = insert_job(sessions, owner="someone-else", status="succeeded")
    ours = insert_job(sessions, status="succeeded")
    sign_in(page, pg_api)
    page.wait_for_selector(f'#jobs a[href="#/jobs/{ours}"]')
    for status in ("", "succeeded"):
        page.goto(f"{pg_api.url}/#/jobs?status={status}")
        page.wait_for_selector(f'#jobs[data-status="{status}"]')
        assert theirs not in page.text_content("#jobs")
    page.goto(f"{pg_api.url}/#/jobs/{theirs}")
    page.wait_for_selector("#not-found")
    assert page.text_content("h1") == "Job not found"

    # Sign out forgets the key: the page asks for one again, and the tab holds none.
    page.click("#sign-out")
    page.wait_for_selector("#sign-in")
    assert page.evaluate("sessionStorage.getItem('alignd.key')") is None
    page.goto(f"{pg_api.url}/#/jobs/{ours}")
    page.wait_for_selector("#sign-in")


@pytest.mark.slow
def test_a_wrong_key_is_refused(page: Any, pg_api: Api) -> None:
    page.goto(f"{pg_api.url}/")
    page.fill("#api-key", "sk-alignd-not-a-key")
    page.click("#sign-in button[type=submit]")
    page.wait_for_selector("#sign-in-error:not(:empty)")
    assert "Incorrect API key" in page.text_content("#sign-in-error")
    assert page.evaluate("sessionStorage.getItem('alignd.key')") is None


@pytest.mark.slow
def test_jobs_pages_with_the_after_cursor_and_filters(
    page: Any, pg_api: Api, sessions: Any
) -> None:
    # An owner of its own, so that the counts are exactly these jobs (20 to a page).
    owner = f"pager-{time.monotonic_ns()}"
    key = create_api_key(pg_api.settings, owner)
    done = [insert_job(sessions, owner=owner, status="succeeded") for _ in range(22)]
    failed = insert_job(sessions, owner=owner, status="failed")
    newest_first = [failed, *reversed(done)]
    sign_in(page, pg_api, key)

    def shown() -> list[str]:
        page.wait_for_selector("#jobs")
        return [row.get_attribute("data-id") for row in page.locator("#jobs tbody tr").all()]

    assert shown() == newest_first[:20]
    page.click("#next-page")
    page.wait_for_selector("#first-page")
    assert shown() == newest_first[20:]
    assert page.locator("#next-page").count() == 0
    page.click("#first-page")
    page.wait_for_selector("#next-page")
    assert shown() == newest_first[:20]

    page.select_option("#status-filter", "failed")
    page.wait_for_url("**/#/jobs?status=failed")
    expect(page.locator("#jobs tbody tr")).to_have_count(1)
    assert shown() == [failed]
    page.select_option("#status-filter", "running")
    page.wait_for_selector("#jobs-empty")


@pytest.mark.slow
def test_new_job_form_creates_a_job_that_the_page_cancels(
    page: Any, pg_api: Api, pg_worker: WorkerProcess
) -> None:
    train = pg_api.upload(chat_rows(40, seed=9), filename="form.jsonl")
    sign_in(page, pg_api, hash="#/new")
    page.wait_for_selector("#new-job")
    assert not shows_absent_values(page, "#view")
    page.select_option("#model", "tiny")
    page.select_option("#training_file", train["id"])
    page.select_option("#method", "supervised")
    page.fill("#n_epochs", "20")  # 800 steps: it is still running when the page cancels it
    page.fill("#batch_size", "1")
    page.fill("#suffix", "form")
    page.click("#new-job button[type=submit]")
    page.wait_for_url("**/#/jobs/ftjob-*")
    job_id = page.url.rsplit("/", 1)[1]
    job = pg_api.http.get(f"fine_tuning/jobs/{job_id}").json()
    assert job["training_file"] == train["id"] and job["suffix"] == "form"
    hyper = job["method"]["supervised"]["hyperparameters"]
    assert (hyper["n_epochs"], hyper["batch_size"]) == (20, 1)
    assert '"learning_rate_multiplier"' in page.text_content("#spec")  # resolved from "auto"
    # ... beside the body the form sent, exactly as the API kept it.
    expect(page.locator("#spec-submitted")).to_contain_text('"suffix": "form"')
    kept = pg_api.http.get(f"fine_tuning/jobs/{job_id}/spec").json()["submitted"]
    assert json.loads(page.text_content("#spec-submitted") or "") == kept
    assert kept["suffix"] == "form" and kept["training_file"] == train["id"]

    page.wait_for_selector("#cancel-job:not([disabled])")
    page.click("#cancel-job")
    pg_api.wait_for(job_id, lambda j: j["status"] == "cancelled", 120)
    page.wait_for_selector("#job-status.cancelled")
    assert page.locator("#pause-job").is_disabled()


@pytest.mark.slow
def test_every_metric_of_a_dpo_job_is_drawn(
    page: Any, pg_api: Api, pg_worker: WorkerProcess
) -> None:
    from tests.test_e2e_methods import preference_rows

    train = pg_api.upload(preference_rows(16, seed=3, openai_format=True))
    valid = pg_api.upload(preference_rows(4, seed=4, openai_format=True))
    created = pg_api.http.post(
        "fine_tuning/jobs",
        json={
            "model": "tiny",
            "training_file": train["id"],
            "validation_file": valid["id"],
            "method": {"type": "dpo", "dpo": {"hyperparameters": {"n_epochs": 1, "batch_size": 2}}},
            "adapter": {"type": "lora", "r": 4},
            "max_seq_len": 64,
        },
    )
    assert created.status_code == 200, created.text
    job_id = created.json()["id"]
    assert pg_api.wait_terminal(job_id)["status"] == "succeeded", pg_worker.output()[-3000:]
    columns = pg_api.http.get(f"fine_tuning/jobs/{job_id}/metrics").json()
    steps = len(columns["step"])
    assert steps == 8  # 16 pairs, 2 a step

    sign_in(page, pg_api, hash=f"#/jobs/{job_id}")
    page.wait_for_selector("#job-status.succeeded")
    charts = page.locator("figure.chart")
    expect(charts.last).to_have_attribute("data-points", str(steps))
    drawn = {c.get_attribute("data-metric") for c in charts.all()}
    # Every metric of the stream has its chart (the *loss ones share one), the method's own
    # (rewards/margins, rewards/accuracies, ...) included, each with a point per step.
    expected = {"loss" if k.endswith("loss") else k.removeprefix("train_") for k in columns["keys"]}
    assert drawn == expected - {"epoch", "num_tokens"}
    assert any("margins" in name for name in drawn)
    for chart in charts.all():
        assert chart.get_attribute("data-points") == str(steps), chart.get_attribute("data-metric")
    # The validation pass (with the final checkpoint) joins the loss chart as a point.
    legend = page.text_content('figure.chart[data-metric="loss"]')
    assert "valid_loss" in legend
