"""Runnable examples (`lethe demo`)."""
