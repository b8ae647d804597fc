"""Scheduling and KV-block bookkeeping: pure Python, no torch, so it tests in milliseconds."""
