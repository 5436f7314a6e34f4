#!/usr/bin/env python3
"""The gateway's page in a real headless browser (Debian's chromium and its driver,
selenium): load it, send a message, see the answer stream in, take a screenshot.

    python3 browser.py BASE_URL SCREENSHOT.png
"""
import sys

from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

base, shot = sys.argv[1], sys.argv[2]
opts = webdriver.ChromeOptions()
opts.binary_location = "/usr/bin/chromium"
for a in ["--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1000,700"]:
    opts.add_argument(a)
driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=opts)
try:
    driver.get(base + "/")
    wait = WebDriverWait(driver, 120)
    wait.until(lambda d: d.find_element(By.ID, "model").text.startswith("model "))
    print("loaded:", driver.find_element(By.ID, "model").text)
    box = driver.find_element(By.ID, "input")
    box.send_keys("Say hello.")
    driver.find_element(By.ID, "send").click()
    # the answer streams into the page: its text grows before it is done
    seen = set()

    def done(d):
        msgs = d.find_elements(By.CSS_SELECTOR, ".msg.assistant")
        if not msgs:
            return False
        seen.add(len(msgs[-1].find_element(By.CSS_SELECTOR, ".body").text))
        return msgs[-1].get_attribute("data-state") in ("done", "error")

    wait.until(done)
    answer = driver.find_elements(By.CSS_SELECTOR, ".msg.assistant")[-1]
    state = answer.get_attribute("data-state")
    meta = answer.find_element(By.CSS_SELECTOR, ".meta").text
    user = driver.find_elements(By.CSS_SELECTOR, ".msg.user")[-1].text
    print("state:", state, "| meta:", meta, "| lengths seen:", sorted(seen))
    driver.save_screenshot(shot)
    if state != "done" or "tokens/s" not in meta or user != "Say hello.":
        sys.exit(f"FAILED: state {state}, meta {meta!r}, user {user!r}")
    print("all checks passed")
finally:
    driver.quit()
