"""
The schema of tracker identity: migrations that follow those of
``commands_schema.py`` (``migrations.py`` appends them), in the same form.
"""

from __future__ import annotations

TRACKER_MIGRATIONS: tuple[tuple[int, str, str], ...] = (
    (
        20,
        "a device's IMEI, for trackers that identify by it",
        """
        -- Trackers (Teltonika, GT06) say who they are by IMEI and nothing else: gatewayctl device add --imei binds
        -- one to a registered device. One device an IMEI.
        ALTER TABLE devices ADD COLUMN imei text UNIQUE CHECK (imei ~ '^[0-9]{15}$');
        """,
    ),
)
