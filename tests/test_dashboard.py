"""/metrics, /debug/vars and the dashboard against a real run on the local system.

A driver program (written to tmp_path, run as a subprocess, sampling every 0.5 s) starts
two machines that do some CPU work and update a counter, a gauge and a histogram by
amounts known here; then the tests read its debug server as a user would: /metrics
through prometheus_client's parser, /debug/vars, and the dashboard in headless Chromium
(selenium; skipped with a reason when /usr/bin/chromium or its driver is missing).

Set ``BIGMRUN_DASHBOARD_SCREENSHOT=docs/dashboard.png`` to also write the browser test's
screenshot there (it always goes to tmp_path): the README's picture is regenerated on
purpose, not by every test run.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests
from conftest import wait_until
from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"

DRIVER = textwrap.dedent('''
    """Test driver: 2 machines doing work and updating cluster variables."""
    import json, os, sys, time

    import bigmrun
    import bigmrun.vars as bvars

    items = bvars.counter("work_items", "items processed")
    level = bvars.gauge("work_level", "the level each machine was last set to")
    seconds = bvars.histogram("item_seconds", "time per item", buckets=(0.001, 0.01, 0.1, 1))
    driver_side = bvars.counter("driver_ticks", "updated on the driver itself")


    class Worker:
        def work(self, n, lvl):
            x = 0
            for i in range(200_000):  # a little CPU work
                x += i * i
            items.add(n)
            level.set(lvl)
            for _ in range(n // 10):
                seconds.observe(0.005)   # le=0.01
            seconds.observe(0.5)         # le=1
            print(f"worked {n} at level {lvl}", flush=True)
            return n

        def spin(self, secs):
            t = time.monotonic() + secs
            while time.monotonic() < t:
                pass
            return secs

        def fail(self):
            raise ValueError("on purpose")


    if __name__ == "__main__":
        here = os.path.dirname(os.path.abspath(__file__))
        b = bigmrun.start("local")
        with b:
            ms = b.start(2, services={"W": Worker()})
            for m in ms:
                m.wait(bigmrun.State.RUNNING, timeout=60)
                assert m.err is None, m.err
            # m0: one call of 100 items; m1: two calls of 100 items, and one failing call.
            ms[0].call("W.work", 100, 2.5)
            ms[1].call("W.work", 100, 1.0)
            ms[1].call("W.work", 100, 7.5)
            try:
                ms[1].call("W.fail")
            except bigmrun.RemoteError:
                pass
            driver_side.add(5)
            # Keep the machines busy for a while, differently, so the charts show it.
            busy = [ms[0].submit("W.spin", 3.0), ms[1].submit("W.spin", 1.5)]
            tmp = os.path.join(here, "ready.tmp")
            with open(tmp, "w") as f:
                json.dump({"session": b.session_id}, f)
            os.replace(tmp, os.path.join(here, "ready.json"))
            for f in busy:
                f.result(timeout=60)
            deadline = time.monotonic() + 240
            while not os.path.exists(os.path.join(here, "stop")):
                if time.monotonic() > deadline:
                    sys.exit("nobody stopped the test driver")
                time.sleep(0.1)
''')

# What the driver above did, per machine.
EXPECT_ITEMS = {"m0": 100.0, "m1": 200.0}
EXPECT_LEVEL = {"m0": 2.5, "m1": 7.5}
EXPECT_HIST_COUNT = {"m0": 11.0, "m1": 22.0}  # 10 x 0.005 + 1 x 0.5 per call
EXPECT_HIST_SUM = {"m0": 10 * 0.005 + 0.5, "m1": 2 * (10 * 0.005 + 0.5)}
EXPECT_WORK_CALLS = {"m0": 1.0, "m1": 2.0}


@dataclass
class Run:
    url: str
    token: str
    session: str
    dir: Path

    def get(self, path: str, **params: Any) -> requests.Response:
        return requests.get(self.url + path, params=params, timeout=10,
                            headers={"Authorization": f"Bearer {self.token}"})


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Run]:
    d = tmp_path_factory.mktemp("dashboard")
    script = d / "driver.py"
    script.write_text(DRIVER)
    state = d / "state"
    env = dict(os.environ)
    env.pop("BIGMRUN_SYSTEM", None)
    env.update(BIGMRUN_STATE_DIR=str(state), BIGMRUN_SAMPLE_INTERVAL="0.5",
               BIGMRUN_DEBUG_SERVER="1")
    log = open(d / "driver.log", "wb")  # noqa: SIM115  (closed in finally)
    proc = subprocess.Popen([sys.executable, str(script)], cwd=d, env=env, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    try:
        def ready() -> dict[str, Any] | None:
            if proc.poll() is not None:
                pytest.fail(f"driver exited {proc.returncode}:\n"
                            f"{(d / 'driver.log').read_text(errors='replace')}")
            p = d / "ready.json"
            return json.loads(p.read_text()) if p.exists() else None

        session = wait_until(ready, timeout=90, interval=0.1, what="the driver to be ready")
        sid = session["session"]
        info = json.loads((state / "sessions" / f"{sid}.json").read_text())
        r = Run(url=info["url"], token=info["token"], session=sid, dir=d)
        assert r.url.startswith("http://127.0.0.1:")

        # Wait (bounded) until the monitor has sampled the machines after their work.
        def sampled() -> bool:
            v = r.get("/debug/vars").json()
            return (v.get("work_items", {}).get("machines", {}).get("m0") == 100
                    and v["work_items"]["machines"].get("m1") == 200
                    and v.get("item_seconds", {}).get("count") == 33)

        wait_until(sampled, timeout=30, interval=0.2, what="samples after the machines' work")
        yield r
    finally:
        (d / "stop").touch()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
        log.close()


def families(text: str) -> dict[str, Any]:
    return {f.name: f for f in text_string_to_metric_families(text)}


def samples(fam: Any, name: str | None = None, **labels: str) -> list[Any]:
    return [s for s in fam.samples if (name is None or s.name == name)
            and all(s.labels.get(k) == v for k, v in labels.items())]


def one(fam: Any, name: str, **labels: str) -> float:
    found = samples(fam, name, **labels)
    assert len(found) == 1, (name, labels, fam.samples)
    return float(found[0].value)


def test_metrics_parse_with_machine_labels(run: Run) -> None:
    r = run.get("/metrics")
    assert r.status_code == 200
    assert r.headers["Content-Type"].startswith("text/plain")
    fams = families(r.text)

    # Cluster variables: one sample per machine, with the values the machines produced.
    items = fams["work_items"]
    assert items.type == "counter" and items.documentation == "items processed"
    for m, v in EXPECT_ITEMS.items():
        assert one(items, "work_items_total", machine=m) == v
    level = fams["work_level"]
    assert level.type == "gauge"
    for m, v in EXPECT_LEVEL.items():
        assert one(level, "work_level", machine=m) == v
    hist = fams["item_seconds"]
    assert hist.type == "histogram"
    for m in ("m0", "m1"):
        assert one(hist, "item_seconds_count", machine=m) == EXPECT_HIST_COUNT[m]
        assert one(hist, "item_seconds_sum", machine=m) == pytest.approx(EXPECT_HIST_SUM[m])
        buckets = {s.labels["le"]: s.value for s in samples(hist, "item_seconds_bucket",
                                                             machine=m)}
        calls = EXPECT_WORK_CALLS[m]
        assert buckets == {"0.001": 0.0, "0.01": 10 * calls, "0.1": 10 * calls,
                           "1.0": 11 * calls, "+Inf": 11 * calls}
    # The driver's own updates are labelled machine="driver".
    assert one(fams["driver_ticks"], "driver_ticks_total", machine="driver") == 5.0

    # RPC statistics per machine and method.
    calls = fams["bigmrun_rpc_calls"]
    assert calls.type == "counter"
    for m, n in EXPECT_WORK_CALLS.items():
        assert one(calls, "bigmrun_rpc_calls_total", machine=m, method="W.work") == n
        assert one(fams["bigmrun_rpc_errors"], "bigmrun_rpc_errors_total", machine=m,
                   method="W.work") == 0
        assert one(fams["bigmrun_rpc_bytes_in"], "bigmrun_rpc_bytes_in_total", machine=m,
                   method="W.work") > 0
        assert one(fams["bigmrun_rpc_bytes_out"], "bigmrun_rpc_bytes_out_total", machine=m,
                   method="W.work") > 0
        lat = fams["bigmrun_rpc_latency_seconds"]
        assert lat.type == "histogram"
        assert one(lat, "bigmrun_rpc_latency_seconds_count", machine=m, method="W.work") == n
        assert one(lat, "bigmrun_rpc_latency_seconds_bucket", machine=m, method="W.work",
                   le="+Inf") == n
        assert one(lat, "bigmrun_rpc_latency_seconds_sum", machine=m, method="W.work") > 0
        # The monitor's own sampling calls are there too.
        assert one(calls, "bigmrun_rpc_calls_total", machine=m, method="Supervisor.stats") > 0
    assert one(calls, "bigmrun_rpc_calls_total", machine="m1", method="W.fail") == 1
    assert one(fams["bigmrun_rpc_errors"], "bigmrun_rpc_errors_total", machine="m1",
               method="W.fail") == 1
    assert not samples(calls, machine="m0", method="W.fail")

    # Machine gauges, one per machine.
    for name in ("bigmrun_machine_cpu_percent", "bigmrun_machine_rss_bytes",
                 "bigmrun_machine_mem_percent", "bigmrun_machine_load1"):
        fam = fams[name]
        assert fam.type == "gauge"
        assert sorted(s.labels["machine"] for s in fam.samples) == ["m0", "m1"], name
    for m in ("m0", "m1"):
        assert one(fams["bigmrun_machine_rss_bytes"], "bigmrun_machine_rss_bytes",
                   machine=m) > 1e6
        assert 0 < one(fams["bigmrun_machine_mem_percent"], "bigmrun_machine_mem_percent",
                       machine=m) <= 100
        assert one(fams["bigmrun_machine_load1"], "bigmrun_machine_load1", machine=m) >= 0


def test_debug_vars_sums_match_machines(run: Run) -> None:
    v = run.get("/debug/vars").json()
    assert v["work_items"]["kind"] == "counter"
    assert v["work_items"]["machines"] == EXPECT_ITEMS
    assert v["work_level"]["kind"] == "gauge"
    assert v["work_level"]["machines"] == EXPECT_LEVEL
    for name in ("work_items", "work_level", "driver_ticks"):
        assert v[name]["sum"] == sum(v[name]["machines"].values()), name
    assert v["work_items"]["sum"] == 300
    assert v["driver_ticks"]["machines"] == {"driver": 5}
    h = v["item_seconds"]
    assert h["kind"] == "histogram" and h["buckets"] == [0.001, 0.01, 0.1, 1.0]
    per = h["machines"]
    assert set(per) == {"m0", "m1"}
    assert h["count"] == sum(x["count"] for x in per.values()) == 33
    assert h["sum"] == pytest.approx(sum(x["sum"] for x in per.values()))
    assert h["counts"] == [a + b for a, b in zip(per["m0"]["counts"], per["m1"]["counts"],
                                                  strict=True)]
    assert h["counts"] == [0, 30, 0, 3, 0]


@pytest.mark.parametrize("path", ["/", "/metrics", "/debug/vars", "/api/timeseries",
                                  "/api/machines"])
def test_token_is_required(run: Run, path: str) -> None:
    assert requests.get(run.url + path, timeout=10).status_code == 401
    wrong = {"Authorization": "Bearer " + "x" * len(run.token)}
    assert requests.get(run.url + path, headers=wrong, timeout=10).status_code == 401
    assert requests.get(run.url + path, params={"token": "nope"}, timeout=10).status_code == 401
    ok = requests.get(run.url + path, params={"token": run.token}, timeout=10)
    assert ok.status_code == 200


def test_dashboard_page_is_self_contained(run: Run) -> None:
    r = run.get("/")
    assert r.status_code == 200 and r.headers["Content-Type"].startswith("text/html")
    html = r.text
    # No external resources: nothing loaded from another origin, no separate files.
    for bad in ("http://", "https://", "<script src", "<link rel=\"stylesheet\"", "@import"):
        assert bad not in html, bad
    assert "default-src 'none'" in r.headers["Content-Security-Policy"]
    assert r.headers["Referrer-Policy"] == "no-referrer"  # the token stays in this page
    assert "/api/timeseries" in html and "/debug/profile?format=svg" in html


def test_sample_interval_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    from bigmrun.debug.monitor import DEFAULT_INTERVAL, sample_interval

    for raw, want in (("", DEFAULT_INTERVAL), ("junk", DEFAULT_INTERVAL), ("0.25", 0.25),
                      ("0", 0.0), ("-1", 0.0)):
        monkeypatch.setenv("BIGMRUN_SAMPLE_INTERVAL", raw)
        assert sample_interval() == want, raw


def test_sampling_off_makes_no_stats_calls(tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """``BIGMRUN_SAMPLE_INTERVAL=0``: the monitor never starts, the server still answers."""
    import bigmrun

    monkeypatch.setenv("BIGMRUN_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.setenv("BIGMRUN_SAMPLE_INTERVAL", "0")
    with bigmrun.start("test") as b:
        (m,) = b.start(1)
        m.wait(bigmrun.State.RUNNING, timeout=30)
        mon = b.debug.monitor
        assert not mon.enabled and mon._task is None
        run = Run(url=b.debug.url, token=b.debug.token, session=b.session_id, dir=tmp_path)
        assert run.get("/api/session").json()["sample_interval"] == 0
        assert run.get("/api/timeseries").json()["series"] == {}
        fams = families(run.get("/metrics").text)
        assert not fams["bigmrun_machine_cpu_percent"].samples  # nothing sampled
        assert one(fams["bigmrun_machine_calls_in_flight"], "bigmrun_machine_calls_in_flight",
                   machine=m.name) == 0
        # Our own call is the only one the machine has served.
        assert m.call("Supervisor.stats")["rpc"]["Supervisor.stats"]["calls"] == 1


def _browser(tmp: Path) -> Any:
    if not os.path.exists(CHROMIUM):
        pytest.skip(f"{CHROMIUM} is missing (apt-get install -y chromium chromium-driver)")
    if not os.path.exists(CHROMEDRIVER):
        pytest.skip(f"{CHROMEDRIVER} is missing (apt-get install -y chromium-driver)")
    webdriver = pytest.importorskip("selenium.webdriver",
                                    reason="selenium is not installed (pip install selenium)")
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for a in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
              "--no-first-run", "--disable-background-networking",
              "--disable-component-update", "--disable-sync", f"--user-data-dir={tmp}",
              "--window-size=1300,2300", "--hide-scrollbars"):
        opts.add_argument(a)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)


def test_dashboard_in_headless_chromium(run: Run, tmp_path: Path) -> None:
    from selenium.webdriver.support.ui import WebDriverWait

    browser = _browser(tmp_path / "chromium-profile")
    try:
        browser.set_page_load_timeout(30)
        browser.get(f"{run.url}/?token={run.token}")
        state = "return window.bigmrunDashboard"

        def charted(drv: Any) -> Any:
            st = drv.execute_script(state)
            if not st or st["refreshes"] < 2:
                return False
            c = st["charts"]
            need = ("cpu_percent", "rss", "var:work_items", "var:work_level")
            return all(c.get(k, {}).get(m, 0) > 0 for k in need for m in ("m0", "m1")) and st

        st = WebDriverWait(browser, 30, poll_frequency=0.2).until(charted)
        assert st["errors"] == []
        assert sorted(st["machines"]) == ["m0", "m1"]
        # A chart per metric, each with a line (points drawn) for both machines.
        for metric in ("cpu_percent", "rss", "mem_percent", "disk_used", "load1",
                       "net_sent_rate", "net_recv_rate", "var:work_items", "var:work_level",
                       "var:item_seconds:count", "var:item_seconds:mean"):
            per = st["charts"].get(metric, {})
            assert per.get("m0", 0) > 0 and per.get("m1", 0) > 0, (metric, per)
        # The drawn data is the real run's: the page's own series end at the known values.
        chart = browser.find_element("css selector", '[data-metric="var:work_items"]')
        assert chart.get_attribute("data-machines") == "m0 m1"
        assert int(chart.get_attribute("data-points")) >= 2
        legend = chart.find_element("css selector", ".legend").text
        assert "m0 100" in legend and "m1 200" in legend, legend

        # The machine table lists both machines, running, with links to logs and profile.
        rows = browser.execute_script(
            "return Array.from(document.querySelectorAll('#machines tbody tr[data-machine]'))"
            ".map(function (tr) { return [tr.getAttribute('data-machine'),"
            " tr.querySelector('.state').textContent,"
            " Array.from(tr.querySelectorAll('a')).map(function (a) {"
            "   return a.getAttribute('href'); })]; });")
        assert [r[0] for r in rows] == ["m0", "m1"]
        assert all(r[1] == "RUNNING" for r in rows), rows
        for name, _, links in rows:
            assert f"#logs={name}" in links
            assert any(h.startswith("/debug/profile?format=svg") and "token=" in h
                       for h in links), links

        # Machine output reaches the log view, all machines and then one.
        WebDriverWait(browser, 20, poll_frequency=0.2).until(
            lambda d: "worked 100 at level 7.5" in d.find_element("id", "log").text)
        browser.execute_script("location.hash = '#logs=m0'")
        WebDriverWait(browser, 20, poll_frequency=0.2).until(
            lambda d: "worked 100 at level 2.5" in d.find_element("id", "log").text
            and "level 7.5" not in d.find_element("id", "log").text)

        browser.execute_script("location.hash = ''; window.scrollTo(0, 0)")
        height = browser.execute_script("return document.documentElement.scrollHeight")
        browser.set_window_size(1300, min(int(height) + 10, 4000))
        shot = tmp_path / "dashboard.png"
        assert browser.save_screenshot(str(shot))
        assert shot.stat().st_size > 10_000
        dest = os.environ.get("BIGMRUN_DASHBOARD_SCREENSHOT")
        if dest:
            dest_path = Path(dest) if os.path.isabs(dest) else ROOT / dest
            dest_path.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(shot, dest_path)

        # A couple more refreshes (bounded), so errors of later rounds are caught too.
        seen = browser.execute_script(state)["refreshes"]
        WebDriverWait(browser, 20, poll_frequency=0.2).until(
            lambda d: d.execute_script(state)["refreshes"] >= seen + 2)
        severe = [str(e.get("message", "")).replace(run.token, "<token>")
                  for e in browser.get_log("browser") if e.get("level") == "SEVERE"]
        assert severe == []
        assert browser.execute_script(state)["errors"] == []
    finally:
        browser.quit()

