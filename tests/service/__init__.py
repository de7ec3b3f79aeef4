"""Tests of ollamad.service."""
