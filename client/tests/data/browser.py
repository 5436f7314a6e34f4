#!/usr/bin/env python3
"""The gateway's page in a real headless browser (Debian's chromium and its driver,
selenium): load it, see the network view, send a message, see the answer stream in with its
route, stop a long answer with the Stop button, take a screenshot.

    python3 browser.py BASE_URL SCREENSHOT.png STAGES
"""
import json
import sys
import time
import urllib.request

from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

base, shot, stages = sys.argv[1], sys.argv[2], int(sys.argv[3])
failures = []


def check(ok, what):
    print(("ok: " if ok else "FAILED: ") + what)
    if not ok:
        failures.append(what)


opts = webdriver.ChromeOptions()
opts.binary_location = "/usr/bin/chromium"
for a in ["--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1200,760"]:
    opts.add_argument(a)
driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=opts)
try:
    driver.get(base + "/")
    wait = WebDriverWait(driver, 120, poll_frequency=0.05)
    wait.until(lambda d: d.find_element(By.ID, "model").text.startswith("model "))
    print("loaded:", driver.find_element(By.ID, "model").text)

    # the network view lists every stage with where it runs
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#stages .stage")) == stages)
    summary = driver.find_element(By.ID, "net-summary").text
    replicas = driver.find_elements(By.CSS_SELECTOR, "#stages .replica")
    print("network:", summary, "|", [r.text.replace("\n", " ") for r in replicas])
    check(len(replicas) >= stages, f"{len(replicas)} replicas for {stages} stages")

    def last_answer(d):
        msgs = d.find_elements(By.CSS_SELECTOR, ".msg.assistant")
        return msgs[-1] if msgs else None

    def ask(text):
        box = driver.find_element(By.ID, "input")
        box.send_keys(text)
        driver.find_element(By.ID, "send").click()

    # a short answer streams in: its text grows before it is done
    ask("Say hello.")
    seen = set()

    def done(d):
        a = last_answer(d)
        if a is None:
            return False
        seen.add(len(a.find_element(By.CSS_SELECTOR, ".body").text))
        return a.get_attribute("data-state") in ("done", "error", "stopped")

    wait.until(done)
    answer = last_answer(driver)
    state = answer.get_attribute("data-state")
    meta = answer.find_element(By.CSS_SELECTOR, ".meta").text
    user = driver.find_elements(By.CSS_SELECTOR, ".msg.user")[-1].text
    print("state:", state, "| meta:", meta, "| lengths seen:", sorted(seen))
    check(state == "done", f"the answer finished (state {state})")
    check("tokens/s" in meta, f"speed under the answer: {meta!r}")
    check(user == "Say hello.", f"the user's message shown: {user!r}")
    routes = answer.find_elements(By.CSS_SELECTOR, ".route")
    route = json.loads(routes[0].get_attribute("data-route")) if routes else []
    check(len(route) == stages, f"the answer's route has one entry per stage: {route}")

    # a long answer, stopped with the Stop button once its text starts to arrive
    ask("Write a long story about a dragon who learns to fly. Make it at least 800 words.")
    wait.until(lambda d: last_answer(d) is not None
               and last_answer(d).get_attribute("data-state") == "streaming"
               and last_answer(d).find_element(By.CSS_SELECTOR, ".body").text.strip())
    driver.find_element(By.ID, "stop").click()
    wait.until(lambda d: last_answer(d).get_attribute("data-state") != "streaming")
    stopped = last_answer(driver)
    state = stopped.get_attribute("data-state")
    length = len(stopped.find_element(By.CSS_SELECTOR, ".body").text)
    print("after Stop:", state, "|", length, "characters kept")
    check(state == "stopped", f"the Stop button ended the answer (state {state})")
    check(driver.find_element(By.ID, "send").is_enabled(), "Send is enabled again")
    check(not driver.find_element(By.ID, "stop").is_enabled(), "Stop is disabled again")

    # the gateway noticed: its worker let go of the request
    deadline = time.time() + 30
    processing = None
    while time.time() < deadline:
        metrics = urllib.request.urlopen(base + "/metrics").read().decode()
        processing = [l for l in metrics.splitlines() if l.startswith("veil_requests_processing ")]
        if processing == ["veil_requests_processing 0"]:
            break
        time.sleep(0.1)
    check(processing == ["veil_requests_processing 0"], f"no request left in flight: {processing}")

    driver.save_screenshot(shot)
    if failures:
        sys.exit("FAILED: " + "; ".join(failures))
    print("all checks passed")
finally:
    driver.quit()
