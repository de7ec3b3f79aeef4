"""Tests of ollamad.sched."""
