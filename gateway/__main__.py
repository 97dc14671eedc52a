from aiwfe.runtime.server import main
from gateway.service import GatewayService

main(GatewayService)
