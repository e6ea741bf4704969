"""Fixtures of the training tests."""

from tests.training.cuda_fake import fake_card  # noqa: F401 - a fixture for every test here
