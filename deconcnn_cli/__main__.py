from deconcnn_cli.cli import main

main()
