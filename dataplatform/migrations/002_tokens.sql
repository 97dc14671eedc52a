-- Refresh-token families (RFC 9700 rotation with reuse detection) and revocations.
-- Tokens are stored as their SHA-256 only; access tokens are known by jti.
CREATE TABLE token_families (
    family_id  uuid PRIMARY KEY,
    user_id    uuid NOT NULL REFERENCES users (user_id) ON DELETE CASCADE,
    created_at timestamptz NOT NULL DEFAULT now(),
    revoked_at timestamptz,
    revoke_reason text
);
CREATE INDEX token_families_user ON token_families (user_id) WHERE revoked_at IS NULL;

CREATE TABLE refresh_tokens (
    token_hash bytea PRIMARY KEY CHECK (length(token_hash) = 32),
    family_id  uuid NOT NULL REFERENCES token_families (family_id) ON DELETE CASCADE,
    created_at timestamptz NOT NULL DEFAULT now(),
    expires_at timestamptz NOT NULL,
    spent_at   timestamptz
);
CREATE INDEX refresh_tokens_family ON refresh_tokens (family_id);
CREATE INDEX refresh_tokens_expires ON refresh_tokens (expires_at);

-- The access tokens issued from each family, so revoking a family revokes them too.
CREATE TABLE family_access_tokens (
    jti        text PRIMARY KEY,
    family_id  uuid NOT NULL REFERENCES token_families (family_id) ON DELETE CASCADE,
    expires_at timestamptz NOT NULL
);
CREATE INDEX family_access_tokens_family ON family_access_tokens (family_id);
CREATE INDEX family_access_tokens_expires ON family_access_tokens (expires_at);

-- Revocation events gateways replay: a revoked jti, or a user's not-before watermark.
CREATE TABLE token_revocations (
    id         bigserial PRIMARY KEY,
    jti        text,
    user_id    uuid,
    not_before timestamptz,
    expires_at timestamptz NOT NULL,
    reason     text NOT NULL DEFAULT '',
    created_at timestamptz NOT NULL DEFAULT now(),
    CHECK ((jti IS NULL) <> (user_id IS NULL))
);
CREATE INDEX token_revocations_expires ON token_revocations (expires_at);
CREATE INDEX token_revocations_created ON token_revocations (created_at);
