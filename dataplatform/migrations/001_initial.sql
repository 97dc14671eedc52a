-- Accounts, the persistent (L3) cache and indexed-document metadata.
CREATE TABLE users (
    user_id       uuid PRIMARY KEY,
    username      text NOT NULL UNIQUE,
    password_hash text NOT NULL,
    roles         text[] NOT NULL DEFAULT '{}',
    disabled      boolean NOT NULL DEFAULT false,
    created_at    timestamptz NOT NULL DEFAULT now(),
    updated_at    timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE cache_entries (
    key        text PRIMARY KEY,
    value      bytea NOT NULL,
    expires_at timestamptz
);
CREATE INDEX cache_entries_expires_at ON cache_entries (expires_at) WHERE expires_at IS NOT NULL;
