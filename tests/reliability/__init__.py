"""Reliability tests: crashes, provider outages and bad input at volume."""
