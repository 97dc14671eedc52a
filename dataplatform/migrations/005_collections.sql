-- Collection ownership and sharing (CognitiveService access control). The vectors live in
-- Qdrant; who may use them lives here, so grants are transactional and queryable per user.
-- A collection without a row predates ownership: it belongs to the admin (no backfill, since
-- a migration cannot see Qdrant; cognitive applies that rule).
CREATE TABLE collection_owners (
    name           text PRIMARY KEY,
    owner_id       text NOT NULL DEFAULT '',  -- '' = the admin's (a legacy collection shared)
    owner_username text NOT NULL DEFAULT '',
    created_at     timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX collection_owners_owner ON collection_owners (owner_id);

CREATE TABLE collection_grants (
    name         text NOT NULL REFERENCES collection_owners (name) ON DELETE CASCADE,
    grantee_kind text NOT NULL CHECK (grantee_kind IN ('user', 'role')),
    grantee      text NOT NULL,  -- a user id or a role name
    username     text NOT NULL DEFAULT '',  -- the grantee user's name when it was granted
    can_write    boolean NOT NULL DEFAULT false,
    created_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (name, grantee_kind, grantee)
);
CREATE INDEX collection_grants_grantee ON collection_grants (grantee_kind, grantee);
