"""Collection access control end to end through the real gateway with real users: owners,
grants to users and roles, NOT_FOUND for collections one may not use, ListCollections,
collections from before ownership, and workflow steps acting for their owner."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest

from aiwfe.cognitive.v1 import cognitive_service_pb2 as pb
from aiwfe.cognitive.v1 import cognitive_service_pb2_grpc as pb_grpc
from aiwfe.data.v1 import vector_store_service_pb2 as vs_pb
from aiwfe.data.v1 import vector_store_service_pb2_grpc as vs_grpc
from aiwfe.runtime.config import RbacSettings
from aiwfe.runtime.identity import IDENTITY_METADATA_KEY, InternalIdentity
from aiwfe.taskproc.v1 import workflow_service_pb2 as wf_pb
from tests.conftest import bearer, error_reason, field_violations
from tests.gateway.conftest import Gateway, _gateway, unique
from tests.taskproc.helpers import finish, spec, step_status, submit

DOC = pb.Document(id="plan", text="The secret launch plan: ship the rocket on Friday at dawn.")
INDEXER = "indexer"  # a role granting cognitive:index, as an operator would configure it


@pytest.fixture
async def gw(base_overrides: dict[str, Any], redis_url: str) -> AsyncIterator[Gateway]:
    """The suite with the seed's roles plus `indexer` (cognitive:index only)."""
    roles = {name: role.model_dump() for name, role in RbacSettings().roles.items()}
    roles[INDEXER] = {"permissions": ["cognitive:index"]}
    async for g in _gateway({**base_overrides, "rbac": {"roles": roles}}, redis_url):
        yield g


class Caller:
    """One user's CognitiveService stub and bearer metadata."""

    def __init__(self, gw: Gateway, username: str, token: str) -> None:
        self.username = username
        self.token = token
        self.md = bearer(token)
        self.cog = pb_grpc.CognitiveServiceStub(gw.channel)

    async def index(self, collection: str) -> pb.IndexDocumentsResponse:
        return await self.cog.IndexDocuments(
            pb.IndexDocumentsRequest(collection=collection, documents=[DOC]),
            metadata=self.md,
            timeout=10,
        )

    async def search(self, collection: str) -> pb.SearchResponse:
        return await self.cog.Search(
            pb.SearchRequest(collection=collection, query="when does the rocket launch"),
            metadata=self.md,
            timeout=10,
        )

    async def names(self) -> list[str]:
        reply = await self.cog.ListCollections(
            pb.ListCollectionsRequest(), metadata=self.md, timeout=10
        )
        return [c.name for c in reply.collections]

    async def listed(self, name: str) -> pb.Collection:
        reply = await self.cog.ListCollections(
            pb.ListCollectionsRequest(), metadata=self.md, timeout=10
        )
        return next(c for c in reply.collections if c.name == name)

    async def share(self, collection: str, **grant: Any) -> pb.Collection:
        reply = await self.cog.ShareCollection(
            pb.ShareCollectionRequest(collection=collection, grant=pb.CollectionGrant(**grant)),
            metadata=self.md,
            timeout=10,
        )
        return reply.collection

    async def unshare(self, collection: str, **grantee: str) -> pb.Collection:
        reply = await self.cog.UnshareCollection(
            pb.UnshareCollectionRequest(collection=collection, **grantee),
            metadata=self.md,
            timeout=10,
        )
        return reply.collection


async def _caller(gw: Gateway, *roles: str) -> Caller:
    name = await gw.create_user(list(roles), "coll")
    return Caller(gw, name, (await gw.login(name)).access_token)


def _admin(gw: Gateway) -> Caller:
    return Caller(gw, "admin", gw.admin_token)


async def _error(call: Any) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await call
    return err.value


async def _assert_hidden(call: Any, name: str, missing: grpc.aio.AioRpcError) -> None:
    """The call fails exactly as it does on a collection that does not exist."""
    error = await _error(call)
    assert error.code() == grpc.StatusCode.NOT_FOUND
    assert error.details().replace(name, "X") == missing.details().replace("nothing-here", "X")
    assert error_reason(error) == error_reason(missing) == "COLLECTION_NOT_FOUND"


async def test_admins_private_collection_is_not_found_for_a_user(gw: Gateway) -> None:
    """A user's Search, Index and Delete on the admin's collection answer NOT_FOUND with the
    very message a missing collection gets."""
    admin = _admin(gw)
    private = unique("private")
    await admin.index(private)
    assert (await admin.search(private)).hits[0].document_id == "plan"
    user = await _caller(gw, "user", INDEXER)
    missing = await _error(user.search("nothing-here"))
    await _assert_hidden(user.search(private), private, missing)
    await _assert_hidden(user.index(private), private, missing)
    await _assert_hidden(
        user.cog.DeleteCollection(
            pb.DeleteCollectionRequest(collection=private), metadata=user.md, timeout=10
        ),
        private,
        missing,
    )
    assert private not in await user.names()
    # The failed index did not take the collection over: still the admin's, still whole.
    assert (await admin.listed(private)).owner == "admin"
    assert (await admin.search(private)).hits[0].document_id == "plan"


async def test_user_granted_cognitive_index_owns_what_it_indexes(gw: Gateway) -> None:
    """With cognitive:index a user creates, searches and lists its own collection, which
    other users cannot see; the seed's plain `user` still may not index."""
    owner = await _caller(gw, "user", INDEXER)
    mine = unique("mine")
    assert (await owner.index(mine)).chunk_count == 1
    assert (await owner.search(mine)).hits[0].document_id == "plan"
    listed = await owner.listed(mine)
    assert (listed.owner, listed.writable, listed.document_chunk_count) == (
        owner.username,
        True,
        1,
    )
    other = await _caller(gw, "user", INDEXER)
    missing = await _error(other.search("nothing-here"))
    await _assert_hidden(other.search(mine), mine, missing)
    assert mine not in await other.names()
    plain = await _caller(gw, "user")
    denied = await _error(plain.index(unique("plain")))
    assert denied.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "cognitive:index" in denied.details()


async def test_sharing_with_a_user_or_role_grants_and_unsharing_revokes(gw: Gateway) -> None:
    """A read grant lets the grantee search (not index), a write grant index too, a role
    grant reaches every holder of the role, and unsharing hides the collection again."""
    owner = await _caller(gw, "user", INDEXER)
    reader = await _caller(gw, "user", INDEXER)
    shared = unique("shared")
    await owner.index(shared)
    missing = await _error(reader.search("nothing-here"))
    await _assert_hidden(reader.search(shared), shared, missing)

    described = await owner.share(shared, username=reader.username)
    assert [(g.username, g.write) for g in described.grants] == [(reader.username, False)]
    assert (await reader.search(shared)).hits[0].document_id == "plan"
    read_only = await _error(reader.index(shared))
    assert read_only.code() == grpc.StatusCode.PERMISSION_DENIED
    assert error_reason(read_only) == "COLLECTION_ACCESS_DENIED"

    await owner.share(shared, username=reader.username, write=True)
    assert (await reader.index(shared)).document_count == 1
    assert (await reader.listed(shared)).writable

    await owner.unshare(shared, username=reader.username)
    await _assert_hidden(reader.search(shared), shared, missing)
    assert shared not in await reader.names()

    by_role = await _caller(gw, "user")
    await _assert_hidden(by_role.search(shared), shared, missing)
    described = await owner.share(shared, role="user")
    assert [(g.role, g.write) for g in described.grants] == [("user", False)]
    assert (await by_role.search(shared)).hits[0].document_id == "plan"
    assert (await reader.search(shared)).hits  # holds `user` too
    await owner.unshare(shared, role="user")
    await _assert_hidden(by_role.search(shared), shared, missing)


async def test_only_the_owner_or_an_admin_shares_and_bad_grants_are_rejected(
    gw: Gateway,
) -> None:
    """A grantee may not re-share; an unknown role or an empty grantee is INVALID_ARGUMENT on
    its field; an unknown user is NOT_FOUND; the admin may share anyone's collection."""
    owner = await _caller(gw, "user", INDEXER)
    grantee = await _caller(gw, "user", INDEXER)
    third = await _caller(gw, "user", INDEXER)
    name = unique("owned")
    await owner.index(name)
    await owner.share(name, username=grantee.username, write=True)
    reshare = await _error(grantee.share(name, username=third.username))
    assert reshare.code() == grpc.StatusCode.PERMISSION_DENIED
    bad_role = await _error(owner.share(name, role="no-such-role"))
    assert bad_role.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "grant.role" in field_violations(bad_role)
    empty = await _error(owner.unshare(name))
    assert "grantee" in field_violations(empty)
    nobody = await _error(owner.share(name, username="no-such-user-x"))
    assert nobody.code() == grpc.StatusCode.NOT_FOUND
    await _admin(gw).share(name, username=third.username)
    assert (await third.search(name)).hits


async def test_list_collections_shows_own_and_shared_and_admin_sees_all(gw: Gateway) -> None:
    """Each user lists its own collections and those shared with it (grants shown to the
    owner only); the admin lists every collection with its owner."""
    alice = await _caller(gw, "user", INDEXER)
    bob = await _caller(gw, "user", INDEXER)
    a1, b1, b2 = unique("a1"), unique("b1"), unique("b2")
    await alice.index(a1)
    await bob.index(b1)
    await bob.index(b2)
    await bob.share(b1, username=alice.username)
    mine = {a1, b1, b2}
    assert {n for n in await alice.names() if n in mine} == {a1, b1}
    assert {n for n in await bob.names() if n in mine} == {b1, b2}
    seen_by_alice = await alice.listed(b1)
    assert (seen_by_alice.owner, seen_by_alice.writable, list(seen_by_alice.grants)) == (
        bob.username,
        False,
        [],
    )
    assert [g.username for g in (await bob.listed(b1)).grants] == [alice.username]
    admin = _admin(gw)
    assert mine <= set(await admin.names())
    assert (await admin.listed(a1)).owner == alice.username
    assert [g.username for g in (await admin.listed(b1)).grants] == [alice.username]


async def test_collections_from_before_ownership_belong_to_the_admin(gw: Gateway) -> None:
    """A collection with no owner row (created before migration 005) is listed as the
    admin's, hidden from users until the admin shares it."""
    legacy = unique("legacy")
    identity = InternalIdentity.from_settings(gw.suite.settings)
    async with grpc.aio.insecure_channel(gw.suite.address("dataplatform")) as channel:
        # What IndexDocuments did before owners existed: no owner on the request.
        await vs_grpc.VectorStoreServiceStub(channel).CreateCollection(
            vs_pb.CreateCollectionRequest(
                collection=vs_pb.Collection(
                    name=legacy, dimension=768, indexed_fields=["document_id"]
                )
            ),
            metadata=((IDENTITY_METADATA_KEY, identity.assertion(None, "test")),),
            timeout=5,
        )
    admin = _admin(gw)
    listed = await admin.listed(legacy)
    assert (listed.owner, listed.writable) == ("admin", True)
    await admin.index(legacy)
    user = await _caller(gw, "user", INDEXER)
    missing = await _error(user.search("nothing-here"))
    await _assert_hidden(user.search(legacy), legacy, missing)
    await _assert_hidden(user.index(legacy), legacy, missing)
    assert legacy not in await user.names()
    await admin.share(legacy, username=user.username)
    assert (await user.search(legacy)).hits[0].document_id == "plan"
    assert (await user.listed(legacy)).owner == "admin"


async def test_delete_is_for_the_owner_and_forgets_the_grants(gw: Gateway) -> None:
    """The owner deletes its collection; a grantee may not; a namesake indexed later by
    someone else starts with no grants of the old one."""
    owner = await _caller(gw, "user", INDEXER)
    grantee = await _caller(gw, "user", INDEXER)
    name = unique("gone")
    await owner.index(name)
    await owner.share(name, username=grantee.username, write=True)
    delete = pb.DeleteCollectionRequest(collection=name)
    denied = await _error(grantee.cog.DeleteCollection(delete, metadata=grantee.md, timeout=10))
    assert denied.code() == grpc.StatusCode.PERMISSION_DENIED
    await owner.cog.DeleteCollection(delete, metadata=owner.md, timeout=10)
    missing = await _error(owner.search("nothing-here"))
    await _assert_hidden(owner.search(name), name, missing)
    await grantee.index(name)  # a new collection of the same name, the grantee's now
    await _assert_hidden(owner.search(name), name, missing)
    assert (await grantee.listed(name)).owner == grantee.username


async def test_workflow_steps_act_with_their_owners_access(gw: Gateway) -> None:
    """A workflow's search step reads its owner's collection but gets NOT_FOUND on another
    user's; an index step needs cognitive:index, as at the gateway."""
    alice = await _caller(gw, "user", INDEXER)
    bob = await _caller(gw, "user")
    private = unique("alice")
    await alice.index(private)
    search = {"name": "s", "op": "cognitive.search", "inputs": {"collection": private,
              "query": "rocket launch"}}  # fmt: skip

    own = await submit(gw.channel, alice.token, spec(search))
    done = await finish(gw.channel, alice.token, own.workflow_id)
    assert done.state == wf_pb.WORKFLOW_STATE_SUCCEEDED, done.error
    assert step_status(done, "s").output["hits"][0]["document_id"] == "plan"

    theirs = await submit(gw.channel, bob.token, spec(search))
    failed = await finish(gw.channel, bob.token, theirs.workflow_id)
    assert failed.state == wf_pb.WORKFLOW_STATE_FAILED
    assert "NOT_FOUND" in step_status(failed, "s").error
    assert "does not exist" in step_status(failed, "s").error

    index = {"name": "i", "op": "cognitive.index", "inputs": {"collection": unique("bob"),
             "documents": [{"id": "d", "text": "bob's notes"}]}}  # fmt: skip
    wf = await submit(gw.channel, bob.token, spec(index))
    failed = await finish(gw.channel, bob.token, wf.workflow_id)
    assert failed.state == wf_pb.WORKFLOW_STATE_FAILED
    assert "cognitive:index" in step_status(failed, "i").error
