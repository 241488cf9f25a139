"""Masking secrets for display: secret-looking keys, and credentials inside values."""

from __future__ import annotations

import pytest

from tasks import mask_secrets
from tasks.secrets import mask_text


@pytest.mark.parametrize(
    ("text", "masked"),
    [
        ("postgres://user:pw@host/db", "postgres://user:***@host/db"),
        ("redis://:s3cret@cache:6379/0", "redis://:***@cache:6379/0"),
        (
            "https://api.example.com/v1?token=abc&page=2",
            "https://api.example.com/v1?token=***&page=2",
        ),
        ("PGPASSWORD=hunter2 psql -h db", "PGPASSWORD=*** psql -h db"),
        ("sync --api-key=k123 --verbose", "sync --api-key=*** --verbose"),
        ("https://user@host/path", "https://user@host/path"),
        ("mail me@example.com; retries=3", "mail me@example.com; retries=3"),
        ("./sync.sh --dry-run", "./sync.sh --dry-run"),
    ],
)
def test_credentials_inside_values_are_masked(text: str, masked: str) -> None:
    assert mask_text(text) == masked


def test_mask_secrets_masks_keys_and_values_at_any_depth() -> None:
    kwargs = {
        "password": "hunter2",
        "dsn": "postgres://app:pw@db/prod",
        "env": {"DATABASE_URL": "mysql://root:toor@localhost/x", "HOME": "/root"},
        "args": ["--token=abc", "plain"],
        "retries": 3,
    }
    assert mask_secrets(kwargs) == {
        "password": "***",
        "dsn": "postgres://app:***@db/prod",
        "env": {"DATABASE_URL": "mysql://root:***@localhost/x", "HOME": "/root"},
        "args": ["--token=***", "plain"],
        "retries": 3,
    }
