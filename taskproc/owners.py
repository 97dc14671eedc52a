"""Who a public taskproc call acts for: workflows and schedules belong to users, each sees
only their own (another's is NOT_FOUND), and the `admin` role sees all."""

from __future__ import annotations

from aiwfe.data.v1 import workflow_store_service_pb2 as store_pb
from aiwfe.runtime.errors import PermissionDenied
from aiwfe.runtime.identity import Principal, require_principal

ADMIN_ROLE = "admin"


def user() -> Principal:
    """The calling user; a bare service (acting for nobody) is refused."""
    principal = require_principal()
    if not principal.is_user:
        raise PermissionDenied(
            "workflows and schedules belong to users: call on behalf of one",
            reason="USER_PRINCIPAL_REQUIRED",
        )
    return principal


def scope(principal: Principal) -> store_pb.WorkflowScope:
    """What `principal` may see: their own, or everyone's for an admin."""
    return store_pb.WorkflowScope(
        owner_id=principal.user_id, all_owners=ADMIN_ROLE in principal.roles
    )
