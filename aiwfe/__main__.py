from aiwfe.cli import main

main()
