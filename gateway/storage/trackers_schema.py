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
    (
        21,
        "the address ranges a tracker may connect from",
        """
        -- gatewayctl device set NAME --allow 10.64.0.0/10: a tracker bound to the device is refused from
        -- anywhere else (an IMEI proves nothing; the carrier's APN range narrows who can claim it). NULL: any.
        ALTER TABLE devices ADD COLUMN allow cidr[] CHECK (cardinality(allow) BETWEEN 1 AND 64);
        """,
    ),
)
