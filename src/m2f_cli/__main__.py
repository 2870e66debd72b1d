from m2f_cli.cli import main

main()
