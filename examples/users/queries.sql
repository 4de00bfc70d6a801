-- Every statement of the users example, by name (loaded with sagaplane.queries.load).

-- == the schemas =======================================================================

-- name: users_schema
-- The pgx article's three tables, with the constraints its checks imply (a username is
-- used once; a profile belongs to a user), and the import chunk that created a user,
-- so that compensating the chunk deletes exactly its users.
CREATE TABLE IF NOT EXISTS users (
    id          serial PRIMARY KEY,
    username    varchar(100) NOT NULL UNIQUE,
    score       decimal NOT NULL DEFAULT 0,
    created     timestamptz(0) NOT NULL DEFAULT CURRENT_TIMESTAMP,
    updated     timestamptz(0),
    import_step text
);
CREATE INDEX IF NOT EXISTS users_import_step ON users (import_step)
    WHERE import_step IS NOT NULL;
CREATE TABLE IF NOT EXISTS user_profile (
    user_id   integer NOT NULL REFERENCES users ON DELETE CASCADE,
    firstname varchar(100) NOT NULL,
    lastname  varchar(100) NOT NULL
);
CREATE INDEX IF NOT EXISTS user_profile_user ON user_profile (user_id);
CREATE TABLE IF NOT EXISTS actions (
    id          serial PRIMARY KEY,
    description text NOT NULL,
    created     timestamptz(0) NOT NULL DEFAULT CURRENT_TIMESTAMP
);

-- name: partner_schema
-- What the partner was told: one row per notifying step.
CREATE TABLE IF NOT EXISTS partner_notifications (
    step_id  text PRIMARY KEY,
    saga_id  text NOT NULL,
    partner  text NOT NULL,
    chunk    integer NOT NULL,
    users    integer NOT NULL,
    received timestamptz NOT NULL DEFAULT now()
);

-- name: seed_users
-- The users already there: user-1 ... user-N, with scores 0 to 99.
INSERT INTO users (username, score)
SELECT 'user-' || n, n %% 100 FROM generate_series(1, %(count)s) AS n;

-- == users.create: the pgx article ====================================================

-- name: username_used
SELECT EXISTS (SELECT FROM users WHERE username = %(username)s);

-- name: create_user
INSERT INTO users (username, score) VALUES (%(username)s, %(score)s) RETURNING id, created;

-- name: create_profile
-- In the same round trip as create_user: the id it just took from the sequence.
INSERT INTO user_profile (user_id, firstname, lastname)
VALUES (currval(pg_get_serial_sequence('users', 'id')), %(firstname)s, %(lastname)s);

-- name: other_users
SELECT id, score FROM users WHERE id <> %(id)s ORDER BY id;

-- name: update_user_score
UPDATE users SET score = %(score)s, updated = now() WHERE id = %(id)s;

-- name: log_action
INSERT INTO actions (description) VALUES (%(description)s);

-- == users.import: the maniflex guide's import, one chunk per saga =====================

-- name: usernames_used
SELECT username FROM users WHERE username = ANY(%(usernames)s);

-- name: import_chunk
-- Every user of the chunk and its profile in ONE statement ("batch the inserts"): the
-- rows travel as one JSON array; the users are marked with the importing step.
WITH rows AS (
    SELECT * FROM jsonb_to_recordset(%(rows)s::jsonb)
        AS r(username text, firstname text, lastname text, score numeric)
), inserted AS (
    INSERT INTO users (username, score, import_step)
    SELECT username, coalesce(score, 0), %(step_id)s FROM rows
    RETURNING id, username
)
INSERT INTO user_profile (user_id, firstname, lastname)
SELECT i.id, r.firstname, r.lastname FROM inserted AS i JOIN rows AS r USING (username);

-- name: delete_chunk
-- The compensation: the chunk's users (their profiles go with them).
DELETE FROM users WHERE import_step = %(step_id)s;

-- == partner.notify =====================================================================

-- name: notify_partner
INSERT INTO partner_notifications (step_id, saga_id, partner, chunk, users)
VALUES (%(step_id)s, %(saga_id)s, %(partner)s, %(chunk)s, %(users)s);
