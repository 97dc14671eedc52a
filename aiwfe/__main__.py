from aiwfe.app.cli import main

main()
