"""
The schema of RabbitMQ sources, OPC UA servers, Sparkplug births and the devices heard on MQTT brokers:
migrations that follow those of
``trackers_schema.py`` (``migrations.py`` appends them), in the same form.
"""

from __future__ import annotations

AMQP_MIGRATIONS: tuple[tuple[int, str, str], ...] = (
    (
        22,
        "the state of RabbitMQ sources",
        """
        -- Each gateway writes the state of each of its [[amqp_source]] consumers here every few seconds
        -- (gatewayctl amqp status reads it): one row per gateway and source.
        CREATE TABLE amqp_sources (
            gateway     text NOT NULL,
            source      text NOT NULL,
            status      jsonb NOT NULL,
            updated_at  timestamptz NOT NULL,
            PRIMARY KEY (gateway, source)
        );
        """,
    ),
    (
        23,
        "the state of OPC UA servers",
        """
        -- Each gateway writes the state of each of its [[opcua]] sessions here every few seconds
        -- (gatewayctl opcua status reads it): one row per gateway and server.
        CREATE TABLE opcua_sources (
            gateway     text NOT NULL,
            source      text NOT NULL,
            status      jsonb NOT NULL,
            updated_at  timestamptz NOT NULL,
            PRIMARY KEY (gateway, source)
        );
        """,
    ),
    (
        24,
        "Sparkplug B births kept across restarts",
        """
        -- The last NBIRTH of each edge node, and DBIRTH of each of its devices (device '' for the node's own),
        -- as a Sparkplug host application received them: after a restart they name the aliases of the data
        -- the broker sends again.
        CREATE TABLE sparkplug_births (
            gateway     text NOT NULL,
            source      text NOT NULL,
            group_id    text NOT NULL,
            node        text NOT NULL,
            device      text NOT NULL,
            payload     bytea NOT NULL,
            updated_at  timestamptz NOT NULL,
            PRIMARY KEY (gateway, source, group_id, node, device)
        );
        """,
    ),
    (
        25,
        "the devices heard on each MQTT broker source",
        """
        -- A registered device heard from on an [[mqtt_source]] with a command-topic (or a Sparkplug device),
        -- and when it was last heard (written at most hourly): after a restart, commands go out to it on that
        -- broker at once, without waiting for it to publish first. Rows older than a week are not taken.
        CREATE TABLE broker_devices (
            gateway     text NOT NULL,
            source      text NOT NULL,
            device      text NOT NULL,
            heard_at    timestamptz NOT NULL,
            PRIMARY KEY (gateway, source, device)
        );
        """,
    ),
)
