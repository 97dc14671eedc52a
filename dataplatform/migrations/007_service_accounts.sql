-- Service accounts and their API keys (issue #19).
-- A service account is a row of `users` (one namespace with people, so roles, disabling,
-- revocation watermarks and ownership work unchanged) of kind 'service' with no password.
ALTER TABLE users ADD COLUMN kind text NOT NULL DEFAULT 'user'
    CHECK (kind IN ('user', 'service'));
ALTER TABLE users ADD CONSTRAINT users_service_has_no_password
    CHECK (kind = 'user' OR password_hash = '');

-- API keys are stored as the SHA-256 of the whole key only ('aiwfe_sk_<key_id>_<secret>',
-- 256 random bits in the secret); key_id is public and names the key in listings and logs.
CREATE TABLE api_keys (
    key_id       text PRIMARY KEY CHECK (length(key_id) BETWEEN 8 AND 64),
    account_id   uuid NOT NULL REFERENCES users (user_id) ON DELETE CASCADE,
    name         text NOT NULL DEFAULT '',
    secret_hash  bytea NOT NULL CHECK (length(secret_hash) = 32),
    created_at   timestamptz NOT NULL DEFAULT now(),
    expires_at   timestamptz,
    revoked_at   timestamptz,
    last_used_at timestamptz
);
CREATE INDEX api_keys_account ON api_keys (account_id, created_at, key_id);
