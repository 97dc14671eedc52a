"""The client SDK: channel, auth with token refresh, typed helpers over the
generated contracts. Needs only grpcio, protobuf and PyJWT (distribution aiwfe-sdk,
sdk/pyproject.toml); never imports the runtime, a service or the app."""

from aiwfe.sdk.client import AsyncClient, Client, CredentialStore, Tokens

__all__ = ["AsyncClient", "Client", "CredentialStore", "Tokens"]
