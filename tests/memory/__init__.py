"""Tests of ollamad.memory."""
