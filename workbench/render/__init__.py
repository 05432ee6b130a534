"""Turning events and reports into text: the headless display, report.md, charts."""
