"""Shared logic of the transfer-learning pipeline; the stages in stages/ are thin wrappers."""
