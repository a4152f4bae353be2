from optimizer_cli.cli import main

main()
