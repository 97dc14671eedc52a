from aiwfe.server import main
from gateway.service import GatewayService

main(GatewayService)
