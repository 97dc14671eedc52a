"""What a caller may do with a collection: the one access rule of CognitiveService.

Owners, grants and roles come from the data platform (`CollectionAccess`); the caller is the
request's principal (a gateway user, or a workflow step acting for the workflow's owner).
A collection without an owner predates ownership and belongs to the admin: only collection
admins and its grantees may use it.
"""

from __future__ import annotations

from dataclasses import dataclass

from aiwfe.data.v1 import vector_store_service_pb2 as vs_pb
from aiwfe.runtime.identity import Principal
from aiwfe.runtime.rbac import Rbac

# Sees, writes, shares and deletes every collection (the seed's admin has it via cognitive:*).
ADMIN_PERMISSION = "cognitive:collections:admin"
# Needed on top of write access to index: a workflow step is checked here, not at the gateway.
INDEX_PERMISSION = "cognitive:index"


@dataclass(frozen=True, slots=True)
class Rights:
    """read: search it; write: index into it; manage: share, unshare, delete it."""

    read: bool = False
    write: bool = False
    manage: bool = False


def rights(principal: Principal, access: vs_pb.CollectionAccess, rbac: Rbac) -> Rights:
    """The caller's rights on one collection."""
    can_index = rbac.allows(principal.roles, INDEX_PERMISSION)
    if rbac.allows(principal.roles, ADMIN_PERMISSION):
        return Rights(read=True, write=can_index, manage=True)
    if not principal.is_user:
        return Rights()
    if access.owner_id and access.owner_id == principal.user_id:
        return Rights(read=True, write=can_index, manage=True)
    read = write = False
    for grant in access.grants:
        if (grant.user_id and grant.user_id == principal.user_id) or (
            grant.role and grant.role in principal.roles
        ):
            read = True
            write = write or grant.write
    return Rights(read=read, write=write and can_index)
