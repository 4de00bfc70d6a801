-- Secrets shared by every coordinator replica of this database, made once here so that
-- replicas agree without configuration. 'page_tokens' authenticates ListActive's page
-- tokens (coordinator/api/page_tokens.py): 32 bytes from two random UUIDs (244 random bits).
CREATE TABLE sagaplane_keys (
    name       text        PRIMARY KEY,
    secret     bytea       NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);

INSERT INTO sagaplane_keys (name, secret)
VALUES ('page_tokens',
        decode(replace(gen_random_uuid()::text || gen_random_uuid()::text, '-', ''), 'hex'));
