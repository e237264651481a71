from edgemeta.cli import main

main()
