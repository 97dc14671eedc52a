from aiwfe.runtime.server import main
from cognitive.service import CognitiveService

main(CognitiveService)
