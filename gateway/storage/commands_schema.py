"""
The schema of commands and desired configuration: migrations that follow
those of ``migrations.py`` (which appends them), in the same form.
"""

from __future__ import annotations

COMMAND_MIGRATIONS: tuple[tuple[int, str, str], ...] = (
    (
        19,
        "the command ledger, desired and reported configuration, the operator role",
        """
        CREATE TABLE commands (
            id          text PRIMARY KEY CHECK (id ~ '^[A-Za-z0-9_.:-]{1,64}$'),
            device_id   integer NOT NULL,
            name        text NOT NULL CHECK (name ~ '^[A-Za-z0-9_.:/-]{1,64}$'),
            params      jsonb NOT NULL DEFAULT '{}',
            sender      text NOT NULL,
            created_at  timestamptz NOT NULL DEFAULT now(),
            expires_at  timestamptz NOT NULL,
            state       text NOT NULL DEFAULT 'queued' CHECK (
                            state IN ('queued', 'sent', 'delivered', 'succeeded', 'failed', 'expired', 'canceled')),
            changed_at  timestamptz NOT NULL DEFAULT now(),
            attempts    integer NOT NULL DEFAULT 0,
            sent_at     timestamptz,
            gateway     text,  -- the gateway that sent it last
            transport   text,  -- over which of its transports
            result      jsonb,  -- the device's, when it reported one
            note        text  -- why the last change: who canceled it, what a transport said
        );
        -- What a device is waiting for, and what retention deletes.
        CREATE INDEX commands_waiting ON commands (device_id, created_at)
            WHERE state IN ('queued', 'sent', 'delivered');
        CREATE INDEX commands_finished ON commands (changed_at)
            WHERE state IN ('succeeded', 'failed', 'expired', 'canceled');
        CREATE INDEX commands_of_device ON commands (device_id, created_at DESC);
        CREATE TABLE command_events (
            command_id  text NOT NULL REFERENCES commands (id) ON DELETE CASCADE,
            at          timestamptz NOT NULL DEFAULT clock_timestamp(),
            state       text NOT NULL,
            attempt     integer NOT NULL,
            gateway     text,
            transport   text,
            note        text
        );
        CREATE INDEX command_events_of_command ON command_events (command_id, at);
        -- Every change of state (and every send) is recorded with its time, whoever makes it, and told to every
        -- gateway (NOTIFY is sent when the transaction commits): '<state> <device> <id>'.
        CREATE FUNCTION command_changed() RETURNS trigger LANGUAGE plpgsql AS $f$
        BEGIN
            IF TG_OP = 'UPDATE' AND NEW.state = OLD.state AND NEW.attempts = OLD.attempts THEN
                RETURN NULL;
            END IF;
            INSERT INTO command_events (command_id, state, attempt, gateway, transport, note)
            VALUES (NEW.id, NEW.state, NEW.attempts, NEW.gateway, NEW.transport, NEW.note);
            IF TG_OP = 'INSERT' OR NEW.state <> OLD.state THEN
                PERFORM pg_notify('gateway_commands',
                    NEW.state || ' ' || (SELECT d.name FROM devices d WHERE d.id = NEW.device_id) || ' ' || NEW.id);
            END IF;
            RETURN NULL;
        END $f$;
        CREATE TRIGGER command_changed AFTER INSERT OR UPDATE ON commands
            FOR EACH ROW EXECUTE FUNCTION command_changed();

        -- The twin's other half: what people want a device's configuration to be (a version each change),
        -- and what the device last said it is.
        CREATE TABLE twin_desired (
            device_id   integer PRIMARY KEY,
            doc         jsonb NOT NULL,
            version     bigint NOT NULL,
            updated_at  timestamptz NOT NULL DEFAULT now(),
            updated_by  text NOT NULL
        );
        CREATE TABLE twin_reported (
            device_id   integer PRIMARY KEY,
            doc         jsonb NOT NULL,
            updated_at  timestamptz NOT NULL DEFAULT now()
        );
        -- An MQTT session kept (clean start 0) keeps its subscription to its command topic.
        ALTER TABLE mqtt_sessions ADD COLUMN commands boolean NOT NULL DEFAULT false;

        -- operator: may send commands and set desired configuration, besides reading.
        ALTER TABLE api_tokens DROP CONSTRAINT api_tokens_role_check,
            ADD CONSTRAINT api_tokens_role_check CHECK (role IN ('reader', 'operator', 'admin'));
        ALTER TABLE ui_sessions DROP CONSTRAINT ui_sessions_role_check,
            ADD CONSTRAINT ui_sessions_role_check CHECK (role IN ('reader', 'operator', 'admin'));
        """,
    ),
)
