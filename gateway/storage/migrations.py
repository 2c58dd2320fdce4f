"""
The schema's migrations, oldest first: (version, description, SQL). Each runs once,
in the transaction schema.migrate opens; a released migration is never edited,
only followed by a new one.
"""

from __future__ import annotations

from gateway.storage.commands_schema import COMMAND_MIGRATIONS
from gateway.storage.trackers_schema import TRACKER_MIGRATIONS
from gateway.storage.amqp_schema import AMQP_MIGRATIONS


def _day_partitions(table: str, rows_of: str) -> str:
    """SQL making a partition of ``table`` (``<table>_YYYYMMDD``) for each UTC day a row of ``rows_of`` falls on."""
    return f"""
        DO $$
        DECLARE day date;
        BEGIN
            FOR day IN SELECT DISTINCT (ts AT TIME ZONE 'UTC')::date FROM {rows_of} LOOP
                EXECUTE format(
                    'CREATE TABLE %I PARTITION OF {table} FOR VALUES FROM (%L) TO (%L)',
                    '{table}_' || to_char(day, 'YYYYMMDD'),
                    day::timestamp AT TIME ZONE 'UTC',
                    (day + 1)::timestamp AT TIME ZONE 'UTC'
                );
            END LOOP;
        END $$;
"""


# Readings carry no foreign key to devices: devices are revoked, never
# deleted, and a foreign key would take a KEY SHARE row lock on the device
# for every inserted reading, serialising concurrent batches of one device.
MIGRATIONS: tuple[tuple[int, str, str], ...] = (
    (
        1,
        "devices, readings, rejected input",
        """
        CREATE TABLE devices (
            id          serial PRIMARY KEY,
            name        text NOT NULL UNIQUE CHECK (name ~ '^[A-Za-z0-9_.:-]{1,64}$'),
            token_id    text NOT NULL UNIQUE,
            token_hash  bytea NOT NULL,
            created_at  timestamptz NOT NULL DEFAULT now(),
            revoked_at  timestamptz,
            last_seen   timestamptz
        );
        CREATE TABLE readings (
            id          bigserial PRIMARY KEY,
            device_id   integer NOT NULL,
            metric      text NOT NULL,
            ts          timestamptz NOT NULL,
            value       double precision NOT NULL,
            received_at timestamptz NOT NULL DEFAULT now(),
            CONSTRAINT readings_natural_key UNIQUE (device_id, metric, ts)
        );
        CREATE TABLE rejected_input (
            id          bigserial PRIMARY KEY,
            received_at timestamptz NOT NULL DEFAULT now(),
            source      text NOT NULL,
            device      text,
            reason      text NOT NULL,
            raw         bytea NOT NULL
        );
        CREATE INDEX rejected_input_received_at ON rejected_input (received_at);
        """,
    ),
    (
        2,
        "upload order, sinks, batches",
        """
        -- The transaction that stored a reading. Every transaction below the
        -- oldest one still running has ended, so readings ordered by
        -- (tx, id) below that horizon form a prefix that can no longer grow:
        -- the uploader reads in that order and never skips a reading whose
        -- transaction committed late.
        ALTER TABLE readings ADD COLUMN tx xid8 NOT NULL DEFAULT '1';
        ALTER TABLE readings ALTER COLUMN tx SET DEFAULT pg_current_xact_id();
        CREATE INDEX readings_upload_order ON readings (tx, id);
        CREATE TABLE upload_sinks (
            name          text PRIMARY KEY,
            url           text NOT NULL,
            cursor_tx     xid8 NOT NULL DEFAULT '0',
            cursor_id     bigint NOT NULL DEFAULT 0,
            created_at    timestamptz NOT NULL DEFAULT now(),
            batches_sent  bigint NOT NULL DEFAULT 0,
            readings_sent bigint NOT NULL DEFAULT 0,
            failures      bigint NOT NULL DEFAULT 0,
            last_sent_at  timestamptz,
            last_error    text,
            last_error_at timestamptz
        );
        CREATE TABLE upload_batches (
            id          bigserial PRIMARY KEY,
            sink        text NOT NULL REFERENCES upload_sinks (name) ON DELETE CASCADE,
            key         uuid NOT NULL UNIQUE,
            after_tx    xid8 NOT NULL,
            after_id    bigint NOT NULL,
            last_tx     xid8 NOT NULL,
            last_id     bigint NOT NULL,
            readings    integer NOT NULL,
            payload     bytea,
            state       text NOT NULL DEFAULT 'pending' CHECK (state IN ('pending', 'parked')),
            owner       text,
            lease_until timestamptz NOT NULL DEFAULT now(),
            attempts    integer NOT NULL DEFAULT 0,
            status      integer,
            response    text,
            created_at  timestamptz NOT NULL DEFAULT now(),
            parked_at   timestamptz
        );
        CREATE INDEX upload_batches_sink ON upload_batches (sink, state, id);
        CREATE TABLE upload_deadband (
            sink      text NOT NULL REFERENCES upload_sinks (name) ON DELETE CASCADE,
            device_id integer NOT NULL,
            metric    text NOT NULL,
            value     double precision NOT NULL,
            ts        timestamptz NOT NULL,
            PRIMARY KEY (sink, device_id, metric)
        );
        """,
    ),
    (
        3,
        "where devices were last heard from; rejected input by device",
        """
        -- 'tgp+tls 10.0.0.5:40112': the transport and address of the device's last stored reading.
        ALTER TABLE devices ADD COLUMN last_source text;
        CREATE INDEX rejected_input_device ON rejected_input (device, received_at);
        """,
    ),
    (
        4,
        "digital twin, device types, API tokens, quarantine, alerts",
        """
        -- The latest value of each (device, metric), written in the readings' own transaction.
        CREATE TABLE twin (
            device_id   integer NOT NULL,
            metric      text NOT NULL,
            ts          timestamptz NOT NULL,
            value       double precision NOT NULL,
            updated_at  timestamptz NOT NULL DEFAULT now(),
            PRIMARY KEY (device_id, metric)
        );
        INSERT INTO twin (device_id, metric, ts, value)
        SELECT DISTINCT ON (device_id, metric) device_id, metric, ts, value
        FROM readings ORDER BY device_id, metric, ts DESC, id;
        -- A device's readings in time order, for the read API.
        CREATE INDEX readings_device_time ON readings (device_id, ts);
        -- The [device_types.NAME] mapping its JSON is read with; the silence limit of this device alone.
        ALTER TABLE devices ADD COLUMN device_type text CHECK (device_type ~ '^[A-Za-z0-9_.:-]{1,64}$');
        ALTER TABLE devices ADD COLUMN expected_interval double precision CHECK (expected_interval > 0);
        CREATE TABLE api_tokens (
            id          serial PRIMARY KEY,
            name        text NOT NULL UNIQUE CHECK (name ~ '^[A-Za-z0-9_.:-]{1,64}$'),
            role        text NOT NULL CHECK (role IN ('reader', 'admin')),
            token_id    text NOT NULL UNIQUE,
            token_hash  bytea NOT NULL,
            created_at  timestamptz NOT NULL DEFAULT now(),
            revoked_at  timestamptz,
            last_used   timestamptz
        );
        -- Readings that failed a quality rule: kept, not stored as readings, not uploaded.
        CREATE TABLE quarantine (
            id          bigserial PRIMARY KEY,
            device_id   integer NOT NULL,
            metric      text NOT NULL,
            ts          timestamptz NOT NULL,
            value       double precision NOT NULL,
            rule        text NOT NULL,
            source      text NOT NULL,
            received_at timestamptz NOT NULL DEFAULT now(),
            CONSTRAINT quarantine_natural_key UNIQUE (device_id, metric, ts)
        );
        CREATE INDEX quarantine_device_time ON quarantine (device_id, received_at);
        CREATE TABLE alerts (
            id          bigserial PRIMARY KEY,
            rule        text NOT NULL,
            device_id   integer NOT NULL,
            metric      text NOT NULL,
            message     text NOT NULL,
            fired_at    timestamptz NOT NULL DEFAULT now(),
            fired_ts    timestamptz NOT NULL,
            fired_value double precision NOT NULL,
            cleared_at  timestamptz,
            cleared_ts  timestamptz,
            cleared_value double precision
        );
        -- One open alert per rule and device, whichever gateway saw the reading.
        CREATE UNIQUE INDEX alerts_open ON alerts (rule, device_id) WHERE cleared_at IS NULL;
        CREATE INDEX alerts_fired_at ON alerts (fired_at);
        -- Webhook notices, sent at least once each, in order, with the uploader's retry policy.
        CREATE TABLE alert_notices (
            id          bigserial PRIMARY KEY,
            key         uuid NOT NULL UNIQUE DEFAULT gen_random_uuid(),
            alert_id    bigint NOT NULL REFERENCES alerts (id) ON DELETE CASCADE,
            event       text NOT NULL CHECK (event IN ('fired', 'cleared')),
            created_at  timestamptz NOT NULL DEFAULT now(),
            attempts    integer NOT NULL DEFAULT 0,
            due_at      timestamptz NOT NULL DEFAULT now(),
            sent_at     timestamptz,
            parked_at   timestamptz,
            last_error  text
        );
        CREATE INDEX alert_notices_due ON alert_notices (due_at, id) WHERE sent_at IS NULL AND parked_at IS NULL;
        """,
    ),
    (
        5,
        "conflicting readings",
        """
        -- A reading whose (device, metric, ts) was stored with another value: the first value stays
        -- in readings; each other value sent is kept here once, for an administrator to look at.
        CREATE TABLE conflicts (
            id            bigserial PRIMARY KEY,
            device_id     integer NOT NULL,
            metric        text NOT NULL,
            ts            timestamptz NOT NULL,
            stored_value  double precision NOT NULL,
            sent_value    double precision NOT NULL,
            source        text NOT NULL,
            received_at   timestamptz NOT NULL DEFAULT now(),
            CONSTRAINT conflicts_once UNIQUE (device_id, metric, ts, sent_value)
        );
        CREATE INDEX conflicts_device ON conflicts (device_id, id);
        """,
    ),
    (
        6,
        "the state of MQTT broker sources",
        """
        -- Each gateway writes the state of each of its [[mqtt_source]] subscriptions here every few
        -- seconds (gatewayctl mqtt status reads it): one row per gateway and source.
        CREATE TABLE mqtt_sources (
            gateway     text NOT NULL,
            source      text NOT NULL,
            status      jsonb NOT NULL,
            updated_at  timestamptz NOT NULL,
            PRIMARY KEY (gateway, source)
        );
        """,
    ),
    (
        7,
        "the state of polled Modbus devices",
        """
        -- Each gateway writes the state of each [[modbus]] device it polls here every few seconds
        -- (gatewayctl modbus status reads it): one row per gateway and device.
        CREATE TABLE modbus_devices (
            gateway     text NOT NULL,
            device      text NOT NULL,
            status      jsonb NOT NULL,
            updated_at  timestamptz NOT NULL,
            PRIMARY KEY (gateway, device)
        );
        """,
    ),
    (
        8,
        "readings in time partitions",
        """
        -- Readings range-partitioned by ts (the gateway keeps partitions ahead of time; a reading outside
        -- them lands in readings_default and is moved out later), so retention drops a whole partition
        -- instead of deleting rows. The primary key on id goes: (tx, id) orders the upload and the
        -- natural key, which leads with the device and holds ts, keeps each reading once. Columns of
        -- 8 bytes first, so no row carries alignment padding.
        ALTER TABLE readings RENAME TO readings_v7;
        ALTER TABLE readings_v7 RENAME CONSTRAINT readings_pkey TO readings_v7_pkey;
        ALTER TABLE readings_v7 RENAME CONSTRAINT readings_natural_key TO readings_v7_natural_key;
        ALTER INDEX readings_upload_order RENAME TO readings_v7_upload_order;
        ALTER INDEX readings_device_time RENAME TO readings_v7_device_time;
        CREATE TABLE readings (
            tx          xid8 NOT NULL DEFAULT pg_current_xact_id(),
            id          bigint NOT NULL,
            ts          timestamptz NOT NULL,
            value       double precision NOT NULL,
            received_at timestamptz NOT NULL DEFAULT now(),
            device_id   integer NOT NULL,
            metric      text NOT NULL,
            CONSTRAINT readings_natural_key UNIQUE (device_id, metric, ts)
        ) PARTITION BY RANGE (ts);
        ALTER SEQUENCE readings_id_seq OWNED BY readings.id;
        ALTER TABLE readings ALTER COLUMN id SET DEFAULT nextval('readings_id_seq');
        CREATE INDEX readings_upload_order ON readings (tx, id);
        -- A device's readings in time order, for the read API (small: btree deduplication folds the
        -- metrics of one instant into one entry).
        CREATE INDEX readings_device_time ON readings (device_id, ts);
        CREATE TABLE readings_default PARTITION OF readings DEFAULT;
        -- The rows already stored: a partition for each UTC day they fall on.
        """
        + _day_partitions("readings", "readings_v7")
        + """
        INSERT INTO readings (tx, id, ts, value, received_at, device_id, metric)
        SELECT tx, id, ts, value, received_at, device_id, metric FROM readings_v7;
        DROP TABLE readings_v7;
        """,
    ),
    (
        9,
        "dashboard sessions, readings per device per day",
        """
        -- Counted by the writers with last_seen (a few seconds late), so the fleet page shows readings today
        -- without counting rows.
        ALTER TABLE devices ADD COLUMN readings_day date;
        ALTER TABLE devices ADD COLUMN readings_today bigint NOT NULL DEFAULT 0;
        -- A dashboard sign-in: the browser holds id.secret in an HttpOnly cookie; only a hash of the secret
        -- is stored. A session ends when it expires, is revoked, or the API token it came from is revoked.
        CREATE TABLE ui_sessions (
            id          text PRIMARY KEY,
            secret_hash bytea NOT NULL,
            csrf        text NOT NULL,
            role        text NOT NULL CHECK (role IN ('reader', 'admin')),
            token_id    integer REFERENCES api_tokens (id),
            subject     text NOT NULL,
            address     text,
            created_at  timestamptz NOT NULL DEFAULT now(),
            expires_at  timestamptz NOT NULL,
            last_used   timestamptz NOT NULL DEFAULT now(),
            revoked_at  timestamptz
        );
        CREATE INDEX ui_sessions_expires_at ON ui_sessions (expires_at);
        """,
    ),
    (
        10,
        "the cold tier",
        """
        -- Old readings, one row per device, metric and hour: times as microseconds into the hour less 2^31
        -- (an hour fits an integer), values beside them, both sorted by time (gateway/storage/cold.py).
        CREATE TABLE readings_cold (
            device_id   integer NOT NULL,
            metric      text NOT NULL,
            hour        timestamptz NOT NULL,
            received_at timestamptz NOT NULL,
            folded_at   timestamptz NOT NULL DEFAULT now(),
            readings    integer NOT NULL,
            offsets     integer[] NOT NULL,
            vals        double precision[] NOT NULL,
            PRIMARY KEY (device_id, metric, hour),
            CHECK (cardinality(offsets) = readings AND cardinality(vals) = readings)
        ) WITH (toast_tuple_target = 128);
        -- The time ranges folded; the cold tier holds no reading at or after the end of the newest.
        CREATE TABLE readings_cold_ranges (
            lo timestamptz PRIMARY KEY,
            hi timestamptz NOT NULL
        );
        -- Two hours' arrays merged: sorted by time, the first value of a time kept (o1's over o2's).
        CREATE FUNCTION readings_cold_merge(o1 integer[], v1 double precision[], o2 integer[],
                                            v2 double precision[], OUT offsets integer[],
                                            OUT vals double precision[])
        LANGUAGE sql IMMUTABLE AS $f$
            SELECT array_agg(o ORDER BY o), array_agg(v ORDER BY o) FROM (
                SELECT DISTINCT ON (o) o, v FROM (
                    SELECT o, v, 0 AS p FROM unnest(o1, v1) AS a(o, v)
                    UNION ALL SELECT o, v, 1 FROM unnest(o2, v2) AS b(o, v)
                ) u ORDER BY o, p
            ) m
        $f$;
        -- lz4 where the server was built with it (faster than pglz at the same size); pglz otherwise.
        DO $$ BEGIN
            ALTER TABLE readings_cold ALTER COLUMN offsets SET COMPRESSION lz4;
            ALTER TABLE readings_cold ALTER COLUMN vals SET COMPRESSION lz4;
        EXCEPTION WHEN OTHERS THEN NULL;
        END $$;
        """,
    ),
    (
        11,
        "quarantine in time partitions",
        """
        -- Quarantined readings range-partitioned by ts like readings (the same partitions are made ahead for
        -- both; quarantine_default takes the rest and is emptied later), so retention drops them whole. id
        -- stays each row's handle (release, pages); it comes from the sequence, so an index, not a key.
        ALTER TABLE quarantine RENAME TO quarantine_v10;
        ALTER TABLE quarantine_v10 RENAME CONSTRAINT quarantine_pkey TO quarantine_v10_pkey;
        ALTER TABLE quarantine_v10 RENAME CONSTRAINT quarantine_natural_key TO quarantine_v10_natural_key;
        ALTER INDEX quarantine_device_time RENAME TO quarantine_v10_device_time;
        CREATE TABLE quarantine (
            id          bigint NOT NULL,
            ts          timestamptz NOT NULL,
            value       double precision NOT NULL,
            received_at timestamptz NOT NULL DEFAULT now(),
            device_id   integer NOT NULL,
            metric      text NOT NULL,
            rule        text NOT NULL,
            source      text NOT NULL,
            CONSTRAINT quarantine_natural_key UNIQUE (device_id, metric, ts)
        ) PARTITION BY RANGE (ts);
        ALTER SEQUENCE quarantine_id_seq OWNED BY quarantine.id;
        ALTER TABLE quarantine ALTER COLUMN id SET DEFAULT nextval('quarantine_id_seq');
        CREATE INDEX quarantine_id ON quarantine (id);
        CREATE INDEX quarantine_device_time ON quarantine (device_id, received_at);
        CREATE TABLE quarantine_default PARTITION OF quarantine DEFAULT;
        -- The rows already held: a partition for each UTC day they fall on.
        """
        + _day_partitions("quarantine", "quarantine_v10")
        + """
        INSERT INTO quarantine (id, ts, value, received_at, device_id, metric, rule, source)
        SELECT id, ts, value, received_at, device_id, metric, rule, source FROM quarantine_v10;
        DROP TABLE quarantine_v10;
        """,
    ),
    (
        12,
        "upload order indexed by transaction alone",
        """
        -- The upload order is still (tx, id), but the index holds tx alone. Every reading of a transaction
        -- shares its tx, so btree deduplication keeps one key and a list of row addresses per transaction:
        -- about 7 bytes a reading instead of 32. A scan from a cursor reads the cursor's transaction (one
        -- group commit, at most a few thousand readings) and sorts it by id, then goes on in index order.
        DROP INDEX readings_upload_order;
        CREATE INDEX readings_upload_order ON readings (tx);
        """,
    ),
    (
        13,
        "packed partitions",
        """
        -- Partitions of readings whose indexes were rebuilt full once their range closed (--pack-after),
        -- by their start, with the indexes' bytes before and after.
        CREATE TABLE readings_packed (
            lo           timestamptz PRIMARY KEY,
            packed_at    timestamptz NOT NULL DEFAULT now(),
            bytes_before bigint NOT NULL,
            bytes_after  bigint NOT NULL
        );
        """,
    ),
    (
        14,
        "no device-and-time index on readings",
        """
        -- A device's readings in time order (the read API) are read from the natural key, one metric at a
        -- time (the twin lists a device's metrics), and merged: the index on (device_id, ts) cost every
        -- reading 17 bytes on disk and one more index entry to write.
        DROP INDEX readings_device_time;
        """,
    ),
    (
        15,
        "a metric dictionary",
        """
        -- Each metric's name once, in a dictionary: a reading holds its metric's id, 4 bytes, where its name
        -- cost a byte and its length, padding to 8 in the row and to 8 again in the natural key: about 39 bytes
        -- a reading on disk. Gateways add names as they first meet them. Twin, quarantine, conflicts and the
        -- cold tier keep names: they hold a row per series or per hour, not per reading.
        CREATE TABLE metrics (
            id   integer GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
            name text NOT NULL UNIQUE
        );
        -- A metric's id, its name added first when new: for SQL written by hand (the gateway adds a batch's
        -- new names in one statement and maps names to ids in the batch statement).
        CREATE FUNCTION metric_id_of(metric text) RETURNS integer LANGUAGE plpgsql AS $f$
        DECLARE found integer;
        BEGIN
            SELECT m.id INTO found FROM metrics m WHERE m.name = metric;
            IF found IS NULL THEN
                INSERT INTO metrics (name) VALUES (metric) ON CONFLICT (name) DO NOTHING RETURNING id INTO found;
            END IF;
            IF found IS NULL THEN  -- added meanwhile by another session, now committed
                SELECT m.id INTO found FROM metrics m WHERE m.name = metric;
            END IF;
            RETURN found;
        END $f$;
        INSERT INTO metrics (name) SELECT DISTINCT metric FROM readings ORDER BY metric;
        -- Rewrites every partition with its indexes built anew (so packed). Each row's id is looked up in the
        -- dictionary as one constant (jsonb: a binary search), not by a call per row.
        DO $$ BEGIN
            EXECUTE format(
                'ALTER TABLE readings ALTER COLUMN metric TYPE integer USING (%L::jsonb ->> metric)::integer',
                (SELECT coalesce(jsonb_object_agg(name, id), '{}') FROM metrics)
            );
        END $$;
        ALTER TABLE readings RENAME COLUMN metric TO metric_id;
        """,
    ),
    (
        16,
        "a reading's arrival once per transaction; upload order by transaction and natural key",
        """
        -- A reading's row keeps what is its own: device, metric, time, value, and the transaction that stored
        -- it. Its arrival time is the same for every reading of a transaction (now(), its start), so it is
        -- kept once per transaction in readings_arrivals, with the count of readings stored, by a statement
        -- trigger on readings that every writer passes through. The upload order, once (tx, id), is now
        -- (tx, device_id, metric_id, ts): the natural key is unique, so the bigserial id goes. And tx becomes
        -- a bigint (the same 64-bit number as xid8) indexed by BRIN, a few bytes per thousands of readings,
        -- with a btree entry a reading only while a partition fills. The uploader walks readings_arrivals to
        -- find how far a batch reaches, then reads those transactions' readings by tx. 16 bytes a reading
        -- less while a partition fills, 23 once it is packed.
        CREATE TABLE readings_arrivals (
            tx          bigint PRIMARY KEY,
            received_at timestamptz NOT NULL DEFAULT now(),
            readings    bigint NOT NULL
        );
        INSERT INTO readings_arrivals (tx, received_at, readings)
        SELECT tx::text::bigint, min(received_at), count(*) FROM readings GROUP BY tx;

        -- Cursors and batch ranges in the new order. A cursor that was partway through a transaction goes
        -- back to that transaction's start (its readings already sent are sent again, never skipped), and a
        -- batch that ended partway through one now ends with it; such a batch's contents change, so it gets
        -- a new key. Positions: (tx, 0, 0, -infinity) is before a transaction's first reading,
        -- (tx, 2147483647, 2147483647, infinity) after its last.
        CREATE FUNCTION pg_temp.whole(t xid8, i bigint) RETURNS boolean LANGUAGE sql STABLE
            AS $f$ SELECT NOT EXISTS (SELECT 1 FROM readings r WHERE r.tx = t AND r.id > i) $f$;
        ALTER TABLE upload_sinks
            ADD COLUMN cursor_device integer NOT NULL DEFAULT 0,
            ADD COLUMN cursor_metric integer NOT NULL DEFAULT 0,
            ADD COLUMN cursor_ts timestamptz NOT NULL DEFAULT '-infinity';
        UPDATE upload_sinks SET cursor_device = 2147483647, cursor_metric = 2147483647, cursor_ts = 'infinity'
        WHERE pg_temp.whole(cursor_tx, cursor_id);
        ALTER TABLE upload_sinks DROP COLUMN cursor_id,
            ALTER COLUMN cursor_tx DROP DEFAULT,
            ALTER COLUMN cursor_tx TYPE bigint USING cursor_tx::text::bigint,
            ALTER COLUMN cursor_tx SET DEFAULT 0;
        ALTER TABLE upload_batches
            ADD COLUMN after_device integer NOT NULL DEFAULT 0,
            ADD COLUMN after_metric integer NOT NULL DEFAULT 0,
            ADD COLUMN after_ts timestamptz NOT NULL DEFAULT '-infinity',
            ADD COLUMN last_device integer NOT NULL DEFAULT 2147483647,
            ADD COLUMN last_metric integer NOT NULL DEFAULT 2147483647,
            ADD COLUMN last_ts timestamptz NOT NULL DEFAULT 'infinity';
        UPDATE upload_batches SET after_device = 2147483647, after_metric = 2147483647, after_ts = 'infinity'
        WHERE pg_temp.whole(after_tx, after_id);
        UPDATE upload_batches SET key = gen_random_uuid()
        WHERE payload IS NULL AND NOT (pg_temp.whole(after_tx, after_id) AND pg_temp.whole(last_tx, last_id));
        ALTER TABLE upload_batches DROP COLUMN after_id, DROP COLUMN last_id,
            ALTER COLUMN after_tx TYPE bigint USING after_tx::text::bigint,
            ALTER COLUMN last_tx TYPE bigint USING last_tx::text::bigint,
            ALTER COLUMN after_device DROP DEFAULT, ALTER COLUMN after_metric DROP DEFAULT,
            ALTER COLUMN after_ts DROP DEFAULT, ALTER COLUMN last_device DROP DEFAULT,
            ALTER COLUMN last_metric DROP DEFAULT, ALTER COLUMN last_ts DROP DEFAULT;

        -- One rewrite of every partition, its natural key built anew (so packed).
        DROP INDEX readings_upload_order;
        ALTER TABLE readings DROP COLUMN id, DROP COLUMN received_at,
            ALTER COLUMN tx DROP DEFAULT,
            ALTER COLUMN tx TYPE bigint USING tx::text::bigint,
            ALTER COLUMN tx SET DEFAULT pg_current_xact_id()::text::bigint;
        -- Readings are appended in transaction order, so each range of 32 pages (about 3,800 readings) spans
        -- a few transactions. BRIN knows nothing of pages filled since autovacuum last summarized them, so a
        -- partition not yet packed also has a btree on tx of its own, which packing drops once the partition
        -- is closed (partitions.upload_index): here every partition but those packed already.
        CREATE INDEX readings_upload_order ON readings USING brin (tx) WITH (pages_per_range = 32, autosummarize = on);
        -- A packed partition is analyzed instead: the rewrite dropped the statistics of tx, without which the
        -- planner reads the whole partition rather than trust its BRIN index.
        DO $$
        DECLARE p text; packed boolean;
        BEGIN
            FOR p, packed IN
                SELECT c.relname, EXISTS (
                    SELECT 1 FROM readings_packed k
                    WHERE k.lo = (regexp_match(pg_get_expr(c.relpartbound, c.oid),
                                               'FROM [(]''([^'']+)''[)]'))[1]::timestamptz)
                FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid WHERE i.inhparent = 'readings'::regclass
            LOOP
                IF packed THEN
                    EXECUTE format('ANALYZE %I', p);
                ELSE
                    EXECUTE format('CREATE INDEX %I ON %I (tx)', p || '_upload_tx', p);
                END IF;
            END LOOP;
        END $$;
        UPDATE upload_batches b SET readings = (
            SELECT count(*) FROM readings r
            WHERE r.tx BETWEEN b.after_tx AND b.last_tx
              AND (r.tx, r.device_id, r.metric_id, r.ts) > (b.after_tx, b.after_device, b.after_metric, b.after_ts)
              AND (r.tx, r.device_id, r.metric_id, r.ts) <= (b.last_tx, b.last_device, b.last_metric, b.last_ts))
        WHERE b.payload IS NULL;

        CREATE FUNCTION readings_arrived() RETURNS trigger LANGUAGE plpgsql AS $f$
        BEGIN
            INSERT INTO readings_arrivals AS a (tx, readings)
            SELECT n.tx, count(*) FROM arrived n GROUP BY n.tx
            ON CONFLICT (tx) DO UPDATE SET readings = a.readings + EXCLUDED.readings;
            RETURN NULL;
        END $f$;
        CREATE TRIGGER readings_arrived AFTER INSERT ON readings REFERENCING NEW TABLE AS arrived
            FOR EACH STATEMENT EXECUTE FUNCTION readings_arrived();
        """,
    ),
    (
        17,
        "MQTT sessions a device kept (clean start 0), so CONNACK says Session Present only when one exists",
        """
        CREATE TABLE mqtt_sessions (
            device_id integer NOT NULL,
            client_id text NOT NULL,
            expiry_seconds integer NOT NULL CHECK (expiry_seconds > 0),
            ended_at timestamptz,  -- NULL while connected (or when the gateway stopped without seeing the end)
            PRIMARY KEY (device_id, client_id)
        );
        """,
    ),
    (
        18,
        "device names in natural order (sim-2 before sim-10) for the fleet's pages",
        """
        -- Each run of digits becomes its length (three digits) then the digits without leading zeros, so that
        -- compared byte by byte (COLLATE "C") numbers order by value: sim-9 -> sim-0019, sim-10 -> sim-00210.
        CREATE FUNCTION natural_sort_key(name text) RETURNS text
        LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE AS $f$
            SELECT coalesce(string_agg(
                CASE WHEN x.part ~ '^[0-9]'
                     THEN lpad(length(coalesce(nullif(ltrim(x.part, '0'), ''), '0'))::text, 3, '0')
                          || coalesce(nullif(ltrim(x.part, '0'), ''), '0')
                     ELSE x.part END, '' ORDER BY x.n), '')
            FROM regexp_matches(name, '[0-9]+|[^0-9]+', 'g') WITH ORDINALITY AS m(parts, n),
                 LATERAL (SELECT m.parts[1] AS part, m.n) AS x
        $f$;
        -- Kept in a column of its own, so that a page of the fleet reads it instead of computing it per row.
        ALTER TABLE devices ADD COLUMN natural_name text COLLATE "C"
            GENERATED ALWAYS AS (natural_sort_key(name)) STORED;
        CREATE INDEX devices_natural_order ON devices (natural_name, name);
        """,
    ),
    *COMMAND_MIGRATIONS,
    *TRACKER_MIGRATIONS,
    *AMQP_MIGRATIONS,
)
