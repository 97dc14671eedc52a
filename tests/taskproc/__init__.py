"""Workflow (taskproc) tests."""
