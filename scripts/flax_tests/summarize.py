"""Counts per outcome in results/<config>/*.xml, then every test that did not pass."""

import collections
import glob
import sys
import xml.etree.ElementTree as ET

config = sys.argv[1]
rows = []
for path in sorted(glob.glob(f"results/{config}/*.xml")):
  for case in ET.parse(path).getroot().iter("testcase"):
    parts = case.get("classname").split(".")
    test_id = "/".join(parts[:-1]) + ".py::" + parts[-1] + "::" + case.get("name")
    outcome, message = "passed", ""
    for kind in ("failure", "error", "skipped"):
      element = case.find(kind)
      if element is not None:
        outcome = kind
        text = (element.get("message") or "").strip()
        message = text.splitlines()[0][:240] if text else ""
    rows.append((outcome, test_id, message))
print(config, "total", len(rows), dict(collections.Counter(r[0] for r in rows)))
for outcome, test_id, message in rows:
  if outcome != "passed":
    print(f"{outcome:8s} {test_id}\n         {message}")
