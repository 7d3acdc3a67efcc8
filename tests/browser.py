"""The MLflow UI in a real browser: Debian's headless Chromium driven by Playwright (never `playwright install`).

:func:`check_sweep_ui` does what a user does with a finished sweep: opens the runs page that `ofq-ray tune`
prints, expands the sweep's parent run to see its trials, opens the parent (its description is the sweep's
summary, its artifacts the plots), and opens the registered model to find the ``champion`` alias. It asserts
on what the pages show and keeps a screenshot of each step in ``shots_dir``.

Also a command, which is how docs/mlflow_ui.png is made from a real `make sweep` store served by `ofq-ray ui`::

    .venv/bin/python tests/browser.py http://127.0.0.1:5000 fmnist-cga fmnist-cga test-output/ui
    cp test-output/ui/runs.png docs/mlflow_ui.png
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from playwright.sync_api import Page

CHROMIUM = "/usr/bin/chromium"  # Debian's package (make test installs it)
TIMEOUT_MS = 120_000  # a cold MLflow UI (a 10 MB bundle) on two busy cores
RUN_NAME_CELL = '[col-id="attributes.`Run Name`"]'  # the runs table's (ag-grid) run-name column


@contextlib.contextmanager
def ui_server(
    runs_dir: Path, *, workers: int = 1, log_path: Path | None = None
) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """`ofq-ray ui` on ``runs_dir`` and a free port of 127.0.0.1, in its own session (stopped as a group);
    yields its URL and process once /health answers."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = int(sock.getsockname()[1])
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}  # the folder's store, not another
    command = [sys.executable, "-m", "ofq_ray.cli", "ui", "--runs-dir", str(runs_dir), "--port", str(port)]
    with open(log_path or os.devnull, "wb") as log:
        process = subprocess.Popen(
            [*command, "--workers", str(workers)], env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 240  # creating the database and importing MLflow twice, on two busy cores
        while True:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if process.poll() is not None or time.time() > deadline:
                shown = log_path.read_text()[-3000:] if log_path else ""
                raise RuntimeError(f"`ofq-ray ui` did not come up at {url}\n{shown}")
            time.sleep(0.5)
        yield url, process
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=30)


@contextlib.contextmanager
def browser_page() -> Iterator[Page]:
    """One headless Chromium with one page; reuse the page for every check of a test module."""
    if not os.access(CHROMIUM, os.X_OK):
        raise RuntimeError(f"no Chromium at {CHROMIUM}: `make test` installs it (apt-get install -y chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1600, "height": 900})  # wide enough for the metric columns
            page.set_default_timeout(TIMEOUT_MS)
            yield page
        finally:
            browser.close()


def open_page(page: Page, url: str, wait_for: str, shot: Path | None = None) -> str:
    """Opens ``url``, waits until ``wait_for`` shows, saves a screenshot to ``shot`` and returns the page's text."""
    page.goto(url)
    page.get_by_text(wait_for).first.wait_for()
    close_assistant(page)
    if shot is not None:
        page.screenshot(path=str(shot))
    return page.inner_text("body")


def close_assistant(page: Page) -> None:
    """MLflow 3.x opens its chat panel (the "MLflow Assistant") on a browser's first visit: close it, as a user
    would, so the screenshots show the pages (the choice is kept for the rest of the session)."""
    close = page.get_by_label("Close", exact=True)
    if page.get_by_text("MLflow Assistant").first.is_visible() and close.count() and close.first.is_visible():
        close.first.click()


def check_sweep_ui(
    base_url: str, experiment: str, model_name: str, shots_dir: str | Path, *, page: Page | None = None
) -> None:
    """Asserts that the MLflow UI at ``base_url`` shows the newest sweep of ``experiment`` and its champion.

    Steps (each leaves ``<shots_dir>/<step>.png``), after choosing "Model training" in MLflow's view switch
    as the README says:

    - ``runs``: the experiment's runs page (the URL `ofq-ray tune` prints) with the parent expanded: the
      parent's and every trial's run name, the ranked metric and its ``best/`` copy as columns;
    - ``parent``: the parent run: its description (the summary: "N trials (...", the champion's
      ``models:/`` URI) and its ``best/<metric>`` metrics;
    - ``plots``: its artifacts, ``plots/`` opened on the first plot;
    - ``model``: the registered model, the ``champion`` alias on the version the registry gives.

    Args:
        base_url: The MLflow server (``http://127.0.0.1:PORT``); what to expect is read from its REST API.
        experiment: The sweep's experiment (``sweep.experiment``).
        model_name: Its registered model (``sanitize_model_name(sweep.name)``).
        shots_dir: Folder for the screenshots (created). The trials must fit the page (about 20 rows): the runs table
            only renders the rows in view.
        page: A page to reuse (:func:`browser_page`); by default one Chromium is started for this call.
    """
    if page is None:
        with browser_page() as own:
            check_sweep_ui(base_url, experiment, model_name, shots_dir, page=own)
        return
    from ofq_ray.tracking import runs_view_url

    base_url = base_url.rstrip("/")
    shots = Path(shots_dir)
    shots.mkdir(parents=True, exist_ok=True)
    found = _rest(base_url, "experiments/get-by-name", experiment_name=experiment)["experiment"]
    runs = _runs(base_url, found["experiment_id"])
    sweeps = [run for run in runs if _tags(run).get("ofq.kind") == "sweep"]
    assert sweeps, f"no sweep parent run (tag ofq.kind=sweep) in experiment {experiment!r}"
    parent = max(sweeps, key=lambda run: int(run["info"]["start_time"]))
    parent_id, parent_name = parent["info"]["run_id"], parent["info"]["run_name"]
    children = [run["info"]["run_name"] for run in runs if _tags(run).get("mlflow.parentRunId") == parent_id]
    assert children, f"sweep run {parent_name!r} has no child runs"
    metric = _tags(parent).get("ofq.rank.metric", "val/top1")

    # 0. Once per browser (README): "Model training" in MLflow's GenAI / Model training switch, which MLflow
    # keeps in the browser's local storage; otherwise pages opened from the runs page fall back to GenAI.
    open_page(page, f"{base_url}/#/", "Model training")
    page.get_by_role("button", name="Model training", exact=True).click()

    # 1. The runs page, the parent expanded to its trials, the ranked metric shown for each.
    page.goto(runs_view_url(base_url, found["experiment_id"]))
    parent_link = page.get_by_role("link", name=parent_name, exact=True)
    parent_link.wait_for()
    close_assistant(page)
    first_child = page.get_by_role("link", name=children[0], exact=True)
    if not first_child.is_visible():  # collapsed: a new browser, or a new sweep
        page.get_by_role("row").filter(has=parent_link).locator(RUN_NAME_CELL).get_by_role("button").first.click()
    for name in children:
        page.get_by_role("link", name=name, exact=True).wait_for()
    _set_columns(page, {"Dataset": False, "Source": False, "Models": False, metric: True, f"best/{metric}": True})
    page.locator(f".ag-header-cell{RUN_NAME_CELL} .ag-header-cell-resize").dblclick()  # fit the names
    page.screenshot(path=str(shots / "runs.png"))
    text = page.inner_text("body")
    missing = [name for name in [parent_name, *children] if name not in text]
    assert not missing, f"runs page lacks {missing}"

    # 2. The parent run: the summary as its description, the best trial's metrics on it.
    parent_link.click()
    page.get_by_text("trials (").first.wait_for()
    page.get_by_text(f"models:/{model_name}@champion").first.wait_for()
    more = page.get_by_text("Show more", exact=True)  # a long description starts folded
    if more.count() and more.first.is_visible():
        more.first.click()
    page.screenshot(path=str(shots / "parent.png"), full_page=True)
    text = page.inner_text("body")
    assert re.search(r"\d+ trials \(\d+ completed", text), "the parent's description is not the sweep summary"
    assert "Model registry" in text, "the run page fell back to MLflow's GenAI view"
    if any(m["key"].startswith("best/") for m in parent["data"].get("metrics", [])):
        assert f"best/{metric}" in text, f"parent run page lacks best/{metric}"

    # 3. Its artifacts: the summary files and the plots folder, opened on its first plot.
    plots = [f["path"] for f in _rest(base_url, "artifacts/list", run_id=parent_id, path="plots").get("files", [])]
    assert plots, f"sweep run {parent_name!r} has no plots/ artifacts"
    page.get_by_role("tab", name="Artifacts").click()
    page.get_by_text("summary.md", exact=True).first.wait_for()
    page.get_by_text("plots", exact=True).first.click()
    first_plot = _basename(plots[0])
    page.get_by_text(first_plot, exact=True).first.click()
    page.locator(f'img[alt="{plots[0]}"]').first.wait_for()  # the preview, named by its artifact path
    page.screenshot(path=str(shots / "plots.png"))
    text = page.inner_text("body")
    for name in ("summary.md", "trials.json", "plots", first_plot):
        assert name in text, f"artifacts view lacks {name}"

    # 4. The registered model: which version the champion alias points at.
    version = _rest(base_url, "registered-models/alias", name=model_name, alias="champion")["model_version"]["version"]
    text = open_page(page, f"{base_url}/#/models/{urllib.parse.quote(model_name)}", "champion", shots / "model.png")
    assert f"Version {version}" in text, f"registered model page lacks version {version}"
    assert re.search(r"@\s*champion", text), "registered model page shows no champion alias"


def _basename(path: str) -> str:
    return path.rstrip("/").rsplit("/", 1)[-1]


def _set_columns(page: Page, shown: dict[str, bool]) -> None:
    """Columns > search > tick or untick each column: MLflow 3.x's runs table shows no metric until asked,
    and its Dataset, Source and Models columns, empty for our runs, would push the metrics out of view."""
    page.get_by_role("button", name="Columns", exact=True).click()
    dialog = page.get_by_role("dialog")
    for column, show in shown.items():
        dialog.get_by_placeholder("Search columns").fill(column)
        title = page.locator(".du-bois-light-tree-title").filter(has_text=re.compile(f"^{re.escape(column)}$"))
        node = dialog.locator(".du-bois-light-tree-treenode").filter(has=title)
        checkbox = node.locator(".du-bois-light-tree-checkbox")
        if ("checkbox-checked" in (checkbox.get_attribute("class") or "")) != show:
            checkbox.click()
    page.keyboard.press("Escape")
    for column, show in shown.items():
        if show:
            page.locator(".ag-header").get_by_text(column, exact=True).first.wait_for()


def _rest(base_url: str, endpoint: str, **query: str) -> Any:
    url = f"{base_url}/api/2.0/mlflow/{endpoint}?{urllib.parse.urlencode(query)}"
    with urllib.request.urlopen(url, timeout=30) as response:
        return json.load(response)


def _runs(base_url: str, experiment_id: str) -> list[dict[str, Any]]:
    runs: list[dict[str, Any]] = []
    token = None
    while True:
        body: dict[str, Any] = {"experiment_ids": [experiment_id], "max_results": 1000}
        if token:
            body["page_token"] = token
        request = urllib.request.Request(
            f"{base_url}/api/2.0/mlflow/runs/search",
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=30) as response:
            page = json.load(response)
        runs.extend(page.get("runs", []))
        token = page.get("next_page_token")
        if not token:
            return runs


def _tags(run: dict[str, Any]) -> dict[str, str]:
    return {tag["key"]: tag["value"] for tag in run["data"].get("tags", [])}


if __name__ == "__main__":
    if len(sys.argv) != 5:
        raise SystemExit("usage: python tests/browser.py BASE_URL EXPERIMENT MODEL_NAME SHOTS_DIR")
    check_sweep_ui(*sys.argv[1:5])
    print(f"MLflow UI checks passed; screenshots in {sys.argv[4]}")
