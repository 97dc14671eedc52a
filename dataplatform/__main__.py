from aiwfe.runtime.server import main
from dataplatform.service import DataPlatformService

main(DataPlatformService)
