from aiwfe.runtime.server import main
from taskproc.service import TaskProcService

main(TaskProcService)
